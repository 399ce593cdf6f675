"""Benchmarking: settings per machine, the sweep, torch/ORT rows, CUDA rows (gpu), MACs, reports."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from pipeline.bench.artefacts import Artefact
from pipeline.bench.backends import ReplayMismatchError, bench_torch, check_replay
from pipeline.bench.sweep import (
    SweepConfig,
    bench_markdown,
    bench_report,
    latency_table,
    plan_settings,
    runnable,
    sweep,
)
from pipeline.bench.timing import LatencyRow, Setting
from pipeline.graph.costs import count_macs, count_params


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


# --- which settings run where -------------------------------------------------------------------


def test_settings_on_a_cpu_machine() -> None:
    assert plan_settings() == [
        Setting("torch", "cpu", "eager"),
        Setting("onnxruntime", "cpu", "session"),
    ]


def test_settings_on_a_full_gpu_machine() -> None:
    got = plan_settings(cuda=True, ort_cuda=True, tensorrt=True, fp16=True, copies=True)
    keys = [(s.backend, s.device, s.mode, s.precision, s.copies) for s in got]
    assert keys == [
        ("torch", "cpu", "eager", "fp32", None),
        ("onnxruntime", "cpu", "session", "fp32", None),
        ("torch", "cuda", "eager", "fp32", True),
        ("torch", "cuda", "cuda-graph", "fp32", True),
        ("torch", "cuda", "eager", "fp16", True),
        ("torch", "cuda", "cuda-graph", "fp16", True),
        ("onnxruntime", "cuda", "session", "fp32", True),
        ("tensorrt", "cuda", "engine", "fp32", False),  # engines always time device data
        ("tensorrt", "cuda", "engine", "fp16", False),
    ]


def test_settings_filtered_by_backend_and_device() -> None:
    got = plan_settings(backends=["torch"], devices=["cuda"], cuda=True, ort_cuda=True)
    assert [(s.mode, s.copies) for s in got] == [("eager", False), ("cuda-graph", False)]
    assert plan_settings(backends=["tensorrt"]) == []  # no GPU: nothing


def test_settings_refuse_unknown_names() -> None:
    with pytest.raises(ValueError, match="got unknown \\['tflite'\\]"):
        plan_settings(backends=["tflite"])
    with pytest.raises(ValueError, match="'tpu'"):
        plan_settings(devices=["tpu"])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"runs": 4}, "runs >= 5"),
        ({"batches": ()}, "at least one"),
        ({"batches": (1, 0)}, "batches=(1, 0)"),
        ({"threads": 0}, "threads=0"),
        ({"warmup": -1}, "warmup=-1"),
    ],
)
def test_sweep_config_validates(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", "\\(").replace(")", "\\)")):
        SweepConfig(**kwargs)


# --- the sweep ------------------------------------------------------------------------------------


def _fake_open(calls: list):
    """Opens a fake timer per model: constant durations, dense twice the others, CUDA 10x
    faster; records which models were opened."""

    @contextmanager
    def open_timer(a: Artefact, s: Setting, cfg: SweepConfig, batch: int):
        calls.append((batch, s.backend, s.device, a.label))
        p50 = batch * (2.0 if a.label == "dense" else 1.0) / (10 if s.device == "cuda" else 1)
        yield (lambda n: [p50] * n), s.precision

    return open_timer


def test_sweep_nests_batch_setting_model_and_skips_what_cannot_run() -> None:
    artefacts = [
        Artefact("dense", "d", (3, 8, 8), _tiny(8), None),  # no ONNX: no ORT rows
        Artefact("pruned", "p", (3, 8, 8), _tiny(4), None),
        Artefact("graph", "g.onnx", (3, 8, 8), None, "g.onnx"),  # ONNX alone: no torch rows
    ]
    settings = plan_settings(cuda=True)
    calls: list = []
    rows = sweep(artefacts, settings, SweepConfig(batches=(1, 8)), _fake_open(calls))
    assert calls == [
        (b, backend, device, label)
        for b in (1, 8)
        for backend, device, labels in [
            ("torch", "cpu", ("dense", "pruned")),
            ("onnxruntime", "cpu", ("graph",)),
            ("torch", "cuda", ("dense", "pruned")),  # eager
            ("torch", "cuda", ("dense", "pruned")),  # cuda-graph
        ]
        for label in labels
    ]
    assert len(rows) == len(calls)
    report = bench_report(rows, artefacts, SweepConfig(batches=(1, 8)))
    text = bench_markdown(report)
    assert "## GPU vs CPU (p50)" in text
    assert "| dense | 8 | 16.000 (torch cpu) | 1.600 (10.0×) | 1.600 (10.0×) |" in text
    assert "speed-up is against dense" in text
    assert report["sweep"] == {"batches": [1, 8], "threads": 2, "runs": 50, "warmup": 10}
    assert [m["label"] for m in report["models"]] == ["dense", "pruned", "graph"]


def test_bench_markdown_on_cpu_rows_has_no_gpu_table() -> None:
    artefacts = [Artefact("m", "m", (3, 8, 8), _tiny(4), None, macs=100)]
    cfg = SweepConfig(batches=(2,))
    text = bench_markdown(
        bench_report(sweep(artefacts, plan_settings(), cfg, _fake_open([])), artefacts, cfg)
    )
    assert "GPU vs CPU" not in text
    assert "| m | m | — | 3×8×8 | 100 |" in text
    assert "## Environment" in text and "cores available" in text


# --- real CPU rows --------------------------------------------------------------------------------


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
        assert (row.threads, row.runs, row.warmup, row.copies) == (1, 50, 2, None)
        assert 0 < row.p50_ms <= row.p90_ms <= row.p99_ms


def test_latency_table_requires_5_runs() -> None:
    with pytest.raises(ValueError, match="runs >= 5"):
        latency_table({"dense": _tiny(4)}, {}, (3, 8, 8), runs=4)


def test_bench_torch_rejects_bad_device() -> None:
    with pytest.raises(ValueError, match="device"):
        bench_torch(_tiny(4), (3, 8, 8), batch=1, threads=1, device="tpu")


def test_bench_torch_pins_threads_during_the_run(monkeypatch) -> None:
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    before = torch.get_num_threads()
    row = bench_torch(Probe(), (3, 4, 4), batch=2, threads=1, runs=50, warmup=1, label="p")
    assert set(seen) == {1} and len(seen) == 51
    assert torch.get_num_threads() == before
    assert (row.backend, row.mode, row.precision, row.model, row.batch) == (
        "torch", "eager", "fp32", "p", 2,
    )  # fmt: skip


def test_replay_check_catches_a_stale_graph() -> None:
    ref = torch.tensor([1.0, -2.0, 4.0])
    check_replay(ref + 1e-6, ref, "fp32")  # rounding passes
    with pytest.raises(ReplayMismatchError, match="not capturable"):
        check_replay(ref * 1.01, ref, "fp32")
    check_replay(ref * 1.005, ref, "fp16")  # fp16 has its own, looser tolerance


# --- CUDA rows (gpu) ------------------------------------------------------------------------------


@pytest.fixture
def cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: CUDA eager, CUDA-graph and fp16 rows need a GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "cuda-graph"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("copies", [False, True])
def test_cuda_rows(cuda, mode: str, precision: str, copies: bool) -> None:
    s = Setting("torch", "cuda", mode, precision, copies)
    model = _tiny(16)
    row = bench_torch(model, (3, 32, 32), batch=8, threads=1, runs=50, warmup=3, setting=s)
    assert (row.device, row.mode, row.precision, row.copies) == ("cuda", mode, precision, copies)
    assert 0 < row.p50_ms <= row.p90_ms <= row.p99_ms
    assert next(model.parameters()).device.type == "cpu"  # the caller's model is untouched


@pytest.mark.gpu
def test_cuda_graph_refuses_a_forward_that_changes_between_calls(cuda) -> None:
    class Counter(nn.Module):  # Python state: each eager call differs, a replay cannot
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    s = Setting("torch", "cuda", "cuda-graph", "fp32", False)
    with pytest.raises(ReplayMismatchError):
        bench_torch(Counter(), (4,), batch=2, threads=1, runs=50, warmup=1, setting=s)


@pytest.mark.gpu
def test_cuda_graph_beats_eager_on_a_launch_bound_model(cuda) -> None:
    deep = nn.Sequential(*[nn.Conv2d(8, 8, 1) for _ in range(40)]).eval()
    rows = {
        mode: bench_torch(
            deep, (8, 8, 8), batch=1, threads=1, runs=50, warmup=5,
            setting=Setting("torch", "cuda", mode, "fp32", False),
        )
        for mode in ("eager", "cuda-graph")
    }  # fmt: skip
    assert rows["cuda-graph"].p50_ms < rows["eager"].p50_ms


@pytest.mark.parametrize("watched", [True, False])
def test_the_sweep_shows_progress_only_to_someone_watching(watched, monkeypatch, capsys) -> None:
    import pipeline.core.progress

    monkeypatch.setattr(pipeline.core.progress, "bars_enabled", lambda: watched)
    artefacts = [Artefact("dense", "d", (3, 8, 8), _tiny(8), None)]
    settings = plan_settings(cuda=True, backends=["torch"])  # cpu eager, cuda eager and graph
    sweep(artefacts, settings, SweepConfig(batches=(1, 8), runs=5), _fake_open([]))
    err = capsys.readouterr().err
    shown = "latency sweep" in err and "/6 [" in err and "batch 8, torch cuda cuda-graph" in err
    assert shown is watched, err
    assert watched or err == ""


def test_an_int8_graph_runs_on_onnxruntime_cpu_and_as_one_tensorrt_engine() -> None:
    """A QDQ graph is timed by ONNX Runtime's CPU provider (interleaved with the fp32 graphs)
    and by TensorRT once (explicit quantization), never by torch or under an fp16 setting."""
    artefacts = [
        Artefact("pruned", "p", (3, 8, 8), _tiny(4), "p.onnx"),
        Artefact("pruned", "p.int8", (3, 8, 8), None, "p.int8.onnx", precision="int8"),
    ]
    settings = plan_settings(cuda=True, ort_cuda=True, tensorrt=True, fp16=True)
    ran = {(s.backend, s.device, s.mode, s.precision): [runnable(a, s) for a in artefacts]
           for s in settings}  # fmt: skip
    int8_settings = {k for k, (_, int8) in ran.items() if int8}
    assert int8_settings == {("onnxruntime", "cpu", "session", "fp32"),
                             ("tensorrt", "cuda", "engine", "fp32")}  # fmt: skip
    engines: list = []

    def fake_engine(a, s, cfg, batch):
        engines.append((a.precision, s.precision))
        return LatencyRow("tensorrt", "cuda", a.label, batch, 1, 1.0, 1.0, 1.0, mode="engine",
                          precision="int8" if a.precision == "int8" else s.precision)  # fmt: skip

    trt = [s for s in settings if s.backend == "tensorrt"]
    rows = sweep(artefacts, trt, SweepConfig(batches=(1,)), measure_fn=fake_engine)
    assert sorted(engines) == [("fp32", "fp16"), ("fp32", "fp32"), ("int8", "fp32")]
    assert {r.precision for r in rows} == {"fp32", "fp16", "int8"}
