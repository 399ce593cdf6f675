"""The quality grid's INT8 section: accuracy fp32 against INT8 per cell, and latency measured.

    python benchmarks/quality_int8_report.py benchmarks/results/fmnist/int8/*.json --out benchmarks

reads the cells ``benchmarks/quality.py`` wrote with INT8 (``benchmarks/quality_int8.py`` says
what each key holds) and writes ``results/quality_int8.md`` (the table and the goal of issue 28:
INT8 within 0.5 points of fp32 in every cell) and ``results/quality_int8_pareto.png`` (accuracy
against measured latency, fp32 and INT8 points of every cell and of the dense model) under
``--out``. ``benchmarks/quality_report.py`` adds the same section to RESULTS.md when its cells
carry INT8. Cells without INT8 keys (results written before them, ``--no-int8``) are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.atomic import write_text_atomic  # noqa: E402

MAX_DROP = 0.5  # accuracy points, issue 28's bound (and the export's default --int8-max-drop)
BATCHES = ("b1", "b32")
METHODS = ("receding", "l1", "polarization", "ista", "ucs", "tp-mag", "tp-slim", "tp-group")


def int8_cells(cells: list[dict]) -> list[dict]:
    """The cells that carry INT8 and latency, in model, budget (largest first), method order."""
    order = {m: i for i, m in enumerate(METHODS)}
    have = [c for c in cells if c.get("acc_int8") is not None and c.get("latency")]
    return sorted(
        have, key=lambda c: (c["model"], -c["kept"], order.get(c["method"], 99), c["seed"])
    )


def _speedup(cell: dict, batch: str, graph: str = "pruned_int8") -> str:
    """``4.75× (4.74–4.79)``: the median of the per-block ratios over dense fp32, quartiles."""
    row = cell["latency"][batch][graph]
    if row.get("speedup") is None:
        return "—"
    low, high = row["speedup_range"]
    return f"{row['speedup']:.2f}× ({low:.2f}–{high:.2f})"


def _p50(cell: dict, batch: str, graph: str) -> str:
    return f"{cell['latency'][batch][graph]['p50_ms']:.3f}"


def int8_table(cells: list[dict]) -> str:
    """One row per cell: accuracies, drop, verdict, p50s and the speed-ups over dense fp32."""
    rows = [
        "| model | MACs kept | method | seed | fp32 % | INT8 % | drop (points) | agreement % | "
        "verdict | nodes kept fp32 | dense fp32 → pruned INT8, b1 | b32 | "
        "dense fp32 → pruned fp32, b32 | p50 ms b32: dense fp32 / pruned fp32 / pruned INT8 / "
        "dense INT8 |",
        "|" + "---|" * 14,
    ]
    for c in int8_cells(cells):
        p50 = " / ".join(_p50(c, "b32", g) for g in _GRAPHS)
        rows.append(
            f"| {c['model']} | {c['kept']:.0%} | {c['method']} | {c['seed']} | "
            f"{100 * c['acc_fp32_onnx']:.2f} | {100 * c['acc_int8']:.2f} | "
            f"{c['int8_drop']:+.2f} | {100 * c['int8_agreement']:.2f} | {c['int8_verdict']} | "
            f"{len(c['int8_excluded'])} | {_speedup(c, 'b1')} | {_speedup(c, 'b32')} | "
            f"{_speedup(c, 'b32', 'pruned_fp32')} | {p50} |"
        )
    return "\n".join(rows)


_GRAPHS = ("dense_fp32", "pruned_fp32", "pruned_int8", "dense_int8")


def goal_lines(cells: list[dict]) -> list[str]:
    """Issue 28's grid goal per cell (INT8 within 0.5 points of fp32), then one verdict."""
    have = int8_cells(cells)
    lines = [
        f"- {c['model']} {c['method']} at {c['kept']:.0%} MACs, seed {c['seed']}: fp32 "
        f"{100 * c['acc_fp32_onnx']:.2f}, INT8 {100 * c['acc_int8']:.2f}, drop "
        f"{c['int8_drop']:+.2f} points ({_mark(c['int8_drop'] <= MAX_DROP)} ≤ {MAX_DROP})"
        for c in have
    ]
    if have:
        ok = sum(c["int8_drop"] <= MAX_DROP for c in have)
        worst = max(c["int8_drop"] for c in have)
        lines.append(
            f"- every cell: {ok} of {len(have)} within {MAX_DROP} points, worst drop "
            f"{worst:+.2f} ({_mark(ok == len(have))})"
        )
    return lines


