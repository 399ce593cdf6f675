"""benchmarks/RESULTS.md and its plots from the JSON files that ``benchmarks/quality.py`` writes.

    python benchmarks/quality_report.py benchmarks/results/fmnist/*.json \\
        --header benchmarks/results/header.md --quick benchmarks/results/quality_digits.json \\
        --appendix benchmarks/results/timm_section.md

The JSON files of one grid (several processes may each write one) are merged. The page: the
goals of the quality issue, each marked met or missed from the numbers; the headline (accuracy
after fine-tuning per method at each MACs budget); every cell; the receding ablation; the cliff
check; the Pareto plot (accuracy against MACs kept, one line per method) and the importance
histograms; where the cells carry INT8, its section (``benchmarks/quality_int8_report.py``).
``--int8`` adds the INT8 grid (its own models and seeds) as a section of its own. ``--quick`` adds the digits grid as a short second section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_int8_report  # noqa: E402

from pipeline.core.atomic import write_text_atomic  # noqa: E402

METHOD_ORDER = (
    "receding",
    "l1",
    "polarization",
    "ista",
    "ucs",
    "tp-mag",
    "tp-slim",
    "tp-group",
)
CONTROLLED = METHOD_ORDER[:4]
TORCH_PRUNING = ("tp-mag", "tp-slim", "tp-group")


def merge(paths: list[Path]) -> dict:
    """One results mapping from several JSON files of the same grid."""
    out: dict = {"cells": [], "ablation": [], "sweep": [], "grids": []}
    for path in paths:
        part = json.loads(path.read_text())
        for key in ("cells", "ablation", "sweep", "grids"):
            out[key] += part.get(key, [])
        if part.get("environment") and not out.get("environment"):
            out["environment"] = part["environment"]
        if part.get("started"):
            out["started"] = min(out.get("started", part["started"]), part["started"])
    return out


def by_key(cells: list[dict]) -> dict[tuple, list[dict]]:
    """(model, method, kept) -> the cells of every seed, models then budgets then methods."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        out[(c["model"], c["method"], c["kept"])].append(c)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], -kv[0][2], order[kv[0][1]])))


def mean(cells: list[dict], key: str) -> float | None:
    values = [c[key] for c in cells if c.get(key) is not None]
    return statistics.fmean(values) if values else None


def pct(cells: list[dict], key: str) -> str:
    """Mean percentage ± half the spread over seeds."""
    values = [100 * c[key] for c in cells if c.get(key) is not None]
    if not values:
        return "—"
    spread = f" ±{(max(values) - min(values)) / 2:.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2f}{spread}"


