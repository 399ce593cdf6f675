"""Compare a bench report with a stored baseline: the slowdowns that exceed a threshold beyond noise.

A release gate that fails on noise is switched off after its first false alarm, so a row fails
only when the lower quartile of its block medians is slower than ``max_slowdown`` times the
baseline's upper quartile: the two measurements' interquartile ranges, not their medians, must be
that far apart (quartiles, so one outlier block cannot hide or fake a regression). Rows are matched
by model, backend, device, mode, precision, batch, threads and clock; rows on one side only are
reported (:func:`missing_rows`). What a baseline must hold before it is compared at all (its
values, its noise, its machine and models) is checked by :mod:`pipeline.bench.baseline`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.bench.interleave import quartiles

DEFAULT_MAX_SLOWDOWN = 1.2
KEY_FIELDS = ("model", "backend", "device", "mode", "precision", "batch", "threads", "clock")


class BaselineError(ValueError):
    """A ``--compare`` baseline cannot be compared with this bench (CLI exit 2): missing, not a
    bench report, holding invalid or noisy rows, from another machine or model, or sharing no
    row with the new measurement."""


@dataclass(frozen=True)
class Slowdown:
    """One row's new latency against the baseline.

    Attributes:
        key: The row's identity, e.g. ``pruned onnxruntime cpu session fp32 batch 1 threads 2``.
        old_ms: Baseline p50.
        new_ms: New p50.
        ratio: ``new_ms / old_ms`` (above 1: slower).
        beyond_noise: The new lower quartile over the baseline's upper quartile (of block
            medians): the smallest slowdown the two measurements' spreads allow.
    """

    key: str
    old_ms: float
    new_ms: float
    ratio: float
    beyond_noise: float

    def describe(self) -> str:
        return (
            f"{self.key}: {self.old_ms:.3f} -> {self.new_ms:.3f} ms p50 ({self.ratio:.2f}x; "
            f"{self.beyond_noise:.2f}x beyond the measured noise)"
        )


def row_key(row: Mapping[str, Any]) -> str:
    """A row's identity, e.g. ``pruned onnxruntime cpu session fp32 batch 1 threads 1 cpu
    clock`` (the clock said only when it is not the wall clock)."""
    model, backend, device, mode, precision, batch, threads = (row.get(k) for k in KEY_FIELDS[:-1])
    clock = row.get("clock") or "wall"
    key = f"{model} {backend} {device} {mode} {precision} batch {batch} threads {threads}"
    return key if clock == "wall" else f"{key} {clock} clock"


def _range_ms(row: Mapping[str, Any]) -> tuple[float, float]:
    """The quartiles of the block medians; a row without blocks spans p50 to p90."""
    blocks = [float(b) for b in row.get("blocks_ms") or ()]
    if blocks:
        low, _, high = quartiles(blocks)
        return low, high
    return float(row["p50_ms"]), float(row.get("p90_ms", row["p50_ms"]))


def compare_rows(
    new: Sequence[Mapping[str, Any]],
    old: Sequence[Mapping[str, Any]],
    max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
) -> tuple[list[Slowdown], int]:
    """The rows of ``new`` slower than ``max_slowdown`` times ``old`` beyond the noise.

    Returns:
        The failing rows (see the module docstring) and how many rows were compared.

    Raises:
        BaselineError: If no row of ``new`` has a counterpart in ``old``.
    """
    baseline = {row_key(r): r for r in old}
    matched = [(r, baseline[row_key(r)]) for r in new if row_key(r) in baseline]
    if not matched:
        raise BaselineError(
            f"--compare: none of the {len(new)} new rows matches one of the baseline's "
            f"{len(old)} (by {', '.join(KEY_FIELDS)}); expected the same models, backends and "
            "batches; recreate the baseline with --save-baseline"
        )
    failing = []
    for row, ref in matched:
        ratio = float(row["p50_ms"]) / float(ref["p50_ms"])
        beyond = _range_ms(row)[0] / _range_ms(ref)[1]
        if beyond > max_slowdown:
            failing.append(
                Slowdown(row_key(row), float(ref["p50_ms"]), float(row["p50_ms"]), ratio, beyond)
            )
    return failing, len(matched)


def missing_rows(
    new: Sequence[Mapping[str, Any]], old: Sequence[Mapping[str, Any]]
) -> tuple[list[str], list[str]]:
    """The keys of the rows of ``new`` that ``old`` lacks, and of ``old``'s rows ``new`` lacks."""
    new_keys, old_keys = [row_key(r) for r in new], [row_key(r) for r in old]
    return [k for k in new_keys if k not in set(old_keys)], [
        k for k in old_keys if k not in set(new_keys)
    ]
