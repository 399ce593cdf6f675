"""The bench clock: ``wall`` (elapsed time) or ``cpu`` (the thread's CPU time, one thread only)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
from torch import nn

from pipeline.bench.artefacts import Artefact
from pipeline.bench.latency_gate import BaselineError, compare_rows
from pipeline.bench.sweep import SweepConfig, plan_settings, sweep
from pipeline.bench.timed_runs import host_samples_ms
from pipeline.bench.timing import LatencyRow, latency_markdown
from pipeline.cli.main import main
from pipeline.config import BenchConfig, ConfigError


def test_the_cpu_clock_leaves_out_time_spent_waiting() -> None:
    # A sleep holds no CPU: 20 ms on the wall clock, next to nothing on the thread's CPU clock.
    # (The wall clock can only read longer than the sleep, however loaded the machine.)
    def nap() -> None:
        time.sleep(0.02)

    assert min(host_samples_ms(nap, warmup=0, runs=3, clock="wall")) >= 20.0
    assert max(host_samples_ms(nap, warmup=0, runs=3, clock="cpu")) < 10.0


def test_the_cpu_clock_counts_work() -> None:
    def work() -> None:
        sum(i * i for i in range(200_000))

    assert min(host_samples_ms(work, warmup=0, runs=3, clock="cpu")) > 0.5


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"clock": "cpu", "threads": 2}, "needs threads=1"),
        ({"clock": "tsc", "threads": 1}, "expected clock 'wall' or 'cpu'"),
    ],
)
def test_a_clock_that_cannot_time_the_setting_is_refused(kwargs, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        SweepConfig(**kwargs)
    with pytest.raises(ValueError, match="without sync"):
        host_samples_ms(lambda: None, warmup=0, runs=1, sync=lambda: None, clock="cpu")


def test_the_config_names_the_key() -> None:
    assert BenchConfig(threads=1, clock="cpu").clock == "cpu"
    with pytest.raises(ConfigError, match="bench.clock 'cpu' .* needs bench.threads 1, got 2"):
        BenchConfig(threads=2, clock="cpu")
    with pytest.raises(ConfigError, match="bench.clock must be 'wall' or 'cpu'"):
        BenchConfig(threads=1, clock="cycles")


def test_bench_refuses_the_cpu_clock_with_threads_before_any_work(tmp_path, capsys) -> None:
    missing = tmp_path / "never-read"  # the flags are checked before the model is opened
    assert main(["bench", str(missing), "--clock", "cpu", "--threads", "2"]) == 2
    err = capsys.readouterr().err
    assert "--clock cpu --threads 2" in err and "needs threads=1" in err
    assert str(missing) not in err


def _fake_open():
    @contextmanager
    def open_timer(a: Artefact, s, cfg: SweepConfig, batch: int):
        yield (lambda n: [2.0 if a.label == "dense" else 1.0] * n), s.precision

    return open_timer


def test_cpu_rows_say_their_clock_and_cuda_rows_stay_on_the_wall() -> None:
    artefacts = [
        Artefact("dense", "d", (3, 8, 8), nn.Conv2d(3, 4, 3), None),
        Artefact("pruned", "p", (3, 8, 8), nn.Conv2d(3, 2, 3), None),
    ]
    cfg = SweepConfig(batches=(1,), threads=1, runs=50, clock="cpu")
    rows = sweep(artefacts, plan_settings(cuda=True), cfg, _fake_open())
    assert {(r.device, r.clock) for r in rows} == {("cpu", "cpu"), ("cuda", "wall")}
    table = latency_markdown(rows)
    assert table.count("1 (cpu clock)") == 2  # the dense and pruned CPU rows
    assert LatencyRow.from_mapping(rows[0].to_dict()).clock == "cpu"


def test_the_gate_compares_a_clock_only_with_the_same_clock() -> None:
    def row(clock: str | None) -> dict:
        labels = {"backend": "torch", "device": "cpu", "model": "m", "batch": 1, "threads": 1}
        out = LatencyRow.from_blocks([[1.0]] * 5, **labels, clock=clock or "wall").to_dict()
        if clock is None:
            del out["clock"]  # a baseline written before clocks existed timed the wall clock
        return out

    assert compare_rows([row("wall")], [row(None)], 1.2)[1] == 1
    with pytest.raises(BaselineError, match="none of the 1 new rows matches"):
        compare_rows([row("cpu")], [row(None)], 1.2)
