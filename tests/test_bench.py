"""Benchmarking: percentiles, timing loop, MAC/param counts and the CPU latency table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.bench import (
    LatencyRow,
    bench_torch,
    count_macs,
    count_params,
    environment,
    latency_table,
    percentiles_ms,
    time_callable,
)


def test_percentiles_of_known_sample() -> None:
    samples_s = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    p50, p90, p99 = percentiles_ms(samples_s)
    assert p50 == pytest.approx(50.5)
    assert p90 == pytest.approx(90.1)
    assert p99 == pytest.approx(99.01)


def test_percentiles_reject_empty() -> None:
    with pytest.raises(ValueError, match="at least one"):
        percentiles_ms([])


def test_time_callable_counts_calls_and_syncs() -> None:
    calls, syncs = [], []
    p50, p90, p99 = time_callable(
        lambda: calls.append(1), warmup=3, runs=7, sync=lambda: syncs.append(1)
    )
    assert len(calls) == 10
    assert len(syncs) == 8  # once after warm-up, once per timed run
    assert 0 <= p50 <= p90 <= p99


@pytest.mark.parametrize(
    ("conv", "size", "expected"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), 16, 8 * 16 * 16 * 3 * 3 * 3),
        (nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4), 16, 12 * 8 * 8 * (8 // 4) * 9),
        (nn.Conv2d(6, 6, 5, groups=6, bias=False), 9, 6 * 5 * 5 * 1 * 25),
    ],
)
def test_count_macs_of_single_conv_matches_formula(conv: nn.Conv2d, size: int, expected: int):
    # MACs = C_out * H_out * W_out * (C_in / groups) * k_h * k_w
    assert count_macs(conv, (conv.in_channels, size, size)) == expected


def test_count_macs_leaves_mode_and_counts_linear() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).train()
    assert count_macs(net, (3, 2, 2)) == 12 * 5
    assert net.training


def test_count_params() -> None:
    assert count_params(nn.Conv2d(3, 8, 3)) == 8 * 3 * 9 + 8
    shared = nn.Linear(4, 4)
    assert count_params(nn.Sequential(shared, shared)) == 20  # shared weights counted once


def _tiny(width: int) -> nn.Module:
    torch.manual_seed(width)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
    ).eval()


def test_latency_table_cpu_rows(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from pipeline.export.onnx import export_onnx

    models = {"dense": _tiny(8), "pruned": _tiny(4)}
    onnx_paths = {
        label: export_onnx(net, torch.randn(2, 3, 8, 8), tmp_path / f"{label}.onnx")
        for label, net in models.items()
    }
    threads_before = torch.get_num_threads()
    rows = latency_table(
        models, onnx_paths, (3, 8, 8), batches=(1, 4), threads=1, runs=50, warmup=2
    )
    assert torch.get_num_threads() == threads_before
    cpu = [r for r in rows if r.device == "cpu"]
    assert len(cpu) == 2 * 2 * 2
    keys = {(r.backend, r.model, r.batch) for r in cpu}
    assert keys == {(b, m, n) for b in ("torch", "onnxruntime") for m in models for n in (1, 4)}
    for row in cpu:
        assert row.threads == 1
        assert 0 < row.p50_ms <= row.p90_ms <= row.p99_ms


def test_latency_table_requires_50_runs() -> None:
    with pytest.raises(ValueError, match="runs >= 50"):
        latency_table({"dense": _tiny(4)}, {}, (3, 8, 8), runs=49)


def test_bench_torch_rejects_bad_device() -> None:
    with pytest.raises(ValueError, match="device"):
        bench_torch(_tiny(4), (3, 8, 8), batch=1, threads=1, device="tpu")


def test_latency_row_round_trip() -> None:
    row = LatencyRow("torch", "cpu", "dense", 1, 2, 1.0, 2.0, 3.0)
    assert LatencyRow.from_mapping({**row.to_dict(), "extra": 1}) == row


def test_environment_keys() -> None:
    env = environment()
    assert {"torch", "onnxruntime", "python", "cpu", "cuda"} <= set(env)
    assert env["torch"] == torch.__version__
    assert "cores" in env["cpu"]
    assert (env["cuda"] is None) == (not torch.cuda.is_available())
