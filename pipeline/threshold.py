"""Where to cut: the valley of the bimodal importance distribution, or a refusal.

Method: Otsu's threshold on log10(importance). Polarised training pushes weak channels towards 0
over several orders of magnitude while strong ones cluster near their plateau, so the two modes
separate in log space, not in linear space. Otsu maximises the between-class variance, which for
two modes lands in the valley between them; it has no bandwidth to tune (unlike a histogram
valley) and no iterative fit that can collapse (unlike a two-component mixture). The cut is then
placed at the geometric middle of the empty gap around Otsu's split.

Bimodality is Sarle's bimodality coefficient of the log importances,
``BC = (skew^2 + 1) / (excess_kurtosis + 3 (n-1)^2 / ((n-2)(n-3)))``: 1/3 for a normal
distribution, 5/9 for a uniform one, towards 1 for two separated modes. Below
``min_bimodality`` (0.6, just above uniform) the distribution is refused with advice to use a
ratio. Ashman's D of the two Otsu classes is reported as ``separation`` (it alone cannot refuse:
any hard split of a unimodal sample has a large D). A split is also refused when the two modes'
log-means are less than ``min_decades`` apart (default 1: weak channels at least 10x weaker):
two close bumps around 0.5 are bimodal, yet cutting between them removes channels that matter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_FLOOR = 1e-12


class NotBimodalError(ValueError):
    """The importances have no clear valley; a fixed ratio must be chosen instead."""


@dataclass(frozen=True)
class Threshold:
    """An automatic cut and the evidence for it."""

    value: float
    bimodality: float  # Sarle's coefficient of log10 importances
    separation: float  # Ashman's D of the two classes in log10 space
    decades: float  # distance between the two classes' log10 means
    gap: float  # empty interval around the cut, in importance units
    below: int
    above: int


def _otsu(logs: np.ndarray) -> int:
    """Index k such that sorted logs[:k] / logs[k:] is Otsu's split."""
    n = len(logs)
    csum = np.cumsum(logs)
    k = np.arange(1, n)
    w0, w1 = k / n, (n - k) / n
    m0 = csum[:-1] / k
    m1 = (csum[-1] - csum[:-1]) / (n - k)
    between = w0 * w1 * (m0 - m1) ** 2
    return int(np.argmax(between)) + 1


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


def split(values: Sequence[float] | np.ndarray) -> Threshold:
    """Otsu split in log space, without judging whether it is bimodal."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size < 4:
        raise NotBimodalError(f"need at least 4 importances to find a valley, got {v.size}")
    logs = np.log10(np.clip(v, _FLOOR, None))
    k = _otsu(logs)
    low, high = logs[:k], logs[k:]
    cut = 10 ** ((low[-1] + high[0]) / 2)
    decades = float(high.mean() - low.mean())
    return Threshold(
        float(cut),
        sarle_bc(logs),
        ashman_d(low, high),
        decades,
        float(v[k] - v[k - 1]),
        k,
        int(v.size - k),
    )


def auto_threshold(
    values: Sequence[float] | np.ndarray, *, min_bimodality: float = 0.6, min_decades: float = 1.0
) -> Threshold:
    """The valley between the two modes, or ``NotBimodalError`` with advice."""
    result = split(values)
    if result.bimodality >= min_bimodality and result.decades < min_decades:
        raise NotBimodalError(
            f"the two importance modes are only {result.decades:.2f} decades apart (needs >= {min_decades}): "
            "the weak channels are not weak enough to drop; train longer or with a stronger penalty, or set "
            "prune.threshold=ratio with prune.ratio=0.5 (or another fraction)"
        )
    if result.bimodality < min_bimodality:
        raise NotBimodalError(
            f"importance distribution is not bimodal (Sarle's coefficient {result.bimodality:.2f}, needs >= "
            f"{min_bimodality}; 0.56 is a uniform spread); train longer or with a stronger penalty, or set prune.threshold=ratio "
            "with prune.ratio=0.5 (or another fraction)"
        )
    return result


def importance_summary(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Per-epoch log line: fraction below 0.05, above 0.5, and Sarle's bimodality coefficient."""
    v = np.asarray(values, dtype=np.float64).ravel()
    d = split(v).bimodality if v.size >= 4 else 0.0
    return {
        "below_0.05": float((v < 0.05).mean()),
        "above_0.5": float((v > 0.5).mean()),
        "bimodality": d,
    }
