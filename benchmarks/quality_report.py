"""benchmarks/RESULTS.md and its plots from the JSON that ``benchmarks/quality.py`` writes.

    python benchmarks/quality_report.py benchmarks/results/quality.json [--out benchmarks]

Tables: one row per (model, method, target), the mean over seeds with the spread (max - min)
where there are several; then the goals of the polarised-training issue, each marked met or
missed from those numbers. Plots: accuracy after fine-tuning against the pruned fraction (one
curve per method), the importance histogram of each method at the end of training, and ONNX
Runtime latency bars.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.atomic import write_text_atomic  # noqa: E402

METHOD_ORDER = ("receding", "l1", "polarization", "ista", "ucs", "tp-bn", "tp-mag")
CONTROLLED = METHOD_ORDER[:4]


def _cells_by_key(cells: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        out[(c["model"], c["method"], c["target"])].append(c)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][2], order[kv[0][1]])))


def _mean(cells: list[dict], key: str) -> float | None:
    values = [c[key] for c in cells if c.get(key) is not None]
    return statistics.fmean(values) if values else None


def _pct(cells: list[dict], key: str) -> str:
    values = [100 * c[key] for c in cells if c.get(key) is not None]
    if not values:
        return "—"
    spread = f" ±{(max(values) - min(values)) / 2:.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2f}{spread}"


def accuracy_table(groups: dict[tuple, list[dict]]) -> str:
    head = (
        "| model | target | method | seeds | dense % | pruned, raw % | recalibrated % | "
        "fine-tuned % | pruned groups | pruned BN channels | params | MACs | cut | "
        "ORT p50 b1 ms | ORT p50 b32 ms |\n|" + "---|" * 15
    )
    rows = [head]
    for (model, method, target), cells in groups.items():
        groups_pruned = _mean(cells, "pruned_groups")
        rows.append(
            f"| {model} | {target:.2f} | {method} | {len(cells)} | {_pct(cells, 'acc_dense')} | "
            f"{_pct(cells, 'acc_raw')} | {_pct(cells, 'acc_recal')} | {_pct(cells, 'acc_ft')} | "
            f"{'—' if groups_pruned is None else f'{groups_pruned:.3f}'} | "
            f"{_mean(cells, 'pruned_channels'):.3f} | {_mean(cells, 'params') / 1e3:.1f}k | "
            f"{_mean(cells, 'macs') / 1e6:.2f}M | "
            f"{'/'.join(sorted({c['threshold_mode'] for c in cells}))} | "
            f"{_mean(cells, 'ort_p50_b1'):.3f} | {_mean(cells, 'ort_p50_b32'):.3f} |"
        )
    return "\n".join(rows)


def _mark(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def goals(groups: dict[tuple, list[dict]]) -> list[str]:
    """One line per goal of issue 8 that these cells can judge, marked met or missed."""
    lines = []
    for (model, method, target), cells in groups.items():
        if method not in CONTROLLED:
            continue
        frac = _mean(cells, "pruned_groups")
        loss = 100 * (_mean(cells, "acc_dense") - _mean(cells, "acc_raw"))
        lines.append(
            f"- {model} {method} target {target:.2f}: achieved {frac:.3f} "
            f"({_mark(abs(frac - target) <= 0.02)} ±0.02); accuracy lost before fine-tuning "
            f"{loss:.2f} points ({_mark(loss <= 0.3)} ≤ 0.3)"
        )
    for (model, method, target), cells in groups.items():
        if method != "receding" or target != 0.9:
            continue
        ft = 100 * _mean(cells, "acc_ft")
        peers = {m: groups.get((model, m, target)) for m in ("l1", "tp-bn", "tp-mag")}
        l1 = 100 * _mean(peers["l1"], "acc_ft") if peers["l1"] else None
        tp = [100 * _mean(v, "acc_ft") for k, v in peers.items() if k != "l1" and v]
        baseline = groups.get((model, "ucs", target)) or cells  # the unpenalised model
        dense = 100 * _mean(baseline, "acc_dense")
        parts = [f"- {model} at 90%: receding fine-tuned {ft:.2f}"]
        if l1 is not None:
            parts.append(f"vs L1 {l1:.2f} ({_mark(ft >= l1 + 1)} ≥ L1 + 1)")
        if tp:
            parts.append(
                f"vs best Torch-Pruning {max(tp):.2f} ({_mark(ft >= max(tp) + 1)} ≥ TP + 1)"
            )
        parts.append(
            f"vs the unpenalised dense model {dense:.2f} ({_mark(ft >= dense - 1.5)} within 1.5)"
        )
        lines.append(", ".join(parts))
    return lines


def sweep_table(sweep: list[dict]) -> tuple[str, list[str]]:
    """The cliff check: one row per starting strength; a goal line per (model, method, target)."""
    rows = [
        "| model | method | target | start λ | final λ | dense % | raw % | fine-tuned % | pruned groups |",
        "|" + "---|" * 9,
    ]
    by_cell: dict[tuple, list[dict]] = defaultdict(list)
    for c in sweep:
        by_cell[(c["model"], c["method"], c["target"])].append(c)
        rows.append(
            f"| {c['model']} | {c['method']} | {c['target']:.2f} | {c['start']:.0e} | "
            f"{c['strength']:.3g} | {100 * c['acc_dense']:.2f} | {100 * c['acc_raw']:.2f} | "
            f"{100 * c['acc_ft']:.2f} | {c['pruned_groups']:.3f} |"
        )
    lines = []
    for (model, method, target), cells in by_cell.items():
        acc = [100 * c["acc_ft"] for c in cells]
        starts = f"{min(c['start'] for c in cells):.0e} to {max(c['start'] for c in cells):.0e}"
        lines.append(
            f"- no cliff, {model} {method} target {target:.2f}, starting λ {starts}: final accuracy "
            f"spans {max(acc) - min(acc):.2f} points ({_mark(max(acc) - min(acc) <= 0.5)} ≤ 0.5)"
        )
    return "\n".join(rows), lines


def plot_accuracy(groups: dict[tuple, list[dict]], path: Path) -> Path:
    from pipeline.report import _new_figure, _save

    models = sorted({k[0] for k in groups})
    fig = _new_figure(5.0 * len(models), 3.8)
    for i, model in enumerate(models):
        ax = fig.add_subplot(1, len(models), i + 1)
        for method in METHOD_ORDER:
            pts = sorted(
                (_mean(v, "pruned_channels"), 100 * _mean(v, "acc_ft"))
                for (m, meth, _), v in groups.items()
                if m == model and meth == method
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set(title=model, xlabel="pruned BN channels", ylabel="accuracy after fine-tune (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_histograms(cells: list[dict], path: Path) -> Path:
    import numpy as np

    from pipeline.report import _new_figure, _save

    picks: dict[str, dict] = {}
    for c in sorted(cells, key=lambda c: -c["target"]):
        key = c["method"] if c["method"] in CONTROLLED else "none (ucs / tp)"
        picks.setdefault(key, c)
    fig = _new_figure(3.2 * len(picks), 2.8)
    for i, (label, c) in enumerate(picks.items()):
        ax = fig.add_subplot(1, len(picks), i + 1)
        values = np.log10(np.clip(np.asarray(c["importances"]), 1e-30, None))
        ax.hist(values, bins=60, color="tab:blue")
        title = label if label.startswith("none") else f"{label}, target {c['target']:.1f}"
        ax.set(title=f"{c['model']}: {title}", xlabel="log10 group importance")
    return _save(fig, path)


def plot_latency_bars(groups: dict[tuple, list[dict]], path: Path) -> Path:
    from pipeline.report import _new_figure, _save

    keys = [k for k in groups if k[1] in ("receding", "ucs")]
    fig = _new_figure(max(5.0, 0.6 * len(keys)), 3.5)
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"{m}\n{meth}\n{t:.1f}" for m, meth, t in keys]
    for offset, batch in ((-0.2, 1), (0.2, 32)):
        ax.bar(
            [i + offset for i in range(len(keys))],
            [_mean(groups[k], f"ort_p50_b{batch}") for k in keys],
            width=0.4,
            label=f"batch {batch}",
        )
    ax.set_xticks(range(len(keys)), labels, fontsize=6)
    ax.set(ylabel="ONNX Runtime CPU p50 (ms)", yscale="log")
    ax.legend()
    return _save(fig, path)


def render(results: dict, out: Path, header: str) -> Path:
    groups = _cells_by_key(results["cells"])
    sweep_rows, sweep_lines = sweep_table(results.get("sweep", []))
    figures = out / "results"
    plots = [
        plot_accuracy(groups, figures / "quality_accuracy.png"),
        plot_histograms(results["cells"], figures / "quality_importance.png"),
        plot_latency_bars(groups, figures / "quality_latency.png"),
    ]
    env = results["environment"]
    text = "\n\n".join(
        [
            header.strip(),
            f"Machine: {env.get('cpu', '?')}, device `{results['grids'][-1]['device']}`; torch "
            f"{env.get('torch')}, onnxruntime {env.get('onnxruntime')}; started "
            f"{results.get('started', '?')}.",
            "Grids (one per invocation):\n\n"
            + "\n".join(f"- `{json.dumps(g, sort_keys=True)}`" for g in results["grids"]),
            "## Goals\n\n" + "\n".join(goals(groups) + sweep_lines),
            "## Every cell (mean over seeds, ± half the spread)\n\n" + accuracy_table(groups),
            "## The cliff check (one seed)\n\n" + sweep_rows,
            "## Plots\n\n" + "\n".join(f"![{p.stem}](results/{p.name})" for p in plots),
        ]
    )
    return write_text_atomic(out / "RESULTS.md", text + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="JSON written by benchmarks/quality.py")
    p.add_argument("--out", type=Path, default=Path("benchmarks"))
    p.add_argument("--header", type=Path, help="Markdown to put first (commands, notes)")
    args = p.parse_args(argv)
    header = args.header.read_text() if args.header else "# Quality results"
    render(json.loads(args.results.read_text()), args.out, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