def _mark(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def plot_latency_pareto(cells: list[dict], path: Path) -> Path:
    """Accuracy against measured p50 latency: a panel per (model, batch); per cell an fp32
    circle (labelled with its MACs budget) joined to its INT8 triangle; the dense model's fp32
    and INT8 points in black."""
    from pipeline.run.plots import new_figure, save_figure

    have = int8_cells(cells)
    models = sorted({c["model"] for c in have})
    fig = new_figure(4.6 * len(BATCHES), 3.8 * len(models))
    for i, model in enumerate(models):
        mine = [c for c in have if c["model"] == model]
        for j, batch in enumerate(BATCHES):
            ax = fig.add_subplot(len(models), len(BATCHES), i * len(BATCHES) + j + 1)
            _draw_cells(ax, mine, batch)
            ax.set(
                title=f"{model}, batch {batch[1:]}",
                xlabel=f"p50 latency, ms (ORT CPU, 1 thread, batch {batch[1:]})",
                ylabel="test accuracy (%)",
                xscale="log",
            )
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)
    return save_figure(fig, path)


def _draw_cells(ax, cells: list[dict], batch: str) -> None:
    seen: set[str] = set()
    for c in cells:
        lat, method = c["latency"][batch], c["method"]
        colour = f"C{METHODS.index(method)}"
        x = (lat["pruned_fp32"]["p50_ms"], lat["pruned_int8"]["p50_ms"])
        y = (100 * c["acc_fp32_onnx"], 100 * c["acc_int8"])
        first = method not in seen  # one legend entry per method; the budget labels the point
        seen.add(method)
        ax.plot(x, y, "-", color=colour, lw=0.8)
        ax.plot(x[0], y[0], "o", color=colour, label=f"{method} fp32" if first else None)
        ax.plot(x[1], y[1], "^", color=colour, label=f"{method} INT8" if first else None)
        ax.annotate(f"{c['kept']:.0%}", (x[0], y[0]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color=colour)  # fmt: skip
    first = cells[0]  # every cell of a (model, seed) shares its dense graphs
    dense, lat = first["dense_int8"], first["latency"][batch]
    ax.plot(lat["dense_fp32"]["p50_ms"], 100 * dense["acc_fp32_onnx"], "ko", mfc="none",
            label="dense fp32")  # fmt: skip
    ax.plot(lat["dense_int8"]["p50_ms"], 100 * dense["acc_int8"], "k^", mfc="none",
            label="dense INT8")  # fmt: skip


def section(cells: list[dict], figures: Path, prefix: str = "quality_int8") -> str | None:
    """The Markdown of the INT8 section (None when no cell carries INT8); writes its plot."""
    have = int8_cells(cells)
    if not have:
        return None
    plot = plot_latency_pareto(have, figures / f"{prefix}_pareto.png")
    setting = have[0]["latency"]["setting"]
    runs = have[0]["latency"]["runs"]
    return "\n\n".join(
        [
            "### INT8 per cell (recede's INT8 export, verified on the whole test set)",
            "#### Goal: INT8 within 0.5 points of fp32 in every cell\n\n"
            + "\n".join(goal_lines(have)),
            f"Latency: {setting}, {runs} timed runs per graph and block; a speed-up is the "
            "median of the per-block ratios over the dense fp32 graph, with their quartiles "
            "in brackets. The drop is fp32 minus INT8 accuracy of the same ONNX graph.\n\n"
            + int8_table(have),
            f"![{plot.stem}](results/{plot.name})",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, nargs="+", help="JSON files written by quality.py")
    p.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = p.parse_args(argv)
    cells = []
    for path in args.results:
        try:
            cells += json.loads(path.read_text(encoding="utf-8"))["cells"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(
                f"results {path}: expected a JSON file that benchmarks/quality.py wrote, "
                f"got {type(err).__name__}: {str(err)[:120]}; pass such a file",
                file=sys.stderr,
            )
            return 2
    text = section(cells, args.out / "results")
    if text is None:
        print("no cell carries INT8 (was the grid run with --no-int8?)", file=sys.stderr)
        return 2
    write_text_atomic(args.out / "results" / "quality_int8.md", text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
