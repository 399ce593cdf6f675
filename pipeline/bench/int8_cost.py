"""What the INT8 fallback's float layers cost: the all-INT8 graph against the one with tensors
kept in float, timed interleaved on ONNX Runtime's CPU provider.

``pipeline.export.int8_export`` takes this as its ``latency_cost`` (``export/`` does not import
the bench). One thread on the CPU clock, batch 1 and 32, :data:`RUNS` runs: enough to say
whether the kept tensors cost a few percent or most of INT8's gain, not a figure for a table
(``recede bench`` times the shipped graph properly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.bench.artefacts import Artefact, onnx_input
from pipeline.bench.sweep import SweepConfig, measure_interleaved
from pipeline.bench.timing import QUICK_MIN_RUNS, Setting, speedup_ratio

RUNS = 4 * QUICK_MIN_RUNS
BATCHES = (1, 32)


def fallback_latency(all_int8: Path, kept: Path) -> dict[str, Any]:
    """p50 of both graphs per batch and how much slower the kept graph is (its block ratios'
    median, low and high)."""
    shape, _ = onnx_input(all_int8)
    pair = [
        Artefact("all-int8", str(all_int8), shape, None, all_int8, precision="int8"),
        Artefact("fallback", str(kept), shape, None, kept, precision="int8"),
    ]
    cfg = SweepConfig(BATCHES, threads=1, runs=RUNS, warmup=5, clock="cpu")
    setting = Setting("onnxruntime", "cpu", "session")
    rows = {}
    for batch in BATCHES:
        first, second = measure_interleaved(pair, setting, cfg, batch)
        ratio = speedup_ratio(second, {(first.setting, batch, 1): first})
        rows[str(batch)] = {
            "all_int8_p50_ms": first.p50_ms,
            "fallback_p50_ms": second.p50_ms,
            "slowdown": None if ratio is None else 1 / ratio.median,
            "slowdown_range": None if ratio is None else [1 / ratio.high, 1 / ratio.low],
        }
    return {"backend": "onnxruntime cpu", "threads": 1, "clock": "cpu", "runs": RUNS, **rows}