def _mark(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _ft(groups: dict, model: str, method: str, kept: float) -> float | None:
    cells = groups.get((model, method, kept))
    return None if not cells else 100 * mean(cells, "acc_ft")


def goals(groups: dict[tuple, list[dict]]) -> list[str]:
    """The quality issue's goals that these cells can judge, each marked met or missed."""
    lines = []
    for model, kept in sorted({(k[0], k[2]) for k in groups}, key=lambda mk: (mk[0], -mk[1])):
        ft = {m: _ft(groups, model, m, kept) for m in METHOD_ORDER}
        have = {m: v for m, v in ft.items() if v is not None}
        tp = {m: have[m] for m in TORCH_PRUNING if m in have}
        best_tp = max(tp.items(), key=lambda kv: kv[1]) if tp else None
        ours = {m: have[m] for m in CONTROLLED if m in have}
        best_ours = max(ours.items(), key=lambda kv: kv[1]) if ours else None
        head = f"- {model} at {kept:.0%} of dense MACs:"
        if "receding" in have:
            parts = [f"receding {have['receding']:.2f}"]
            if "l1" in have:
                ok = have["receding"] >= have["l1"] + 1
                parts.append(f"vs L1 {have['l1']:.2f} ({_mark(ok)} ≥ L1 + 1)")
            if best_tp:
                ok = have["receding"] >= best_tp[1] + 1
                parts.append(
                    f"vs best Torch-Pruning {best_tp[0]} {best_tp[1]:.2f} ({_mark(ok)} ≥ TP + 1)"
                )
            lines.append(f"{head} " + ", ".join(parts))
        if best_ours and best_tp:
            ok = best_ours[1] >= best_tp[1] + 1
            lines.append(
                f"{head} recede's best, {best_ours[0]} {best_ours[1]:.2f}, vs best Torch-Pruning "
                f"{best_tp[0]} {best_tp[1]:.2f} ({_mark(ok)} ≥ TP + 1; "
                f"{_mark(best_ours[1] > best_tp[1])} above it)"
            )
        dense = _dense_same_epochs(groups, model)
        if kept >= 0.3 and dense is not None and best_ours:
            for name, value in {
                "receding": have.get("receding"),
                best_ours[0]: best_ours[1],
            }.items():
                if value is not None:
                    ok = value >= dense - 1.0
                    lines.append(
                        f"{head} {name} {value:.2f} vs the dense model trained the same epochs "
                        f"{dense:.2f} ({_mark(ok)} within 1.0)"
                    )
    return lines


def _dense_same_epochs(groups: dict, model: str) -> float | None:
    values = [
        100 * c["acc_dense_same_epochs"]
        for (m, method, _), cells in groups.items()
        if m == model and method in ("ucs", "tp-mag")
        for c in cells
        if c.get("acc_dense_same_epochs") is not None
    ]
    return statistics.fmean(values) if values else None


def headline(groups: dict[tuple, list[dict]]) -> str:
    """Accuracy after fine-tuning: one row per (model, budget), one column per method."""
    methods = [m for m in METHOD_ORDER if any(k[1] == m for k in groups)]
    rows = [
        "| model | MACs kept | dense, same epochs | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for model, kept in sorted({(k[0], k[2]) for k in groups}, key=lambda mk: (mk[0], -mk[1])):
        dense = _dense_same_epochs(groups, model)
        values = {m: _ft(groups, model, m, kept) for m in methods}
        best = max((v for v in values.values() if v is not None), default=None)
        cells = []
        for m in methods:
            text = pct(groups[(model, m, kept)], "acc_ft") if (model, m, kept) in groups else "—"
            cells.append(f"**{text}**" if values[m] is not None and values[m] == best else text)
        rows.append(
            f"| {model} | {kept:.0%} | {'—' if dense is None else f'{dense:.2f}'} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(rows)


def accuracy_table(groups: dict[tuple, list[dict]]) -> str:
    head = (
        "| model | MACs kept | method | seeds | trained % | pruned, raw % | recalibrated % | "
        "fine-tuned % | MACs kept (achieved) | params | pruned BN channels | cut | "
        "ORT p50 b1 ms | ORT p50 b32 ms |\n|" + "---|" * 14
    )
    rows = [head]
    for (model, method, kept), cells in groups.items():
        cuts = "/".join(sorted({c.get("cut", "?") for c in cells}))
        rows.append(
            f"| {model} | {kept:.0%} | {method} | {len(cells)} | {pct(cells, 'acc_dense')} | "
            f"{pct(cells, 'acc_raw')} | {pct(cells, 'acc_recal')} | {pct(cells, 'acc_ft')} | "
            f"{mean(cells, 'macs_kept'):.3f} | {mean(cells, 'params') / 1e3:.1f}k | "
            f"{mean(cells, 'pruned_channels'):.3f} | {cuts} | "
            f"{mean(cells, 'ort_p50_b1'):.3f} | {mean(cells, 'ort_p50_b32'):.3f} |"
        )
    return "\n".join(rows)


def ablation_table(ablation: list[dict]) -> str:
    """The receding factors, one at a time; the difference to ``default`` in the same cell."""
    if not ablation:
        return "(no ablation cells)"
    base = {(c["model"], c["kept"], c["seed"]): c for c in ablation if c["variant"] == "default"}
    rows = [
        "| variant | model | MACs kept | seed | final λ | receded | trained % | raw % | "
        "fine-tuned % | Δ fine-tuned vs default | MACs kept (achieved) | cut |",
        "|" + "---|" * 12,
    ]
    for c in ablation:
        ref = base.get((c["model"], c["kept"], c["seed"]))
        delta = "—" if ref is None else f"{100 * (c['acc_ft'] - ref['acc_ft']):+.2f}"
        rows.append(
            f"| {c['variant']} | {c['model']} | {c['kept']:.0%} | {c['seed']} | "
            f"{c['strength']:.3g} | {c['receded']:.3f} | {100 * c['acc_dense']:.2f} | "
            f"{100 * c['acc_raw']:.2f} | {100 * c['acc_ft']:.2f} | {delta} | "
            f"{c['macs_kept']:.3f} | {c.get('cut', '?')} |"
        )
    return "\n".join(rows)


def sweep_table(sweep: list[dict]) -> tuple[str, list[str]]:
    """The cliff check: one row per starting strength; a goal line per (model, method, kept)."""
    rows = [
        "| model | method | MACs kept | start λ | final λ | trained % | raw % | fine-tuned % | "
        "MACs kept (achieved) |",
        "|" + "---|" * 9,
    ]
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for c in sweep:
        cells[(c["model"], c["method"], c["kept"])].append(c)
        rows.append(
            f"| {c['model']} | {c['method']} | {c['kept']:.0%} | {c['start']:.0e} | "
            f"{c['strength']:.3g} | {100 * c['acc_dense']:.2f} | {100 * c['acc_raw']:.2f} | "
            f"{100 * c['acc_ft']:.2f} | {c['macs_kept']:.3f} |"
        )
    lines = []
    for (model, method, kept), group in cells.items():
        acc = [100 * c["acc_ft"] for c in group]
        starts = f"{min(c['start'] for c in group):.0e} to {max(c['start'] for c in group):.0e}"
        span = max(acc) - min(acc)
        lines.append(
            f"- no cliff, {model} {method} at {kept:.0%} MACs, starting λ {starts}: final "
            f"accuracy spans {span:.2f} points ({_mark(span <= 0.3)} ≤ 0.3)"
        )
    return "\n".join(rows), lines


def plot_pareto(groups: dict[tuple, list[dict]], path: Path) -> Path:
    """Accuracy after fine-tuning against MACs kept: one line per method, per model."""
    from pipeline.run.plots import new_figure, save_figure

    models = sorted({k[0] for k in groups})
    fig = new_figure(5.2 * len(models), 4.0)
    for i, model in enumerate(models):
        ax = fig.add_subplot(1, len(models), i + 1)
        for j, method in enumerate(m for m in METHOD_ORDER if any(k[1] == m for k in groups)):
            pts = sorted(
                (mean(v, "macs_kept"), 100 * mean(v, "acc_ft"))
                for (m, meth, _), v in groups.items()
                if m == model and meth == method
            )
            if pts:
                style = "-" if method in CONTROLLED else "--"
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=method, color=f"C{j}")
        dense = _dense_same_epochs(groups, model)
        if dense is not None:
            ax.axhline(dense, color="black", lw=0.8, ls=":", label="dense, same epochs")
            _clip_outliers(ax, floor=dense - 15)
        ax.set(
            title=model,
            xlabel="share of dense MACs kept",
            ylabel="test accuracy after fine-tune (%)",
            xscale="log",
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _clip_outliers(ax, floor: float) -> None:
    """Keep the axis on the methods that work: a mean below ``floor`` (a collapsed seed) is drawn
    as a down-pointing marker on the bottom edge, labelled with its value."""
    low = min((y for line in ax.get_lines() for y in line.get_ydata()), default=floor)
    if low >= floor:
        return
    ax.set_ylim(bottom=floor)
    for line in ax.get_lines():
        for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True):
            if y < floor:
                ax.plot([x], [floor], marker="v", color=line.get_color(), ms=9, clip_on=False)
                ax.annotate(
                    f"{y:.1f}",
                    (x, floor),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line.get_color(),
                )


def plot_histograms(cells: list[dict], path: Path) -> Path:
    """log10 group importance at the end of training, per method, at the smallest budget."""
    import numpy as np

    from pipeline.run.plots import new_figure, save_figure

    picks: dict[str, dict] = {}
    models = sorted({c["model"] for c in cells if c["method"] in CONTROLLED})
    model = "vgg" if "vgg" in models else models[0]  # one model, so the panels compare
    for c in sorted(
        (c for c in cells if c["model"] == model), key=lambda c: (c["kept"], c["seed"])
    ):
        key = c["method"] if c["method"] in CONTROLLED else None
        if key:
            picks.setdefault(key, c)
    fig = new_figure(3.2 * max(1, len(picks)), 2.8)
    for i, (label, c) in enumerate(picks.items()):
        ax = fig.add_subplot(1, len(picks), i + 1)
        values = np.log10(np.clip(np.asarray(c["importances"]), 1e-30, None))
        ax.hist(values, bins=60, color="tab:blue")
        ax.set(
            title=f"{c['model']}: {label}, {c['kept']:.0%} MACs", xlabel="log10 group importance"
        )
    return save_figure(fig, path)


def section(results: dict, figures: Path, prefix: str, title: str) -> str:
    """One grid's Markdown: machine, goals, headline, cells, ablation, cliff check, plots."""
    groups = by_key(results["cells"])
    sweep_rows, sweep_lines = sweep_table(results.get("sweep", []))
    plots = [plot_pareto(groups, figures / f"{prefix}_pareto.png")]
    if any(c["method"] in CONTROLLED for c in results["cells"]):
        plots.append(plot_histograms(results["cells"], figures / f"{prefix}_importance.png"))
    env = results.get("environment", {})
    parts = [
        f"## {title}",
        f"Machine: {env.get('cpu', '?')}, device `{results['grids'][-1]['device']}`; torch "
        f"{env.get('torch')}, onnxruntime {env.get('onnxruntime')}; first cell started "
        f"{results.get('started', '?')}.",
        "### Goals\n\n" + "\n".join(goals(groups) + sweep_lines),
        "### Accuracy after fine-tuning (mean over seeds ± half the spread; best in bold)\n\n"
        + headline(groups),
        "\n".join(f"![{p.stem}](results/{p.name})" for p in plots),
        "### Every cell\n\n" + accuracy_table(groups),
    ]
    int8 = quality_int8_report.section(results["cells"], figures, f"{prefix}_int8")
    if int8 is not None:
        parts.append(int8)
    if results.get("ablation"):
        parts.append(
            "### Receding ablation: one factor at a time\n\n" + ablation_table(results["ablation"])
        )
    if results.get("sweep"):
        parts.append("### The cliff check (one seed)\n\n" + sweep_rows)
    parts.append(
        "Grids (one per invocation):\n\n"
        + "\n".join(f"- `{json.dumps(g, sort_keys=True)}`" for g in results["grids"])
    )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, nargs="+", help="JSON files written by quality.py")
    p.add_argument("--out", type=Path, default=Path("benchmarks"))
    p.add_argument("--header", type=Path, help="Markdown to put first (commands, notes)")
    p.add_argument("--title", default="Fashion-MNIST")
    p.add_argument("--quick", type=Path, nargs="*", default=[], help="the digits grid's JSON")
    p.add_argument(
        "--int8", type=Path, nargs="*", default=[], help="the INT8 grid's JSON (its own section)"
    )
    p.add_argument(
        "--appendix", type=Path, nargs="*", default=[], help="Markdown files to put last, in order"
    )
    args = p.parse_args(argv)
    figures = args.out / "results"
    parts = [args.header.read_text().strip() if args.header else "# Quality results"]
    parts.append(section(merge(args.results), figures, "quality", args.title))
    if args.quick:
        parts.append(
            section(merge(args.quick), figures, "quality_digits", "digits (the quick grid)")
        )
    if args.int8:
        parts.append(section(merge(args.int8), figures, "int8grid", "Quality grid with INT8"))
    parts += [path.read_text().strip() for path in args.appendix]
    write_text_atomic(args.out / "RESULTS.md", "\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
