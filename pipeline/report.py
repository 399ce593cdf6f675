"""Render a run's results as Markdown tables and PNG plots.

The report is a plain mapping (see :func:`render_markdown` for its schema; a run builds it with
``pipeline.run_report.RunReport.to_dict``), so it can be loaded back from ``report.json`` and
re-rendered. Plots use matplotlib's object-oriented API
on an Agg canvas, so they never touch pyplot's global state or need a display.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.atomic import atomic_path
from pipeline.timing import LatencyRow, annotated_rows, latency_markdown

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

MISSING = "—"
REFERENCE_MODEL = "dense"
_DENSE, _PRUNED = "#8c8c8c", "#1f77b4"


def _count(value: Any) -> str:
    return MISSING if value is None else f"{int(value):,}"


def _percent(value: Any) -> str:
    """Accuracy as a percentage; values above 1 are taken to be percentages already."""
    if value is None:
        return MISSING
    value = float(value)
    return f"{value * 100 if value <= 1 else value:.2f}%"


def _relative_change(before: Any, after: Any) -> str:
    if before in (None, 0) or after is None:
        return MISSING
    return f"{(after - before) / before * 100:+.1f}%"


def _point_change(before: Any, after: Any) -> str:
    if before is None or after is None:
        return MISSING
    scale = 100 if max(float(before), float(after)) <= 1 else 1
    return f"{(float(after) - float(before)) * scale:+.2f} pp"


def _channels(pruned: Mapping[str, Any]) -> str:
    kept, total = pruned.get("channels_kept"), pruned.get("channels_total")
    if kept is None or not total:
        return MISSING
    return f"{kept:,} / {total:,} ({kept / total:.1%})"


def _summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    dense, pruned = report.get("dense") or {}, report.get("pruned") or {}
    threshold, export = report.get("threshold") or {}, report.get("export") or {}
    acc, acc_ft = dense.get("accuracy"), pruned.get("accuracy")
    acc_before = pruned.get("accuracy_before_finetune")
    value, err = threshold.get("value"), export.get("max_abs_err")
    opset = f" (opset {export['opset']})" if export.get("opset") is not None else ""
    return [
        (
            "Parameters",
            _count(dense.get("params")),
            _count(pruned.get("params")),
            _relative_change(dense.get("params"), pruned.get("params")),
        ),
        (
            "MACs",
            _count(dense.get("macs")),
            _count(pruned.get("macs")),
            _relative_change(dense.get("macs"), pruned.get("macs")),
        ),
        ("Accuracy", _percent(acc), _percent(acc_ft), _point_change(acc, acc_ft)),
        (
            "Accuracy before fine-tune",
            MISSING,
            _percent(acc_before),
            _point_change(acc, acc_before),
        ),
        (
            "… after BN recalibration (no gradient steps)",
            MISSING,
            _percent(pruned.get("accuracy_recalibrated")),
            _point_change(acc, pruned.get("accuracy_recalibrated")),
        ),
        ("Channels kept", _count(pruned.get("channels_total")), _channels(pruned), MISSING),
        (
            "Threshold",
            MISSING,
            MISSING if value is None else f"{threshold.get('mode', '?')} = {value:.4g}",
            MISSING,
        ),
        (f"ONNX max abs err{opset}", MISSING, MISSING if err is None else f"{err:.3g}", MISSING),
    ]


def _table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _as_row(row: LatencyRow | Mapping[str, Any]) -> LatencyRow:
    return row if isinstance(row, LatencyRow) else LatencyRow.from_mapping(row)


def _latency_section(
    raw_rows: Sequence[LatencyRow | Mapping[str, Any]], macs: Mapping[str, Any]
) -> str:
    return "## Latency\n\n" + latency_markdown([_as_row(r) for r in raw_rows], macs=macs)


def render_markdown(report: Mapping[str, Any]) -> str:
    """Render a run report as Markdown: before/after, latency and environment sections.

    Schema (every section optional): ``dense: {params, macs, accuracy}``, ``pruned: {params,
    macs, accuracy_before_finetune, accuracy, channels_kept, channels_total}``, ``threshold:
    {mode, value}``, ``export: {onnx_path, max_abs_err, opset}``, ``latency: [LatencyRow
    dicts]``, ``environment: {name: value}``. Accuracies are fractions in [0, 1] (values above 1
    are read as percentages). Missing values render as "—".

    Args:
        report: The report mapping.

    Returns:
        The Markdown text, ending with a newline.
    """
    summary = _table(
        ["", "Dense", "Pruned", "Change"], ["---", "---:", "---:", "---:"], _summary_rows(report)
    )
    sections = ["# recede report", "## Before / after\n\n" + summary]
    budget = report.get("budget") or {}
    if budget.get("outcome"):
        sections.insert(1, f"**Training budget:** {budget['outcome']}")
    onnx_path = (report.get("export") or {}).get("onnx_path")
    if onnx_path:
        sections[-1] += f"\n\nONNX file: `{onnx_path}`"
    if report.get("latency"):
        macs = {k: (report.get(k) or {}).get("macs") for k in (REFERENCE_MODEL, "pruned")}
        sections.append(_latency_section(report["latency"], macs))
    if report.get("environment"):
        items = "\n".join(f"- **{k}**: {v}" for k, v in report["environment"].items())
        sections.append("## Environment\n\n" + items)
    return "\n\n".join(sections) + "\n"


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=150)
    logger.info("wrote %s", path)
    return path


def plot_importance_histogram(
    importances: Sequence[float] | np.ndarray,
    path: str | os.PathLike[str],
    *,
    threshold: float | None = None,
    title: str = "Channel importance (BatchNorm |γ|)",
) -> Path:
    """Histogram of channel importances on a log count axis, with the pruning threshold.

    A polarised network shows two well separated modes; the log axis keeps the small one
    visible.

    Args:
        importances: One value per channel, all layers together.
        path: Destination image (PNG unless the suffix says otherwise).
        threshold: Draw a vertical line here; None for none.
        title: Plot title.

    Returns:
        The image path.
    """
    import numpy as np

    values = np.asarray(importances, dtype=np.float64).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(
            f"expected a non-empty array of finite importances, got {values.size} "
            "values, some not finite; check the importance computation"
        )
    fig = _new_figure(7.0, 4.0)
    ax = fig.add_subplot()
    bins: Any = min(100, max(10, values.size // 5))
    positive = values[values > 0]
    if positive.size == values.size and positive.max() / positive.min() > 100:
        # polarised importances span decades: log-spaced bins show both modes and the valley
        bins = np.geomspace(positive.min(), positive.max(), bins + 1)
        ax.set_xscale("log")
    ax.hist(values, bins=bins, color=_PRUNED, log=True)
    if threshold is not None:
        below = int((values < threshold).sum())
        ax.axvline(
            threshold,
            color="crimson",
            linestyle="--",
            label=f"threshold {threshold:.3g} ({below}/{values.size} below)",
        )
        ax.legend()
    ax.set(xlabel="importance", ylabel="channels (log scale)", title=title)
    return _save(fig, path)


def plot_kept_channels(kept: Mapping[str, tuple[int, int]], path: str | os.PathLike[str]) -> Path:
    """Horizontal bars of kept versus total channels per layer, in model order.

    The figure grows with the number of layers, so ~60 layers stay readable.

    Args:
        kept: Layer name to ``(kept, total)`` channels.
        path: Destination image.

    Returns:
        The image path.
    """
    bad = {name: kt for name, kt in kept.items() if not 0 <= kt[0] <= kt[1]}
    if not kept or bad:
        raise ValueError(
            f"expected layers with 0 <= kept <= total, got {len(kept)} layers, "
            f"invalid: {bad}; check the pruning plan"
        )
    names = list(kept)
    kept_counts, totals = [kept[n][0] for n in names], [kept[n][1] for n in names]
    fig = _new_figure(8.0, max(3.0, 0.2 * len(names) + 1.2))
    ax = fig.add_subplot()
    ax.barh(names, totals, color="#dddddd")
    ax.barh(names, kept_counts, color=_PRUNED)
    ax.invert_yaxis()  # first layer on top
    ax.margins(y=0.01)
    ax.tick_params(axis="y", labelsize=6 if len(names) > 30 else 8)
    # A legend would cover bars; the title names the colours instead.
    title = f"Channels kept (blue) of total (grey): {sum(kept_counts):,} / {sum(totals):,}"
    ax.set(xlabel="channels", title=title)
    return _save(fig, path)


def _model_colors(models: Sequence[str]) -> dict[str, str]:
    """Dense in grey, every other model in its own colour, stable across panels."""
    others = iter([_PRUNED, "C1", "C2", "C3", "C4", "C5"] * len(models))
    return {m: _DENSE if m == REFERENCE_MODEL else next(others) for m in models}


def _draw_latency_panel(
    ax: Any, rows: Sequence[LatencyRow], notes: Sequence[Mapping[str, Any]], models: Sequence[str]
) -> None:
    """Grouped p50 bars per setting (backend, device, mode), one per model; a line up to p99,
    a dot at p90; each bar but the reference's labelled with its speed-up, noisy bars hatched."""
    groups = list(dict.fromkeys(r.setting for r in rows))
    by_key = {(r.setting, r.model): (r, n) for r, n in zip(rows, notes, strict=True)}
    colors, width = _model_colors(models), 0.8 / len(models)
    for m, model in enumerate(models):
        drawn = [(g, by_key[(s, model)]) for g, s in enumerate(groups) if (s, model) in by_key]
        for g, (row, note) in drawn:
            x = g + (m - (len(models) - 1) / 2) * width
            first = g == drawn[0][0]  # one legend entry per model, wherever its first bar is
            hatch = "///" if row.noisy else None
            ax.bar(x, row.p50_ms, width, color=colors[model], hatch=hatch, edgecolor="black",
                   linewidth=0.5, label=model if first else None)  # fmt: skip
            ax.vlines(x, row.p50_ms, row.p99_ms, color="black", linewidth=1)
            ax.plot(x, row.p99_ms, marker="_", color="black", markersize=10)
            ax.plot(x, row.p90_ms, marker=".", color="black", markersize=5)
            if m > 0 and note["speedup"] is not None:
                label = f"{note['speedup']:.2f}×" + ("\nnoisy" if row.noisy else "")
                ax.annotate(label, (x, row.p50_ms), xytext=(0, -2), textcoords="offset points",
                            ha="center", va="top", fontsize=7, color="white", weight="bold")  # fmt: skip
    ax.set_xticks(range(len(groups)), [g.replace(" ", "\n") for g in groups], fontsize=8)


