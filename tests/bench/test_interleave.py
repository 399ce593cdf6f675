"""Interleaved timing and its statistics, on a fake clock: blocks, order, ratios, noise, flags."""

from __future__ import annotations

import statistics

import pytest

from pipeline.bench.interleave import block_ratio, block_sizes, interleave, relative_spread
from pipeline.bench.timing import (
    NOISE_LIMIT,
    LatencyRow,
    annotated_rows,
    latency_markdown,
    noise_note,
)


class FakeMachine:
    """A clock whose load changes with the number of runs so far: runs after ``switch`` take
    ``factor`` times as long, as when another process starts halfway through a sweep."""

    def __init__(self, switch: int, factor: float) -> None:
        self.calls, self.switch, self.factor, self.log = 0, switch, factor, []

    def timer(self, name: str, ms: float):
        def run(n: int) -> list[float]:
            self.log.append((name, n))
            out = []
            for _ in range(n):
                self.calls += 1
                out.append(ms * (self.factor if self.calls > self.switch else 1.0))
            return out

        return run


def test_block_sizes_split_runs_evenly() -> None:
    assert block_sizes(50) == [5] * 10
    assert block_sizes(5) == [1] * 5
    assert block_sizes(23) == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="runs >= 1"):
        block_sizes(0)


def test_interleave_warms_up_then_alternates_the_order() -> None:
    machine = FakeMachine(switch=10**9, factor=1.0)
    timers = [machine.timer("a", 1.0), machine.timer("b", 2.0)]
    samples = interleave(timers, runs=6, warmup=3, max_blocks=3)
    assert machine.log == [
        ("a", 3), ("b", 3),  # warm-up
        ("a", 2), ("b", 2), ("b", 2), ("a", 2), ("a", 2), ("b", 2),
    ]  # fmt: skip
    assert samples == [[[1.0, 1.0]] * 3, [[2.0, 2.0]] * 3]


def test_interleaving_cancels_a_load_change_that_timing_one_after_the_other_does_not() -> None:
    # dense takes 4 ms, pruned 1 ms: the true speed-up is 4.0. The load triples halfway.
    machine = FakeMachine(switch=100, factor=3.0)
    dense, pruned = machine.timer("dense", 4.0), machine.timer("pruned", 1.0)
    one_after_other = statistics.median(dense(100)) / statistics.median(pruned(100))
    assert one_after_other == pytest.approx(4.0 / 3.0)  # the load change, not the model

    machine = FakeMachine(switch=100, factor=3.0)
    timers = [machine.timer("dense", 4.0), machine.timer("pruned", 1.0)]
    blocks = interleave(timers, runs=100, warmup=0)
    rows = [
        LatencyRow.from_blocks(b, backend="torch", device="cpu", model=m, batch=1, threads=1)
        for m, b in zip(("dense", "pruned"), blocks, strict=True)
    ]
    ratio = block_ratio(rows[0].blocks_ms, rows[1].blocks_ms)
    assert (ratio.median, ratio.low, ratio.high) == (4.0, 4.0, 4.0)
    assert rows[0].blocks_ms == (4.0,) * 5 + (12.0,) * 5
    assert rows[0].noise == pytest.approx((12.0 - 4.0) / 8.0)
    assert rows[0].noisy and rows[1].noisy  # the absolute latencies moved 3x: both marked


def test_relative_spread_and_block_ratio() -> None:
    assert relative_spread([10.0]) == 0.0
    assert relative_spread([9.0, 10.0, 11.0]) == pytest.approx(0.1)  # quartiles 9.5, 10.5
    assert relative_spread([1.0, 1.0, 1.0, 1.0, 100.0]) == 0.0  # one outlier block
    r = block_ratio([4.0, 4.4, 6.0], [2.0, 2.0, 2.0])  # ratios 2.0, 2.2, 3.0
    assert (r.median, r.low, r.high) == pytest.approx((2.2, 2.1, 2.6))
    assert r.spread == pytest.approx(0.5 / 2.2)
    with pytest.raises(ValueError, match="equally long"):
        block_ratio([1.0], [1.0, 2.0])


def _row(model: str, blocks: list[float], runs: int = 50, **kw) -> LatencyRow:
    return LatencyRow.from_blocks(
        [[b] * (runs // len(blocks)) for b in blocks],
        backend="onnxruntime",
        device="cpu",
        model=model,
        batch=1,
        threads=2,
        **kw,
    )


def test_rows_carry_noise_and_flags_into_json_and_markdown() -> None:
    steady = [2.0] * 5
    wobbly = [1.0, 1.0, 1.0 + 2 * NOISE_LIMIT] + [1.0 + 2 * NOISE_LIMIT] * 2  # IQR 1.4 - 1
    rows = [_row("dense", [4.0] * 5), _row("pruned", steady), _row("other", wobbly)]
    annotated = annotated_rows(rows, {"dense": 400, "pruned": 200, "other": 100})
    assert [a["flags"] for a in annotated] == [[], [], ["noisy"]]
    assert annotated[1]["speedup"] == 2.0 and annotated[1]["noise"] == 0.0
    assert annotated[2]["speedup_low"] == annotated[2]["speedup"] == pytest.approx(4.0 / 1.4)
    assert annotated[2]["speedup_high"] == 4.0
    assert annotated[0]["noisy"] is False and annotated[2]["noisy"] is True
    text = latency_markdown(rows, macs={"dense": 400, "pruned": 200, "other": 100})
    assert "| 2.86× (2.86–4.00) |" in text and "| 29% | noisy |" in text
    note = noise_note(rows)
    assert note is not None and "1 of 3 rows are noisy" in note and "other batch 1" in note
    assert noise_note(rows[:2]) is None


def test_a_speedup_beyond_the_mac_ratio_is_implausible_and_few_runs_are_quick() -> None:
    rows = [_row("dense", [4.0] * 5, runs=5), _row("pruned", [1.0] * 5, runs=5)]
    # MACs halve (ratio 2) but latency quarters: 2x the MAC ratio > 1.2
    annotated = annotated_rows(rows, {"dense": 200, "pruned": 100})
    assert annotated[1]["speedup_per_mac_ratio"] == 2.0
    assert annotated[1]["flags"] == ["quick", "implausible"]
    assert annotated[0]["flags"] == ["quick"] and annotated[0]["quick"] is True
    fair = annotated_rows(rows, {"dense": 400, "pruned": 100})  # ratio 4: speed-up 4 is fine
    assert fair[1]["flags"] == ["quick"]
    assert "| quick, implausible |" in latency_markdown(rows, macs={"dense": 200, "pruned": 100})


def test_rows_round_trip_with_blocks() -> None:
    r = _row("pruned", [1.0, 1.1, 0.9, 1.0, 1.0])
    back = LatencyRow.from_mapping(r.to_dict())
    assert back == r and back.blocks_ms == (1.0, 1.1, 0.9, 1.0, 1.0)
