"""TensorRT: a clear error without the backend, profile shapes, and GPU round trips (trt)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from pipeline.export import tensorrt as trt_export


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


def test_missing_tensorrt_error_names_install_and_gpu(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    assert not trt_export.tensorrt_available()
    for call in (
        lambda: trt_export.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine"),
        lambda: trt_export.run_engine(tmp_path / "m.engine", torch.zeros(1, 3, 8, 8)),
        lambda: trt_export.engine_latency(tmp_path / "m.engine", (3, 8, 8), batch=1),
    ):
        with pytest.raises(RuntimeError) as info:
            call()
        message = str(info.value)
        assert "pip install 'recede[tensorrt]'" in message
        assert "CUDA GPU" in message
    assert not (tmp_path / "m.engine").exists()


def test_profile_shapes_cover_the_batch_axis() -> None:
    shapes = trt_export.profile_shapes((-1, 3, 32, 32), opt_batch=8, max_batch=32)
    assert shapes == ((1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))


@pytest.mark.parametrize(
    ("shape", "opt", "biggest"), [((-1, 3, -1, 32), 1, 4), ((-1, 3, 8, 8), 8, 4), ((-1, 3), 0, 4)]
)
def test_profile_shapes_reject_bad_requests(shape, opt, biggest) -> None:
    with pytest.raises(ValueError, match="expected|only the batch axis"):
        trt_export.profile_shapes(shape, opt_batch=opt, max_batch=biggest)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    pytest.importorskip("onnx")
    from pipeline.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("trt")
    net = _small_cnn()
    onnx_path = export_onnx(net, torch.randn(2, 3, 16, 16), out / "m.onnx")
    return net, trt_export.build_engine(onnx_path, out / "m.engine", max_batch=8, opt_batch=2)


@pytest.mark.trt
def test_engine_matches_torch_at_two_batches(engine) -> None:
    net, path = engine
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        got = trt_export.run_engine(path, x)
        with torch.no_grad():
            want = net(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.trt
def test_engine_rejects_batch_outside_profile(engine) -> None:
    _, path = engine
    with pytest.raises(ValueError, match="optimization profile"):
        trt_export.run_engine(path, torch.randn(9, 3, 16, 16))


@pytest.mark.trt
def test_engine_latency_is_ordered(engine) -> None:
    _, path = engine
    p50, p90, p99 = trt_export.engine_latency(path, (3, 16, 16), batch=4, runs=50, warmup=5)
    assert 0 < p50 <= p90 <= p99


def test_fp16_without_builder_flag_says_what_to_do() -> None:
    from types import SimpleNamespace

    tensorrt_11 = SimpleNamespace(__version__="11.0.0", BuilderFlag=SimpleNamespace())
    with pytest.raises(RuntimeError, match="fp16=False"):
        trt_export._fp16_flag(tensorrt_11)
