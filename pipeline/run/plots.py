"""A run's PNG plots: importance histogram, kept channels per layer and latency.

matplotlib's object-oriented API on an Agg canvas, so the plots never touch pyplot's global
state or need a display; ``new_figure`` and ``save_figure`` serve the benchmarks' plots too.
"""

from __future__ import annotations

import logging
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bench.timing import LatencyRow, annotated_rows
from pipeline.core.atomic import atomic_path
from pipeline.run.report import REFERENCE_MODEL, as_row

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_DENSE, _PRUNED = "#8c8c8c", "#1f77b4"


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on the Agg canvas (no display, no pyplot state), size in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` atomically to ``path`` at 150 dpi, in the format its suffix names."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=150)
    logger.info("wrote %s", path)
    return path


_ZEROS, _VALLEY, _CUT = "#8c8c8c", "#2ca02c", "crimson"


_DECADES_SHOWN = 8  # importance decades under the largest that get bars of their own


def _on_log_axis(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(values with bars of their own, the rest drawn at ``floor``, ``floor``).

    A log axis has no 0, and receded importances underflow towards 1e-30: 30 decades of bars
    would squeeze the kept mode into one. So the axis spans at most ``_DECADES_SHOWN`` decades
    under the largest value (or down to a decade under the smallest positive one), and exact
    zeros and anything smaller share one grey bar at its left edge.
    """
    import numpy as np

    positive = values[values > 0]
    if not positive.size:
        return positive, values, 1.0
    low = float(positive.max()) * 10.0**-_DECADES_SHOWN
    floor = max(float(positive.min()) / 10, low / 10)
    shown = positive[positive >= low]
    return shown, np.full(values.size - shown.size, floor), floor


def _log_bins(low: float, high: float, count: int) -> np.ndarray:
    import numpy as np

    low, high = (low / 2, high * 2) if high <= low * 1.0001 else (low, high * 1.0001)
    return np.geomspace(low, high, count + 1)


def _label_line(ax: Any, x: float, text: str, color: str, *, left: bool) -> None:
    """``text`` at the top of the axes beside ``x``, on its left or its right."""
    ax.annotate(text, (x, 1.0), xycoords=("data", "axes fraction"), color=color, fontsize=8,
                xytext=(-3 if left else 3, -11), textcoords="offset points",
                ha="right" if left else "left")  # fmt: skip


def _mark_valley(ax: Any, values: np.ndarray, floor: float) -> None:
    """Shade the valley ``pipeline.prune.threshold.split`` finds (the empty gap between the two modes
    around it), or say in the plot why there is none."""
    import numpy as np

    from pipeline.prune.threshold import split

    found, why = split(values)
    if found is None:  # an empty handle: the reason reads as a legend line below the axes
        ax.plot([], [], " ", label=textwrap.fill(f"no valley to cut in: {why}", 90))
        return
    v = np.sort(values)
    low, high = float(v[found.below - 1]), float(v[found.below])
    label = (
        f"valley: no group between {low:.2g} and {high:.2g} "
        f"({found.below} below, {found.above} above; bimodality {found.bimodality:.2f})"
    )
    low = max(low, floor * 10)  # drawn beside the grey bar, not over it
    ax.axvspan(low, high, color=_VALLEY, alpha=0.18, label=label)
    ax.axvline(found.value, color=_VALLEY, linestyle=":", linewidth=1.2)
    _label_line(ax, low, "valley", _VALLEY, left=False)


def plot_importance_histogram(
    importances: Sequence[float] | np.ndarray,
    path: str | os.PathLike[str],
    *,
    threshold: float | None = None,
    title: str = "Channel importance (BatchNorm |γ|)",
) -> Path:
    """Save :func:`importance_figure` of ``importances`` to ``path`` (PNG unless the suffix
    says otherwise) and return the path."""
    return save_figure(importance_figure(importances, threshold=threshold, title=title), path)


def importance_figure(
    importances: Sequence[float] | np.ndarray,
    *,
    threshold: float | None = None,
    title: str = "Channel importance (BatchNorm |γ|)",
) -> Figure:
    """Histogram of channel importances on log axes, with the valley and the cut marked.

    Decisions: the importance axis is always logarithmic, with log-spaced bins, because
    polarised importances span decades: on a linear axis every receded group falls into the
    first bar and the valley cannot be seen. The axis spans at most 8 decades under the largest
    importance: exact zeros (no place on a log axis) and values underflowing towards 1e-30
    share one grey bar at its left edge, which the legend counts. The count axis is logarithmic too, so a mode of a few groups stays visible beside one
    of thousands. The valley is the one ``pipeline.prune.threshold.split`` finds (the automatic
    threshold's method), shaded over the empty gap between the modes, with its evidence in the
    legend; when there is none the plot says why. The cut, when given, is a dashed red line
    whose legend entry counts the groups below it.

    Args:
        importances: One value per channel (group), all layers together.
        threshold: The cut to draw; None for none (a ratio cut has no single value).
        title: Plot title.

    Returns:
        The figure, on an Agg canvas.

    Raises:
        ValueError: no importances, or some not finite.
    """
    import numpy as np

    values = np.asarray(importances, dtype=np.float64).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(
            f"expected a non-empty array of finite importances, got {values.size} "
            "values, some not finite; check the importance computation"
        )
    positive, tiny, floor = _on_log_axis(values)
    top = float(positive.max()) if positive.size else floor
    bins = _log_bins(floor if tiny.size else float(positive.min()), top, 60)
    fig = new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    ax.hist(positive, bins=bins, color=_PRUNED, log=True)
    if tiny.size:
        zeros = int((values <= 0).sum())
        what = (
            f"below {floor * 10:.2g}, {zeros} of them exactly 0"
            if zeros < tiny.size
            else "exactly 0"
        )
        ax.hist(tiny, bins=bins, color=_ZEROS, log=True, label=f"{tiny.size} {what} (grey bar)")
    ax.set_xscale("log")
    _mark_valley(ax, values, floor)
    if threshold is not None:
        below = int((values < threshold).sum())
        label = f"cut {threshold:.3g}: {below} of {values.size} groups below"
        ax.axvline(threshold, color=_CUT, linestyle="--", label=label)
        _label_line(ax, threshold, "cut", _CUT, left=True)
    ax.set_ylim(bottom=0.7)  # a bar of one group stays visible on the log count axis
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, frameon=False)
    ax.set(xlabel="importance (log scale)", ylabel="groups (log scale)", title=title)
    return fig


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
    fig = new_figure(8.0, max(3.0, 0.2 * len(names) + 1.2))
    ax = fig.add_subplot()
    ax.barh(names, totals, color="#dddddd")
    ax.barh(names, kept_counts, color=_PRUNED)
    ax.invert_yaxis()  # first layer on top
    ax.margins(y=0.01)
    ax.tick_params(axis="y", labelsize=6 if len(names) > 30 else 8)
    # A legend would cover bars; the title names the colours instead.
    title = f"Channels kept (blue) of total (grey): {sum(kept_counts):,} / {sum(totals):,}"
    ax.set(xlabel="channels", title=title)
    return save_figure(fig, path)


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
            slower = "slower" in note["flags"]  # slower than dense beyond noise: a red frame
            ax.bar(x, row.p50_ms, width, color=colors[model], hatch=hatch,
                   edgecolor="red" if slower else "black", linewidth=2 if slower else 0.5,
                   label=model if first else None)  # fmt: skip
            ax.vlines(x, row.p50_ms, row.p99_ms, color="black", linewidth=1)
            ax.plot(x, row.p99_ms, marker="_", color="black", markersize=10)
            ax.plot(x, row.p90_ms, marker=".", color="black", markersize=5)
            if (m > 0 or row.precision != "fp32") and note["speedup"] is not None:
                label = f"{note['speedup']:.2f}×" + ("\nnoisy" if row.noisy else "")
                label += "\nslower" if slower else ""
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
    ratios) on its bar; noisy rows (:data:`~pipeline.bench.timing.NOISE_LIMIT`) are hatched and say
    so, and a quick look (few runs) says so in the title.

    Args:
        rows: Latency rows, as :class:`~pipeline.bench.timing.LatencyRow` or their dicts.
        path: Destination image.

    Returns:
        The image path.
    """
    table = [as_row(r) for r in rows]
    if not table:
        raise ValueError("expected at least one latency row, got none; run latency_table first")
    notes = annotated_rows(table)
    batches = sorted({r.batch for r in table})
    models = list(dict.fromkeys(r.model for r in table))
    fig = new_figure(4.0 * len(batches) + 1.0, 4.5)
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    for ax, batch in zip(axes, batches, strict=True):
        chosen = [i for i, r in enumerate(table) if r.batch == batch]
        _draw_latency_panel(ax, [table[i] for i in chosen], [notes[i] for i in chosen], models)
        _log_latency_axis(ax, [table[i] for i in chosen])
        ax.set(title=f"batch {batch}", ylabel="latency (ms, log scale)")
    axes[0].legend(title="model")
    title = f"Latency: bar p50, dot p90, whisker top p99; label: speed-up over {models[0]}"
    title += " fp32" if any(r.precision != "fp32" for r in table) else ""
    marks = ["hatched: noisy"] * any(r.noisy for r in table)
    marks += ["red frame: slower than dense"] * any("slower" in n["flags"] for n in notes)
    marks += ["quick look (few runs)"] * any(r.quick for r in table)
    fig.suptitle(title + ("\n" + "; ".join(marks) if marks else ""), fontsize=10)
    return save_figure(fig, path)


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
