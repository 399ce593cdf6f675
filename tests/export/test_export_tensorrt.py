"""TensorRT: a clear error without the backend, profile shapes, and GPU round trips (trt)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from pipeline.bench.backends import engine_latency
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
        lambda: engine_latency(tmp_path / "m.engine", (3, 8, 8), batch=1),
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
    p50, p90, p99 = engine_latency(path, (3, 16, 16), batch=4, runs=50, warmup=5)
    assert 0 < p50 <= p90 <= p99


def test_fp16_without_builder_flag_says_what_to_do() -> None:
    from types import SimpleNamespace

    tensorrt_11 = SimpleNamespace(__version__="11.0.0", BuilderFlag=SimpleNamespace())
    with pytest.raises(RuntimeError, match="fp16=False"):
        trt_export._fp16_flag(tensorrt_11)


# --- CPU-runnable logic around TensorRT: explicit quantization, profiles, cache ----------------

from types import SimpleNamespace  # noqa: E402


def _fake_trt(version: str, *, strongly_typed: bool) -> SimpleNamespace:
    flags = {"EXPLICIT_BATCH": 0}
    if strongly_typed:
        flags["STRONGLY_TYPED"] = 5
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=SimpleNamespace(**flags))


@pytest.mark.parametrize(
    "version, typed_flag, want_typed, expected",
    [
        ("8.6.1", False, True, 1 << 0),  # explicit batch only: no strong typing to ask for
        ("10.3.0", True, True, 1 << 5),  # a QDQ graph on TensorRT 10: strongly typed
        ("10.3.0", True, False, 0),  # an fp32 graph: nothing
        ("9.2.0", True, True, (1 << 0) | (1 << 5)),
    ],
)
def test_network_flags_ask_for_strong_typing_only_for_qdq_graphs(
    version, typed_flag, want_typed, expected
) -> None:
    trt = _fake_trt(version, strongly_typed=typed_flag)
    assert trt_export._network_flags(trt, strongly_typed=want_typed) == expected


def test_is_qdq_tells_a_quantized_graph_from_a_float_one(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import numpy as np

    from pipeline.export.int8 import Int8Options, preprocess, quantize_int8
    from pipeline.export.onnx import export_onnx

    net = _small_cnn().eval()
    fp32 = export_onnx(net, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")
    prepared = preprocess(fp32, tmp_path / "p.onnx")
    samples = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)
    qdq = quantize_int8(prepared, tmp_path / "q.onnx", samples, Int8Options(symmetric=True))
    assert trt_export.is_qdq(qdq.path) and not trt_export.is_qdq(fp32)


class _FakeCache:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob + b"+measured"

    def serialize(self) -> bytes:
        return self.blob


class _FakeConfig:
    def __init__(self) -> None:
        self.cache, self.ignore, self.profiles = None, None, []

    def create_timing_cache(self, blob: bytes) -> _FakeCache:
        return _FakeCache(bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch) -> None:
        self.cache, self.ignore = cache, ignore_mismatch

    def get_timing_cache(self) -> _FakeCache:
        return self.cache

    def add_optimization_profile(self, profile) -> None:
        self.profiles.append(profile)


def test_timing_cache_is_loaded_when_present_and_saved_after(tmp_path) -> None:
    path = tmp_path / "model.timing.cache"
    config = _FakeConfig()
    trt_export.attach_timing_cache(config, path)  # no file yet: an empty cache
    assert config.cache.blob == b"+measured" and config.ignore is False
    trt_export.save_timing_cache(config, path)
    second = _FakeConfig()
    trt_export.attach_timing_cache(second, path)
    assert second.cache.blob == b"+measured+measured"  # the saved cache was read back


class _FakeProfile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, low, opt, high) -> None:
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


def test_profiles_cover_the_batch_axis_of_a_dynamic_input_only() -> None:
    tensor = SimpleNamespace(name="input", shape=(-1, 3, 16, 16))
    network = SimpleNamespace(num_inputs=1, get_input=lambda i: tensor)
    builder = SimpleNamespace(create_optimization_profile=_FakeProfile)
    config = _FakeConfig()
    trt_export._add_profile(builder, network, config, 2, 32)
    assert config.profiles[0].shapes["input"] == ((1, 3, 16, 16), (2, 3, 16, 16), (32, 3, 16, 16))
    static = SimpleNamespace(
        num_inputs=1, get_input=lambda i: SimpleNamespace(name="x", shape=(1, 3, 8, 8))
    )
    config = _FakeConfig()
    trt_export._add_profile(builder, static, config, 2, 32)
    assert config.profiles == []


@pytest.mark.trt
def test_engine_verification_passes_and_catches_a_wrong_model(engine) -> None:
    net, path = engine
    x = torch.randn(3, 3, 16, 16)
    check = trt_export.verify_engine(path, net, x, precision="fp32")
    assert check.passed and check.batch_sizes == (3, 4)
    wrong = _small_cnn()
    with torch.no_grad():
        wrong[-1].bias += 1.0
    assert not trt_export.verify_engine(path, wrong, x, precision="fp32").passed


@pytest.mark.trt
def test_fp16_engines_verify_and_reuse_the_timing_cache(tmp_path) -> None:
    if not trt_export.tensorrt_available():
        pytest.skip("needs TensorRT and a CUDA GPU")
    from pipeline.export.onnx import export_onnx

    net = _small_cnn()
    onnx_path = export_onnx(net, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")
    cache = tmp_path / "m.timing.cache"
    fp16 = trt_export.build_engine(onnx_path, tmp_path / "h.engine", fp16=True, max_batch=8,
                                   timing_cache=cache)  # fmt: skip
    assert cache.stat().st_size > 0
    assert trt_export.verify_engine(fp16, net, torch.randn(2, 3, 16, 16), precision="fp16").passed


@pytest.mark.trt
def test_an_int8_engine_builds_from_the_qdq_graph_and_is_judged_by_agreement(tmp_path) -> None:
    if not trt_export.tensorrt_available():
        pytest.skip("needs TensorRT and a CUDA GPU")
    from pipeline.data.calibration import from_datasets
    from pipeline.export.int8 import Int8Options
    from pipeline.export.int8_export import Int8Settings, export_int8
    from pipeline.export.onnx import export_onnx
    from tests.export.int8_models import trained_digits_net

    net, data = trained_digits_net()
    fp32 = export_onnx(net, torch.randn(2, 1, 16, 16), tmp_path / "m.onnx")
    samples = from_datasets(data.train.dataset, data.test.dataset, calibration=256,
                            validation=128, heldout=360, seed=0, name="digits")  # fmt: skip
    settings = Int8Settings(options=Int8Options(symmetric=True))  # TensorRT's form
    done = export_int8(fp32, tmp_path / "m.int8.onnx", samples, settings)
    assert done.check.passed
    engine = trt_export.build_engine(done.path, tmp_path / "q.engine", max_batch=8)
    check = trt_export.verify_engine_int8(engine, fp32, samples, done.check, max_drop=0.5)
    assert check.passed and check.measured.agreement > 97.0, check.line()