def _log_latency_axis(ax: Any, rows: Sequence[LatencyRow]) -> None:
    """A log scale whose floor sits a factor 4 below the fastest p50, so even the shortest bar
    has room for its label; ticks in plain milliseconds."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    top = max(r.p99_ms for r in rows) * 1.3
    ax.set_ylim(min(r.p50_ms for r in rows) / 4, top)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def plot_latency(
    rows: Sequence[LatencyRow | Mapping[str, Any]], path: str | os.PathLike[str]
) -> Path:
    """Grouped latency bars: one panel per batch size, dense vs pruned per backend and device.

    Bars are p50 on a log scale (a 10x faster backend would otherwise be an invisible sliver
    beside the slowest); the whisker above each bar reaches p99 and the dot on it marks p90.
    Every model but the first carries its speed-up over the first (the median of per-block
    ratios) on its bar; noisy rows (:data:`~pipeline.timing.NOISE_LIMIT`) are hatched and say
    so, and a quick look (few runs) says so in the title.

    Args:
        rows: Latency rows, as :class:`~pipeline.bench.LatencyRow` or their dicts.
        path: Destination image.

    Returns:
        The image path.
    """
    table = [_as_row(r) for r in rows]
    if not table:
        raise ValueError("expected at least one latency row, got none; run latency_table first")
    notes = annotated_rows(table)
    batches = sorted({r.batch for r in table})
    models = list(dict.fromkeys(r.model for r in table))
    fig = _new_figure(4.0 * len(batches) + 1.0, 4.5)
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    for ax, batch in zip(axes, batches, strict=True):
        chosen = [i for i, r in enumerate(table) if r.batch == batch]
        _draw_latency_panel(ax, [table[i] for i in chosen], [notes[i] for i in chosen], models)
        _log_latency_axis(ax, [table[i] for i in chosen])
        ax.set(title=f"batch {batch}", ylabel="latency (ms, log scale)")
    axes[0].legend(title="model")
    title = f"Latency: bar p50, dot p90, whisker top p99; label: speed-up over {models[0]}"
    marks = ["hatched: noisy"] * any(r.noisy for r in table)
    marks += ["quick look (few runs)"] * any(r.quick for r in table)
    fig.suptitle(title + ("\n" + "; ".join(marks) if marks else ""), fontsize=10)
    return _save(fig, path)


def plot_run(
    out: Path,
    importances: Sequence[float] | np.ndarray,
    threshold: float | None,
    widths: Mapping[str, tuple[int, int]],
    rows: Sequence[LatencyRow],
) -> dict[str, Path]:
    """A run folder's plots: importance histogram, kept channels and (with rows) latency.

    Args:
        out: The run folder.
        importances: One importance per prunable group, before pruning.
        threshold: The cut to draw; None for a ratio cut (it has no single value to draw).
        widths: Layer name to ``(kept, total)`` channels.
        rows: Latency rows; none, no latency plot.

    Returns:
        Plot name (as the release manifest lists it) to image path.
    """
    plots = {
        "importance_hist": plot_importance_histogram(
            importances,
            out / "importance_hist.png",
            threshold=threshold,
            title="Channel-group importance before pruning",
        ),
        "kept_channels": plot_kept_channels(widths, out / "kept_channels.png"),
    }
    if rows:
        plots["latency"] = plot_latency(rows, out / "latency.png")
    return plots
