"""benchmarks/preemption_ratio.py: the figures behind the ``preempted`` bound."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "preemption_ratio", ROOT / "benchmarks" / "preemption_ratio.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["preemption_ratio"] = module
    spec.loader.exec_module(module)
    return module


def test_the_line_gives_the_ratio_of_the_medians_and_the_shares_above_each_bound() -> None:
    line = _load().ratio_line([(2.0, 1.0), (4.0, 1.0), (3.0, 2.0), (1.1, 1.0)], batch=8)
    assert line.startswith("batch 8: wall p50 2.500 ms, cpu p50 1.000 ms, ratio of p50s 2.50")
    assert line.endswith("runs above 1.2/1.5/2.0: 75%/50%/25%")


def test_it_runs_and_prints_one_line_per_batch(capsys) -> None:
    assert _load().main(["--runs", "2", "--batches", "1", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["batch 1", "batch 2"]
