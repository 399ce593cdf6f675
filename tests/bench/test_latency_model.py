"""Building a latency model: the ONNX pieces, the calibration on whole-model profiles (fake
clocks), the cache key and its invalidation, and the deployments refused before any work."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from pipeline.bench import latency_cache
from pipeline.bench.latency_cache import cache_key, cache_path, cached_latency_model
from pipeline.bench.latency_pieces import (
    INT8_HINT,
    LayerGeometry,
    check_deployment,
    piece_proto,
    session,
)
from pipeline.bench.latency_profiles import build_latency_model, fit_calibration
from pipeline.config import ConfigError, LatencyConfig, ModelConfig
from pipeline.models.zoo import build_model
from tests.latency_fakes import piece_clock, synthetic_latency


def _tiny_vgg(width: float = 0.125):
    model = build_model(ModelConfig(name="vgg", width=width), num_classes=10, in_channels=3)
    return model.eval(), torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize(
    "geom",
    [
        LayerGeometry("c", "conv", 8, 16, (3, 3), (2, 2), (1, 1), (1, 1), 1, (9, 9)),
        LayerGeometry("d", "depthwise", 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8, (5, 5)),
        LayerGeometry("g", "conv", 8, 12, (1, 1), (1, 1), (0, 0), (1, 1), 4, (4, 4)),
        LayerGeometry("l", "linear", 24, 10, in_hw=(1, 1)),
    ],
)
def test_a_piece_is_the_layer_at_the_widths_asked(geom):
    cin, cout = (4, 4) if geom.kind == "depthwise" else (geom.cin, geom.cout)
    sess = session(piece_proto(geom, cin, cout, batch=3), LatencyConfig())
    shape = sess.get_inputs()[0].shape
    x = np.zeros(shape, dtype=np.float32)
    out = sess.run(None, {"x": x})[0]
    assert out.shape[0] == 3 and out.shape[1] == cout
    if geom.kind != "linear":
        assert (
            out.shape[2]
            == (geom.in_hw[0] + 2 * geom.padding[0] - geom.kernel[0]) // geom.stride[0] + 1
        )


def _fake_whole(offset: float, scale: float, table_of):
    """A whole-model clock: ``offset + scale * (its table sum)``, so the fit must recover both."""

    def timer(models, example):
        return [offset + scale * table_of(m) for m in models]

    return timer


def test_calibration_recovers_offset_and_scale_and_scores_the_held_out_profiles():
    model, x = _tiny_vgg(0.25)
    pieces: list[bytes] = []
    holder = {}

    def whole(models, example):
        lm = holder["draft"]
        from pipeline.graph.latency_cost import layer_widths

        return [0.05 + 1.7 * lm.table_ms(layer_widths(m)) for m in models]

    import pipeline.bench.latency_profiles as profiles

    real = profiles.calibrate

    def spy(model_, example, graph, draft, timer):
        holder["draft"] = draft
        return real(model_, example, graph, draft, timer)

    profiles.calibrate = spy
    try:
        lm = build_latency_model(
            model, x, LatencyConfig(), piece_timer=piece_clock(pieces), whole_timer=whole
        )
    finally:
        profiles.calibrate = real
    assert lm.offset_ms == pytest.approx(0.05, rel=1e-6) and lm.scale == pytest.approx(
        1.7, rel=1e-6
    )
    assert lm.table_error == pytest.approx(0.0, abs=1e-9)
    assert len(lm.profiles) == 9 and {p.role for p in lm.profiles} == {"fit", "held-out"}
    assert len(pieces) == 1 + sum(len(t.ms) * len(t.ms[0]) for t in lm.layers)  # + the overhead
    assert lm.overhead_ms == pytest.approx(0.001)
    assert {t.name for t in lm.layers} == {
        n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    }


def test_fit_calibration_is_least_squares_in_relative_error():
    offset, scale = fit_calibration([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert (offset, scale) == pytest.approx((0.5, 1.0))
    assert fit_calibration([1.0, 1.0], [2.0, 2.0]) == pytest.approx((1.0, 1.0))  # degenerate


def test_a_real_build_on_a_tiny_model_measures_every_layer():
    """The real ONNX Runtime path end to end, few runs (asserts structure, never a time)."""
    model, x = _tiny_vgg()
    lm = build_latency_model(model, x, LatencyConfig())
    assert len(lm.layers) == 9 and lm.table_error is not None and lm.dense_ms > 0
    assert all(p.measured_ms > 0 for p in lm.profiles)
    assert lm.deployment == {
        "backend": "onnxruntime",
        "device": "cpu",
        "precision": "fp32",
        "batch": 1,
        "threads": 1,
        "clock": "cpu",
    }


def _fake_model(model, example, cfg):
    """A builder that measures nothing (the cache is under test, not the build)."""
    return synthetic_latency(model, example)


def test_the_cache_builds_once_and_then_measures_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RECEDE_CACHE", str(tmp_path))
    model, x = _tiny_vgg()
    builds = []

    def builder(*args):
        builds.append(args)
        return _fake_model(*args)

    first, hit = cached_latency_model(model, x, LatencyConfig(), builder)
    assert not hit and len(builds) == 1
    again, hit = cached_latency_model(model, x, LatencyConfig(), builder)
    assert hit and len(builds) == 1 and again == first
    assert cache_path(first.key).parent == tmp_path / "latency"
    _, hit = cached_latency_model(
        model, x, LatencyConfig(batch=4, clock="wall", threads=2), builder
    )
    assert not hit and len(builds) == 2  # another deployment is another measurement


@pytest.mark.parametrize(
    "change",
    ["host", "cpu", "onnxruntime", "batch", "threads", "precision", "model", "input"],
)
def test_the_cache_key_changes_with_everything_the_measurement_depends_on(change, monkeypatch):
    model, x = _tiny_vgg()
    cfg = LatencyConfig()
    before = cache_key(model, x, cfg)
    if change == "host":
        monkeypatch.setattr(latency_cache.platform, "node", lambda: "another-host")
    elif change == "cpu":
        monkeypatch.setattr(latency_cache, "cpu_model", lambda: "Another CPU")
    elif change == "onnxruntime":
        monkeypatch.setattr(latency_cache, "versions", lambda: {"onnxruntime": "0.0.1"})
    elif change in ("batch", "threads", "precision"):
        value = {"batch": 8, "threads": 2, "precision": "int8"}[change]
        cfg = LatencyConfig(**{change: value, "clock": "wall"})
    elif change == "model":
        model, _ = _tiny_vgg(0.25)
    else:
        x = torch.randn(2, 3, 24, 24)
    after = cache_key(model, x, cfg)
    assert after != before and cache_path(after) != cache_path(before)
    bounded = build_model(ModelConfig(name="vgg", width=0.125), num_classes=10, in_channels=3)
    from pipeline.layers.bn import convert_to_bounded_bn_

    convert_to_bounded_bn_(bounded)  # a BN type is not part of the key: it folds away
    assert (
        cache_key(bounded.eval(), torch.randn(2, 3, 16, 16), LatencyConfig())["model"]
        == before["model"]
    )


@pytest.mark.parametrize("damage", ["garbage", "other key"])
def test_a_damaged_or_foreign_cache_file_is_rebuilt(damage, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RECEDE_CACHE", str(tmp_path))
    model, x = _tiny_vgg()
    built, _ = cached_latency_model(model, x, LatencyConfig(), _fake_model)
    path = cache_path(built.key)
    if damage == "garbage":
        path.write_text("{not json")
    else:
        raw = json.loads(path.read_text())
        raw["key"]["machine"]["host"] = "elsewhere"
        path.write_text(json.dumps(raw))
    calls = []
    with caplog.at_level(logging.WARNING, logger="pipeline.bench.latency_cache"):
        again, hit = cached_latency_model(
            model, x, LatencyConfig(), lambda *a: calls.append(a) or _fake_model(*a)
        )
    assert not hit and len(calls) == 1
    assert ("rebuilding" if damage == "garbage" else "another key") in caplog.text
    assert json.loads(path.read_text())["key"] == built.key  # the file is whole again


def test_int8_is_refused_saying_what_would_be_timed_in_fp32():
    # The INT8 export exists (recede export --format onnx-int8); the latency model does not time
    # INT8 yet, so the refusal must say that, not that the export is missing.
    with pytest.raises(ConfigError, match="train.latency.precision int8") as err:
        check_deployment(LatencyConfig(precision="int8"))
    said = str(err.value)
    assert INT8_HINT in said and "export exists" not in said
    for part in ("pieces", "profiles", "re-measure", "fp32", "train.latency.precision=fp32"):
        assert part in said, part


def test_tensorrt_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.latency.backend tensorrt"):
        check_deployment(LatencyConfig(backend="tensorrt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.latency.device cuda"):
        check_deployment(LatencyConfig(device="cuda", clock="wall"))
