"""One-thread rows record CPU time beside wall time, and a wall row that waited is ``preempted``."""

from __future__ import annotations

import importlib.util
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from torch import nn

from pipeline.bench.artefacts import Artefact
from pipeline.bench.backends import bench_onnxruntime, bench_torch
from pipeline.bench.preemption import PREEMPT_LIMIT, clock_p50s, is_preempted
from pipeline.bench.sweep import SweepConfig, bench_report, plan_settings, sweep
from pipeline.bench.timed_runs import HostTimer, host_samples_ms
from pipeline.bench.timing import LatencyRow, latency_markdown, noise_note


def _row(wall: float | None, cpu: float | None, clock: str = "wall", threads: int = 1):
    labels = {"backend": "torch", "device": "cpu", "model": "dense", "batch": 32}
    return LatencyRow.from_blocks(
        [[wall or 1.0] * 10] * 5,  # 50 runs: not a quick look
        **labels,
        threads=threads,
        clock=clock,
        wall_p50_ms=wall,
        cpu_p50_ms=cpu,
    )


def test_a_wall_row_whose_wall_time_exceeds_the_bound_is_flagged_everywhere() -> None:
    # The reported case: 65.7 ms beside other work against 21.4 ms of CPU, noise 9%, no flag.
    waited = _row(65.7, 21.4)
    assert waited.preempted and not waited.noisy
    as_dict = waited.to_dict()
    assert as_dict["preempted"] is True
    assert as_dict["wall_p50_ms"] == 65.7 and as_dict["cpu_p50_ms"] == 21.4
    assert LatencyRow.from_mapping(as_dict).preempted
    table = latency_markdown([waited])
    assert table.splitlines()[-1].endswith("| preempted |")
    note = noise_note([waited])
    assert note is not None and "1 of 1 rows are preempted" in note and "wall 65.700 ms" in note


@pytest.mark.parametrize(
    ("wall", "cpu", "clock", "flagged"),
    [
        (PREEMPT_LIMIT * 1.01, 1.0, "wall", True),  # just above the bound
        (PREEMPT_LIMIT * 0.99, 1.0, "wall", False),  # just below it
        (3.0, 1.0, "cpu", False),  # the figure is the CPU time: the waiting is not in it
        (3.0, None, "wall", False),  # a multi-thread row: no CPU time recorded, not judged
    ],
)
def test_the_flag_follows_the_bound_and_the_clock(wall, cpu, clock, flagged) -> None:
    assert _row(wall, cpu, clock).preempted is flagged
    assert is_preempted(clock, wall, cpu) is flagged


def test_host_samples_read_both_clocks_around_the_same_run() -> None:
    pairs: list[tuple[float, float]] = []
    samples = host_samples_ms(lambda: time.sleep(0.01), warmup=1, runs=3, pairs=pairs)
    assert len(pairs) == 3 and samples == [w for w, _ in pairs]  # warm-up not recorded
    assert all(wall >= 10.0 > 5.0 > cpu for wall, cpu in pairs)  # a sleep holds no CPU
    cpu_clock = host_samples_ms(lambda: None, warmup=0, runs=2, clock="cpu", pairs=pairs)
    assert cpu_clock == [c for _, c in pairs[-2:]]
    assert clock_p50s([]) is None and clock_p50s([(2.0, 1.0), (4.0, 1.0), (3.0, 2.0)]) == (3, 1)
    with pytest.raises(ValueError, match="without sync"):
        host_samples_ms(lambda: None, warmup=0, runs=1, sync=lambda: None, pairs=[])


def _sleepy_open(both: bool):
    @contextmanager
    def open_timer(a: Artefact, s, cfg: SweepConfig, batch: int):
        yield HostTimer(lambda: time.sleep(0.002), clock=cfg.clock, both=both), s.precision

    return open_timer


def test_a_sweep_records_the_clocks_of_one_thread_rows_and_flags_waiting() -> None:
    # A sleep stands in for a run that waits for its core: its wall time is all waiting.
    artefacts = [Artefact("dense", "d", (3, 8, 8), nn.Conv2d(3, 4, 3), None)]
    cfg = SweepConfig(batches=(1,), threads=1, runs=5, warmup=1)
    (row,) = sweep(artefacts, plan_settings(backends=["torch"]), cfg, _sleepy_open(True))
    assert row.wall_p50_ms >= 2.0 > row.cpu_p50_ms and row.preempted
    report = bench_report([row], artefacts, cfg)
    assert report["rows"][0]["preempted"] and "preempted" in report["rows"][0]["flags"]
    (alone,) = sweep(artefacts, plan_settings(backends=["torch"]), cfg, _sleepy_open(False))
    assert alone.cpu_p50_ms is None and not alone.preempted


def test_the_torch_and_onnxruntime_timers_read_both_clocks_with_one_thread_only(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    one = bench_torch(net, (3, 8, 8), batch=1, threads=1, runs=5, warmup=1)
    two = bench_torch(net, (3, 8, 8), batch=1, threads=2, runs=5, warmup=1)
    assert one.cpu_p50_ms > 0 and one.wall_p50_ms > 0 and two.cpu_p50_ms is None
    pytest.importorskip("onnxruntime")
    import torch

    from pipeline.export.onnx import export_onnx

    path = export_onnx(net.eval(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    one = bench_onnxruntime(path, (3, 8, 8), batch=1, threads=1, runs=5, warmup=1)
    two = bench_onnxruntime(path, (3, 8, 8), batch=1, threads=2, runs=5, warmup=1)
    assert one.cpu_p50_ms > 0 and two.cpu_p50_ms is None


# --- benchmarks/preemption_ratio.py: the figures behind the bound ---------------------------------


def _ratio_script():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "preemption_ratio.py"
    spec = importlib.util.spec_from_file_location("preemption_ratio", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["preemption_ratio"] = module
    spec.loader.exec_module(module)
    return module


def test_the_ratio_script_gives_the_ratio_of_the_medians_and_the_shares_above_each_bound():
    line = _ratio_script().ratio_line([(2.0, 1.0), (4.0, 1.0), (3.0, 2.0), (1.1, 1.0)], batch=8)
    assert line.startswith("batch 8: wall p50 2.500 ms, cpu p50 1.000 ms, ratio of p50s 2.50")
    assert line.endswith("runs above 1.2/1.5/2.0: 75%/50%/25%")


def test_the_ratio_script_runs_and_prints_one_line_per_batch(capsys) -> None:
    assert _ratio_script().main(["--runs", "2", "--batches", "1", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["batch 1", "batch 2"]
