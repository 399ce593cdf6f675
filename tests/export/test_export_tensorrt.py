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


# --- CPU-runnable logic around TensorRT: calibration batching, calibrator, profiles, cache ------

from types import SimpleNamespace  # noqa: E402

from pipeline.export.calibration import CalibrationFeed, entropy_calibrator  # noqa: E402


def _loader(sizes, shape=(3, 4, 4)):
    """Dataset-like (inputs, labels) batches whose values count up, so order is checkable."""
    start = 0
    for n in sizes:
        x = torch.arange(start, start + n, dtype=torch.float64).view(n, 1, 1, 1).expand(n, *shape)
        start += n
        yield x.clone(), torch.zeros(n)


def test_calibration_feed_cuts_fixed_batches_across_loader_batches() -> None:
    feed = CalibrationFeed(_loader([3, 5, 2, 4]), 4, (3, 4, 4), max_batches=10)
    batches = []
    while (b := feed.next_batch()) is not None:
        batches.append(b)
    assert [b.shape for b in batches] == [(4, 3, 4, 4)] * 3  # 14 samples: the short 2 dropped
    assert all(b.dtype == torch.float32 and b.is_contiguous() for b in batches)
    assert [b[:, 0, 0, 0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_calibration_feed_stops_at_max_batches_and_checks_shapes() -> None:
    feed = CalibrationFeed(_loader([8] * 10), 4, (3, 4, 4), max_batches=2)
    assert feed.next_batch() is not None and feed.next_batch() is not None
    assert feed.next_batch() is None and feed.given == 2
    wrong = CalibrationFeed(_loader([4], shape=(1, 4, 4)), 4, (3, 4, 4))
    with pytest.raises(ValueError, match=r"per-sample shape \(1, 4, 4\), expected \(3, 4, 4\)"):
        wrong.next_batch()
    with pytest.raises(ValueError, match="batch_size >= 1"):
        CalibrationFeed([], 0, (3, 4, 4))


class _FakeCalibratorBase:
    def __init__(self) -> None:
        self.base_initialised = True


def test_entropy_calibrator_gives_pointers_then_none_and_keeps_its_cache(tmp_path) -> None:
    fake_trt = SimpleNamespace(IInt8EntropyCalibrator2=_FakeCalibratorBase)
    feed = CalibrationFeed(_loader([4, 4]), 4, (3, 4, 4))
    calib = entropy_calibrator(fake_trt, feed, tmp_path / "m.calib", device="cpu")
    assert calib.base_initialised and calib.get_batch_size() == 4
    assert calib.read_calibration_cache() is None
    pointers = calib.get_batch(["input"])
    assert pointers == [calib.current.data_ptr()] and calib.current[0, 0, 0, 0] == 0
    assert calib.get_batch(["input"]) is not None and calib.get_batch(["input"]) is None
    calib.write_calibration_cache(memoryview(b"scales"))
    again = entropy_calibrator(fake_trt, feed, tmp_path / "m.calib", device="cpu")
    assert again.read_calibration_cache() == b"scales"


class _FakeCache:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob + b"+measured"

    def serialize(self) -> bytes:
        return self.blob


class _FakeConfig:
    def __init__(self) -> None:
        self.cache, self.ignore, self.profiles, self.calibration_profile = None, None, [], None

    def create_timing_cache(self, blob: bytes) -> _FakeCache:
        return _FakeCache(bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch) -> None:
        self.cache, self.ignore = cache, ignore_mismatch

    def get_timing_cache(self) -> _FakeCache:
        return self.cache

    def add_optimization_profile(self, profile) -> None:
        self.profiles.append(profile)

    def set_calibration_profile(self, profile) -> None:
        self.calibration_profile = profile


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


def test_profiles_cover_the_batch_and_calibration_runs_at_one_shape() -> None:
    tensor = SimpleNamespace(name="input", shape=(-1, 3, 16, 16))
    network = SimpleNamespace(num_inputs=1, get_input=lambda i: tensor)
    builder = SimpleNamespace(create_optimization_profile=_FakeProfile)
    config = _FakeConfig()
    trt_export._add_profile(builder, network, config, 2, 32, calibration=8)
    assert config.profiles[0].shapes["input"] == ((1, 3, 16, 16), (2, 3, 16, 16), (32, 3, 16, 16))
    assert config.calibration_profile.shapes["input"] == ((8, 3, 16, 16),) * 3
    static = SimpleNamespace(
        num_inputs=1, get_input=lambda i: SimpleNamespace(name="x", shape=(1, 3, 8, 8))
    )
    config = _FakeConfig()
    trt_export._add_profile(builder, static, config, 2, 32, calibration=8)
    assert config.profiles == [] and config.calibration_profile is None


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
def test_fp16_and_int8_engines_verify_and_reuse_the_timing_cache(tmp_path) -> None:
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
    batches = (torch.randn(8, 3, 16, 16) for _ in range(4))
    feed = CalibrationFeed(batches, 4, (3, 16, 16), max_batches=4)
    int8 = trt_export.build_engine(onnx_path, tmp_path / "q.engine", fp16=True, int8=feed,
                                   max_batch=8, timing_cache=cache)  # fmt: skip
    assert (tmp_path / "q.calib").is_file() and feed.given == 4
    assert trt_export.verify_engine(int8, net, torch.randn(2, 3, 16, 16), precision="int8").passed
