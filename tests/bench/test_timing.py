"""Timing: percentile math against numpy, the timing loops, latency rows and their tables."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.bench.timed_runs import cuda_event_samples_ms, host_samples_ms, time_callable
from pipeline.bench.timing import (
    LatencyRow,
    annotated_rows,
    gpu_vs_cpu_markdown,
    latency_markdown,
    percentile,
    percentiles_ms,
)

finite = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=300), st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 4099])
def test_p50_p90_p99_match_numpy_on_skewed_samples(n: int) -> None:
    samples_s = np.random.default_rng(n).lognormal(-6, 1, size=n)  # latency-like right tail
    expected = np.percentile(samples_s * 1e3, [50, 90, 99])
    assert percentiles_ms(list(samples_s)) == pytest.approx(tuple(expected), rel=1e-12)


def test_percentiles_of_known_sample() -> None:
    samples_s = [i / 1000 for i in range(100, 0, -1)]  # 100..1 ms, unsorted on purpose
    assert percentiles_ms(samples_s) == pytest.approx((50.5, 90.1, 99.01))


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], -1), ([1.0], 100.5)])
def test_percentile_rejects_bad_input(values: list[float], q: float) -> None:
    with pytest.raises(ValueError, match="at least one timing sample"):
        percentile(values, q)


def test_host_samples_count_calls_and_syncs() -> None:
    calls, syncs = [], []
    samples = host_samples_ms(
        lambda: calls.append(1), warmup=3, runs=7, sync=lambda: syncs.append(1)
    )
    assert len(calls) == 10 and len(samples) == 7
    assert len(syncs) == 8  # once after warm-up, once per timed run


def test_host_samples_are_milliseconds() -> None:
    samples = host_samples_ms(lambda: time.sleep(0.004), warmup=0, runs=3)
    assert all(4.0 <= s < 400 for s in samples), samples  # a unit slip (s, µs, ns) fails


def test_sync_is_inside_the_timed_region() -> None:
    samples = host_samples_ms(lambda: None, warmup=0, runs=3, sync=lambda: time.sleep(0.003))
    assert min(samples) >= 3.0


def test_time_callable_returns_ordered_percentiles() -> None:
    p50, p90, p99 = time_callable(lambda: sum(range(1000)), warmup=2, runs=20)
    assert 0 < p50 <= p90 <= p99


@pytest.mark.parametrize(("warmup", "runs"), [(0, 0), (-1, 5)])
def test_timing_rejects_bad_counts(warmup: int, runs: int) -> None:
    with pytest.raises(ValueError, match="runs >= 1 and warmup >= 0"):
        host_samples_ms(lambda: None, warmup=warmup, runs=runs)


@pytest.mark.gpu
def test_cuda_event_samples_time_gpu_work() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    a = torch.randn(2048, 2048, device="cuda")
    small = cuda_event_samples_ms(lambda: a @ a, warmup=3, runs=10)
    large = cuda_event_samples_ms(lambda: [a @ a for _ in range(8)], warmup=3, runs=10)
    assert len(small) == 10 and min(small) > 0
    assert np.median(large) > 3 * np.median(small)  # the events see the queued kernels


def row(model: str, batch: int, p50: float, **kw) -> LatencyRow:
    fields = {"backend": "torch", "device": "cpu", "threads": 2, **kw}
    return LatencyRow(
        model=model, batch=batch, p50_ms=p50, p90_ms=p50 * 1.1, p99_ms=p50 * 1.2, **fields
    )


def test_row_throughput_setting_and_round_trip() -> None:
    r = row("pruned", 32, 4.0, device="cuda", mode="cuda-graph", precision="fp16", copies=False)
    assert r.throughput == pytest.approx(32 / 0.004)
    assert r.setting == "torch cuda cuda-graph fp16"
    assert row("dense", 1, 1.0).setting == "torch cpu"
    assert LatencyRow.from_mapping({**r.to_dict(), "extra": 1}) == r
    assert r.to_dict()["throughput"] == pytest.approx(8000)


def test_row_from_an_older_report_takes_defaults() -> None:
    old = {"backend": "onnxruntime", "device": "cpu", "model": "dense", "batch": 1, "threads": 2}
    r = LatencyRow.from_mapping({**old, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0})
    assert (r.mode, r.precision, r.copies, r.runs) == ("session", "fp32", None, 0)
    assert r.setting == "onnxruntime cpu"


def test_row_from_samples() -> None:
    samples = [float(v) for v in range(1, 101)]
    r = LatencyRow.from_samples(
        samples, backend="torch", device="cpu", model="m", batch=2, threads=1, warmup=5
    )
    assert (r.p50_ms, r.runs, r.warmup) == (pytest.approx(50.5), 100, 5)


ROWS = [
    row("dense", 1, 4.0),
    row("pruned", 1, 2.0),
    row("dense", 1, 1.0, device="cuda", mode="cuda-graph", copies=False),
    row("pruned", 1, 0.5, device="cuda", mode="cuda-graph", copies=False),
    row("dense", 1, 0.8, backend="onnxruntime", mode="session"),
    row("pruned", 1, 0.25, backend="onnxruntime", mode="session"),
]


def test_latency_markdown_speedup_against_first_model_and_mac_ratio() -> None:
    text = latency_markdown(ROWS, macs={"dense": 400, "pruned": 100})
    lines = text.splitlines()
    assert lines[0].startswith("| Backend | Device | Model | Precision | Batch | Threads | p50 ms")
    assert (
        "| torch | cpu | pruned | fp32 | 1 | 2 | 2.000 | 2.200 | 2.400 | 2.00× | 500 | — | 0.50 "
        "| 10% |  |" in lines
    )
    assert "| torch cuda-graph | cuda | pruned | fp32 | 1 | 2 | 0.500 |" in text
    assert "2.00× | 2,000 | excluded (device-resident) | 0.50 |" in text
    assert (
        "| onnxruntime | cpu | pruned | fp32 | 1 | 2 | 0.250 | 0.275 | 0.300 | 3.20× | 4,000 | — "
        "| 0.80 | 10% |  |" in lines
    )
    assert len(lines) == 2 + len(ROWS)


def test_latency_markdown_without_macs_or_reference() -> None:
    text = latency_markdown([row("pruned", 8, 2.0)])
    assert "÷ MAC" not in text
    assert "| torch | cpu | pruned | fp32 | 8 | 2 | 2.000 | 2.200 | 2.400 | 1.00× | 4,000 | — |" in text


def test_int8_rows_gain_over_dense_fp32_and_their_mac_ratio_is_within_int8() -> None:
    ort = {"backend": "onnxruntime", "mode": "session"}
    rows = [
        row("dense", 1, 4.0, **ort),
        row("pruned", 1, 1.0, **ort),
        row("dense", 1, 2.0, precision="int8", **ort),
        row("pruned", 1, 0.5, precision="int8", **ort),
    ]
    annotated = annotated_rows(rows, {"dense": 400, "pruned": 100})
    speedups = [a["speedup"] for a in annotated]
    assert speedups == pytest.approx([1.0, 4.0, 2.0, 8.0])  # each against dense fp32
    fractions = [a["speedup_per_mac_ratio"] for a in annotated]
    assert fractions == pytest.approx([1.0, 1.0, 1.0, 1.0])  # pruned int8 vs dense int8: 4x/4x
    assert all("implausible" not in a["flags"] for a in annotated)
    text = latency_markdown(rows, macs={"dense": 400, "pruned": 100})
    assert "| onnxruntime | cpu | pruned | int8 | 1 | 2 | 0.500 |" in text
    assert "8.00× |" in text


def test_gpu_vs_cpu_uses_the_fastest_cpu_row() -> None:
    text = gpu_vs_cpu_markdown(ROWS)
    assert text is not None
    assert "| dense | 1 | 0.800 (onnxruntime cpu) | 1.000 (0.8×) |" in text
    assert "| pruned | 1 | 0.250 (onnxruntime cpu) | 0.500 (0.5×) |" in text
    assert "torch cuda cuda-graph p50 ms (speed-up)" in text


def test_gpu_vs_cpu_is_none_without_gpu_rows() -> None:
    assert gpu_vs_cpu_markdown([r for r in ROWS if r.device == "cpu"]) is None
