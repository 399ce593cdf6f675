"""Where to cut: the valley of the bimodal importance distribution, or a refusal.

Method: a Gaussian kernel density of log10(importance) on a fine grid. Polarised training pushes
weak channels towards 0 over several orders of magnitude while strong ones cluster near their
plateau, so the two modes separate in log space, not in linear space. The *top* mode is the
strongest-importance peak that holds at least 1% of the groups in its basin; the cut is the
lowest point of the density between it and the nearest significant peak below it whose valley
is deep enough, moved to the middle (in log space) of the empty gap between the samples around
it. Anchoring on the top mode keeps every weak cluster below the cut when the weak side is split
(exact zeros from a clamp or a shrink, plus tiny non-zero values).

Why not Otsu (the previous method): it maximises the between-class variance, so when the weak
mode spans several decades (what a receding avalanche produces) its best split lands inside the
weak mode, not in the valley.

Refusals (``NotBimodalError``, with advice to use a ratio):

- one mode: no second peak whose dip (the density between the peaks) falls to at most
  ``_MAX_DIP`` (0.1) of the lower peak, among modes holding at least 1% of the groups and at
  least ``_MIN_MODE_COUNT`` (5) of them. A skewed single mode, such as ``sigmoid(N(0, 3))``,
  has a long tail but no dip;
- modes too close: the two sides' log-means are less than ``min_decades`` (1) apart. Two close
  bumps around 0.5 are bimodal, yet cutting between them removes channels that matter.

The bandwidth is Silverman's rule on the log values, clipped to [0.02, 0.25] decades, so a mode
that spans many decades is not smoothed into its neighbour. Sarle's bimodality coefficient and
Ashman's D of the two sides are reported as evidence; they do not decide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_FLOOR = 1e-30
_GRID = 1024
_MIN_MODE_SHARE = 0.01
_MIN_MODE_COUNT = 5  # below ~300 groups 1% is 1-3 groups, and a lone tail sample made a "mode"
_RECEDED_BELOW = 0.01  # train.receded_below's default: under it a group counts as receded
_MAX_DISAGREEMENT = 0.25  # share of the groups by which the cut may differ from the receded set
_MAX_DIP = 0.1


class NotBimodalError(ValueError):
    """The importances have no clear valley; a fixed ratio must be chosen instead."""


@dataclass(frozen=True)
class Threshold:
    """An automatic cut and the evidence for it."""

    value: float
    bimodality: float  # Sarle's coefficient of log10 importances
    separation: float  # Ashman's D of the two sides in log10 space
    decades: float  # distance between the two sides' log10 means
    gap: float  # empty interval around the cut, in importance units
    below: int
    above: int
    dip: float = 0.0  # density at the cut over the smaller mode's peak (0: an empty valley)
    main_mode: float = 0.0  # importance at the peak of the mode holding the most groups
    main_share: float = 0.0  # the share of the groups that mode holds


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


def log_density(logs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian kernel density of sorted ``logs`` on a grid: ``(grid, density)``."""
    iqr = float(np.subtract(*np.percentile(logs, [75, 25])))
    spread = min(float(logs.std()), iqr / 1.34) or float(logs.std()) or 1.0
    h = float(np.clip(0.9 * spread * logs.size ** (-0.2), 0.02, 0.25))
    grid = np.linspace(logs[0] - 3 * h, logs[-1] + 3 * h, _GRID)
    density = np.zeros_like(grid)
    for chunk in np.array_split(logs, max(1, logs.size // 4096)):
        density += np.exp(-0.5 * ((grid[:, None] - chunk[None, :]) / h) ** 2).sum(1)
    return grid, density / (logs.size * h * math.sqrt(2 * math.pi))


def _peaks(density: np.ndarray) -> np.ndarray:
    inner = (density[1:-1] > density[:-2]) & (density[1:-1] >= density[2:])
    return np.flatnonzero(inner) + 1


def _two_modes(density: np.ndarray, masses: np.ndarray, n: int) -> tuple[int, int, int] | None:
    """``(low_peak, valley, top_peak)`` grid indices, or None.

    The top mode is the strongest-importance peak holding at least ``_MIN_MODE_SHARE`` of the
    groups and at least ``_MIN_MODE_COUNT`` of them (at 100 groups, 1% is one sample of a
    single mode's sparse tail, whose basin looked like a mode); the cut is the first valley
    below it deep enough against some significant peak further down. Anchoring on the top mode
    (not the tallest peak) matters when the weak side is itself split, say exact zeros plus a
    cluster of tiny values: the cut must keep every weak cluster below it.
    """
    peaks = _peaks(density)
    least = max(_MIN_MODE_SHARE, _MIN_MODE_COUNT / n)
    significant = [int(p) for p, m in zip(peaks, masses, strict=True) if m >= least]
    if len(significant) < 2:
        return None
    top = significant[-1]
    for low in reversed(significant[:-1]):
        valley = low + int(np.argmin(density[low : top + 1]))
        if density[valley] <= _MAX_DIP * min(density[low], density[top]):
            return low, valley, top
    return None


def _basin_masses(grid: np.ndarray, logs: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Share of the samples in each peak's basin (between the minima around it)."""
    peaks = _peaks(density)
    bounds = [grid[0]]
    for a, b in zip(peaks[:-1], peaks[1:], strict=True):
        bounds.append(grid[a + int(np.argmin(density[a : b + 1]))])
    bounds.append(grid[-1] + 1.0)
    counts = np.diff(np.searchsorted(logs, bounds))
    return counts / logs.size


def split(values: Sequence[float] | np.ndarray) -> tuple[Threshold | None, str]:
    """The valley between the two main modes, without judging it; or None and why not."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size < 4:
        return None, f"need at least 4 importances to find a valley, got {v.size}"
    logs = np.log10(np.clip(v, _FLOOR, None))
    if logs[-1] - logs[0] < 1e-9:
        return None, "every importance is the same"
    grid, density = log_density(logs)
    masses = _basin_masses(grid, logs, density)
    modes = _two_modes(density, masses, v.size)
    if modes is None:
        return None, (
            f"no valley dips to {_MAX_DIP} of the peaks around it between two modes that each "
            f"hold {_MIN_MODE_SHARE:.0%} of the groups and at least {_MIN_MODE_COUNT} of them"
        )
    lo, valley, hi = modes
    k = int(np.searchsorted(logs, grid[valley]))
    k = min(max(k, 1), v.size - 1)
    low, high = logs[:k], logs[k:]
    return Threshold(
        value=float(10 ** ((low[-1] + high[0]) / 2)),
        bimodality=sarle_bc(logs),
        separation=ashman_d(low, high),
        decades=float(high.mean() - low.mean()),
        gap=float(v[k] - v[k - 1]),
        below=k,
        above=int(v.size - k),
        dip=float(density[valley] / min(density[lo], density[hi])),
        main_mode=float(10 ** grid[_peaks(density)[int(np.argmax(masses))]]),
        main_share=float(masses.max()),
    ), ""


_ADVICE = (
    "train longer or set train.target (the share of channel groups to recede), or set "
    "prune.threshold=ratio with prune.ratio=0.5 (or another fraction; on `recede prune`, "
    "--threshold ratio --ratio 0.5)"
)


def auto_threshold(
    values: Sequence[float] | np.ndarray,
    *,
    min_decades: float = 1.0,
    receded_below: float | None = None,
) -> Threshold:
    """The valley between the two modes, or ``NotBimodalError`` with advice.

    Args:
        values: one importance per channel group.
        min_decades: the least distance between the two sides' log-means.
        receded_below: the importance under which training counted a group as receded
            (``train.receded_below``), when the caller knows the model was trained that way:
            a cut that drops a share of the groups far (``_MAX_DISAGREEMENT``) from the share
            below it is refused. None: the model's training is unknown, and only the majority
            mode is checked, against the default level 0.01.
    """
    result, why = split(values)
    if result is None:
        raise NotBimodalError(f"importance distribution is not bimodal ({why}); {_ADVICE}")
    if result.decades < min_decades:
        raise NotBimodalError(
            f"the two importance modes are only {result.decades:.2f} decades apart (needs >= "
            f"{min_decades}): the weak channels are not weak enough to drop; {_ADVICE}"
        )
    _check_majority_kept(result, receded_below or _RECEDED_BELOW)
    if receded_below is not None:
        _check_agrees_with_training(result, values, receded_below)
    return result


def _check_majority_kept(cut: Threshold, receded_below: float) -> None:
    """Refuse a cut that drops the mode holding the most groups while that mode has not receded.

    A small strong cluster above the bulk (one layer at |gamma| 1.5 over an L1-trained bulk at
    0.03) has a valley below it too; cutting there removed 97% of the network.
    """
    if receded_below <= cut.main_mode < cut.value:
        n = cut.below + cut.above
        raise NotBimodalError(
            f"the valley at {cut.value:.3g} would drop the largest mode ({cut.main_share:.0%} "
            f"of {n} groups, around {cut.main_mode:.3g}, above {receded_below:g} where a group "
            f"counts as receded) and keep {cut.above}: that mode is the network, not the "
            f"receded channels; {_ADVICE}"
        )


def _check_agrees_with_training(
    cut: Threshold, values: Sequence[float] | np.ndarray, receded_below: float
) -> None:
    """Refuse a cut whose dropped share is far from the share training receded."""
    v = np.asarray(values, dtype=np.float64).ravel()
    receded = int((v < receded_below).sum())
    if abs(cut.below - receded) > _MAX_DISAGREEMENT * v.size:
        raise NotBimodalError(
            f"the valley at {cut.value:.3g} would drop {cut.below} of {v.size} groups, but "
            f"training receded {receded} (importance below train.receded_below "
            f"{receded_below:g}); a cut that far from the receded set (more than "
            f"{_MAX_DISAGREEMENT:.0%} of the groups) is not the valley training made; {_ADVICE}"
        )


def importance_summary(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Per-epoch log line: fraction below 0.05, above 0.5, and Sarle's bimodality coefficient."""
    v = np.asarray(values, dtype=np.float64).ravel()
    bc = sarle_bc(np.log10(np.clip(v, _FLOOR, None))) if v.size >= 4 else 0.0
    return {
        "below_0.05": float((v < 0.05).mean()),
        "above_0.5": float((v > 0.5).mean()),
        "bimodality": bc,
    }
