"""Where to cut: the valley between the channels training receded and the rest, or a refusal.

The rule. Polarised training pushes the channels it wants gone *down*, below the receded level
``L`` (``train.receded_below``, 0.01 by default, the level the budget counts against), and
leaves the others where they are, however many modes they form. On the kernel density of
log10(importance), a *mode* is a peak whose basin holds at least 1% of the groups and at least
``_MIN_MODE_COUNT`` (5) of them; the modes whose peak lies below ``L`` are the receded ones, the
others are kept. The cut is the lowest point of the density between the highest receded mode's
peak and the lowest kept mode's peak, moved to the middle (in log10) of the empty interval
between the two importances around it. It is refused (``NotBimodalError``, with advice) when

- no mode lies below ``L`` (training receded nothing) or none at or above it;
- the density at that lowest point is above ``_MAX_DIP`` (0.1) of the smaller of the two peaks:
  ``L`` lies inside a mode, or the two modes run into each other, and any cut would split one;
- the two peaks are less than ``min_decades`` (1) apart: two bumps around 0.5 can be bimodal,
  yet cutting between them removes channels that matter.

So a cut never lies inside a mode, and every mode the density resolves wholly below ``L`` is
dropped and every one wholly above it kept; values in no mode (stragglers in the valley) fall on the side of its lowest
point. ``tests/prune/test_threshold.py`` states this over random two- and three-mode mixtures.

Why the level decides which valley, not the shape alone. A three-mode mixture has two valleys:
say exact zeros from ISTA or a clamp (receded), a bulk the penalty left near its start, and a few
strong channels. Anchoring on the strongest mode (the previous rule) cut under the strong stem
and dropped 97% of the network when the zeros were the largest mode; the check added against
that refused a small strong cluster over a large bulk although the valley between the receded
channels and the bulk was there. Training already says which channels it pushed down; the
density only has to show that they are separated from the rest. Otsu's split, used before
either, landed inside the weak mode when that mode spanned several decades.

The density is an adaptive Gaussian kernel estimate: each value's kernel is as wide as the
distance to its ``max(10, sqrt(n) / 2)``-th nearest neighbour, clipped to [0.02, 0.25] decades,
so a sparse mode stays whole beside a tight one (one Silverman width for all was set by the
tightest large mode and broke a sparse mode into spikes with empty gaps a cut could land in). It
is binned on a grid of a quarter of the narrowest width, so modes decades apart (exact zeros sit
at the floor, 1e-30) stay resolved. Sarle's bimodality coefficient and Ashman's D of the two
sides are reported as evidence; they do not decide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_FLOOR = 1e-30
_MIN_MODE_SHARE = 0.01
_MIN_MODE_COUNT = 5  # below ~300 groups 1% is 1-3 groups, and a lone tail sample made a "mode"
_RECEDED_BELOW = 0.01  # train.receded_below's default: under it a group counts as receded
_MAX_DIP = 0.1
_KERNEL_REACH = 4.0  # the kernel is cut at this many widths
_BINS_PER_BANDWIDTH = 4
_MIN_WIDTH, _MAX_WIDTH = 0.02, 0.25  # kernel widths, decades
_WIDTH_CLASSES = 8
# the fewest neighbours a kernel width spans: with 6, a chance gap of six mean spacings inside a
# sparse mode (about 1 draw in 2,000 at 30 groups per decade) dipped like a valley; with 10 the
# chance is about 1e-7
_NEIGHBOURS = 10


class NotBimodalError(ValueError):
    """The importances have no valley at the receded level; a ratio or a value must be chosen."""


@dataclass(frozen=True)
class Threshold:
    """An automatic cut and the evidence for it."""

    value: float
    bimodality: float  # Sarle's coefficient of log10 importances
    separation: float  # Ashman's D of the two sides in log10 space
    decades: float  # distance between the peaks of the modes on either side of the cut
    gap: float  # empty interval around the cut, in importance units
    below: int
    above: int
    dip: float = 0.0  # density at the cut over the smaller of the two peaks (0: an empty valley)
    level: float = _RECEDED_BELOW  # the receded level the cut was placed at


def ashman_d(low: np.ndarray, high: np.ndarray) -> float:
    """Ashman's D between two samples (inf when both have zero spread but differ)."""
    spread = math.sqrt(float(low.var() + high.var()))
    diff = abs(float(high.mean() - low.mean()))
    if spread == 0:
        return math.inf if diff > 0 else 0.0
    return math.sqrt(2) * diff / spread


def sarle_bc(x: np.ndarray) -> float:
    """Sarle's bimodality coefficient (sample-size corrected)."""
    n = x.size
    sd = x.std()
    if n < 4 or sd == 0:
        return 0.0
    z = (x - x.mean()) / sd
    skew, kurt = float((z**3).mean()), float((z**4).mean()) - 3.0
    return (skew**2 + 1) / (kurt + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))


def bandwidths(logs: np.ndarray) -> np.ndarray:
    """Each sorted sample's kernel width: the distance to its ``k``-th nearest neighbour
    (``k = max(10, sqrt(n) / 2)``), clipped to [0.02, 0.25] decades.

    One width for all (Silverman's rule, used before) is set by the tightest large mode, and a
    sparse mode beside it fell apart into single-sample spikes with empty gaps between them,
    where a cut could land inside the mode; a width that follows the local spacing keeps a
    sparse mode whole and a tight one sharp.
    """
    n = logs.size
    k = min(n - 1, max(_NEIGHBOURS, int(math.sqrt(n) / 2)))
    i = np.arange(n)
    reach = np.full(n, np.inf)
    for j in range(k + 1):  # windows of k + 1 consecutive samples holding sample i
        start, end = i - j, i - j + k
        ok = (start >= 0) & (end < n)
        d = np.maximum(logs - logs[np.clip(start, 0, n - 1)], logs[np.clip(end, 0, n - 1)] - logs)
        reach = np.where(ok, np.minimum(reach, d), reach)
    return np.clip(reach, _MIN_WIDTH, _MAX_WIDTH)


def log_density(logs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive Gaussian kernel density of sorted ``logs`` on a grid: ``(grid, density)``.

    Binned: the samples are counted into bins of a quarter of the narrowest width, per width
    class (eight, geometric), and each class's counts are convolved with its sampled kernel, so
    the grid resolves every mode however many decades apart.
    """
    widths = bandwidths(logs)
    step = _MIN_WIDTH / _BINS_PER_BANDWIDTH
    pad = int(math.ceil(_KERNEL_REACH * _MAX_WIDTH / step)) + 1
    start = logs[0] - pad * step
    bins = int(math.ceil((logs[-1] - start) / step)) + pad + 1
    index = np.floor((logs - start) / step).astype(np.int64)
    classes = np.geomspace(_MIN_WIDTH, _MAX_WIDTH, _WIDTH_CLASSES)
    which = np.abs(np.log(widths)[:, None] - np.log(classes)[None, :]).argmin(1)
    density = np.zeros(bins)
    for c, h in enumerate(classes):
        counts = np.bincount(index[which == c], minlength=bins)[:bins]
        if counts.any():
            offsets = np.arange(-int(_KERNEL_REACH * h / step), int(_KERNEL_REACH * h / step) + 1)
            kernel = np.exp(-0.5 * (offsets * step / h) ** 2) / (h * math.sqrt(2 * math.pi))
            density += np.convolve(counts, kernel, mode="same")
    grid = start + (np.arange(bins) + 0.5) * step
    return grid, density / logs.size


def _peaks(density: np.ndarray) -> np.ndarray:
    inner = (density[1:-1] > density[:-2]) & (density[1:-1] >= density[2:])
    return np.flatnonzero(inner) + 1


def _basin_masses(grid: np.ndarray, logs: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Share of the samples in each peak's basin (between the minima around it)."""
    peaks = _peaks(density)
    bounds = [grid[0]]
    for a, b in zip(peaks[:-1], peaks[1:], strict=True):
        bounds.append(grid[a + int(np.argmin(density[a : b + 1]))])
    bounds.append(grid[-1] + 1.0)
    counts = np.diff(np.searchsorted(logs, bounds))
    return counts / logs.size


@dataclass(frozen=True)
class _Mode:
    """A run of significant peaks with no deep valley between them (grid indices)."""

    first: int  # its lowest peak
    last: int  # its highest peak
    top: int  # its tallest peak: where the mode lies


def _modes(density: np.ndarray, masses: np.ndarray, n: int) -> list[_Mode]:
    """The modes of ``density``, lowest first.

    A peak counts when its basin holds at least ``_MIN_MODE_SHARE`` of the groups and at least
    ``_MIN_MODE_COUNT`` of them (at 100 groups, 1% is one sample of a single mode's sparse tail,
    whose basin looked like a mode); neighbouring peaks belong to one mode unless the density
    between them falls to ``_MAX_DIP`` of the smaller one.
    """
    least = max(_MIN_MODE_SHARE, _MIN_MODE_COUNT / n)
    peaks = [int(p) for p, m in zip(_peaks(density), masses, strict=True) if m >= least]
    runs: list[list[int]] = [[p] for p in peaks[:1]]
    for a, b in zip(peaks[:-1], peaks[1:], strict=True):
        if density[a : b + 1].min() <= _MAX_DIP * min(density[a], density[b]):
            runs.append([])
        runs[-1].append(b)
    return [_Mode(r[0], r[-1], max(r, key=lambda p: density[p])) for r in runs]


def _no_mode(side: str, level: float, count: int, n: int) -> str:
    if count == 0:
        return f"no group is {side} the receded level {level:g}" + (
            ": training receded none of them" if side == "below" else ""
        )
    return (
        f"the {count} of {n} groups {side} the receded level {level:g} form no mode of their "
        f"own (a peak holding {_MIN_MODE_SHARE:.0%} of the groups and at least "
        f"{_MIN_MODE_COUNT} of them, with a valley dipping to {_MAX_DIP} of it towards the rest)"
    )


def split(
    values: Sequence[float] | np.ndarray, level: float = _RECEDED_BELOW
) -> tuple[Threshold | None, str]:
    """The valley between the receded modes (peaking below ``level``) and the kept ones, without
    judging their distance (``auto_threshold`` does); or None and why not."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size < 4:
        return None, f"need at least 4 importances to find a valley, got {v.size}"
    if not np.isfinite(v).all() or v[0] < 0:
        return None, "importances must be finite and non-negative"
    logs = np.log10(np.clip(v, _FLOOR, None))
    if logs[-1] - logs[0] < 1e-9:
        return None, "every importance is the same"
    grid, density = log_density(logs)
    modes = _modes(density, _basin_masses(grid, logs, density), v.size)
    at = math.log10(max(level, _FLOOR))
    receded = [m for m in modes if grid[m.top] < at]
    kept = modes[len(receded) :]
    if not receded or not kept:
        below = int(np.searchsorted(v, level))
        side, count = ("below", below) if not receded else ("above", v.size - below)
        return None, _no_mode(side, level, count, v.size)
    lo, hi = receded[-1], kept[0]
    valley = lo.last + int(np.argmin(density[lo.last : hi.first + 1]))
    k = min(max(int(np.searchsorted(logs, grid[valley])), 1), v.size - 1)
    low, high = logs[:k], logs[k:]
    return Threshold(
        value=float(10 ** ((low[-1] + high[0]) / 2)),
        bimodality=sarle_bc(logs),
        separation=ashman_d(low, high),
        decades=float(grid[hi.top] - grid[lo.top]),
        gap=float(v[k] - v[k - 1]),
        below=k,
        above=int(v.size - k),
        dip=float(density[valley] / min(density[lo.last], density[hi.first])),
        level=level,
    ), ""


_ADVICE = (
    "train longer or set train.target (the share of channel groups to recede), or set "
    "prune.threshold=ratio with prune.ratio=0.5 (or another fraction; on `recede prune`, "
    "--threshold ratio --ratio 0.5), or prune.threshold to an importance inside the valley you see"
)


def auto_threshold(
    values: Sequence[float] | np.ndarray,
    *,
    min_decades: float = 1.0,
    receded_below: float | None = None,
) -> Threshold:
    """The valley under the modes training receded, or ``NotBimodalError`` with advice.

    Args:
        values: one importance per channel group.
        min_decades: the least distance between the peaks of the modes on either side.
        receded_below: the importance under which training counted a group as receded
            (``train.receded_below``); None when the training is unknown: its default, 0.01.
            The modes peaking below it are the receded ones.
    """
    level = _RECEDED_BELOW if receded_below is None else float(receded_below)
    result, why = split(values, level)
    if result is None:
        raise NotBimodalError(
            f"importance distribution is not bimodal at the receded level {level:g} ({why}); "
            f"{_ADVICE}"
        )
    if result.decades < min_decades:
        raise NotBimodalError(
            f"the modes on either side of the receded level {level:g} are only "
            f"{result.decades:.2f} decades apart (needs >= {min_decades}): the weak channels "
            f"are not weak enough to drop; {_ADVICE}"
        )
    return result


def importance_summary(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Per-epoch log line: fraction below 0.05, above 0.5, and Sarle's bimodality coefficient."""
    v = np.asarray(values, dtype=np.float64).ravel()
    bc = sarle_bc(np.log10(np.clip(v, _FLOOR, None))) if v.size >= 4 else 0.0
    return {
        "below_0.05": float((v < 0.05).mean()),
        "above_0.5": float((v > 0.5).mean()),
        "bimodality": bc,
    }
