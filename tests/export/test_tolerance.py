"""The one tolerance policy: relative to the output scale, per precision, NaN never passes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.core.tolerance import TOLERANCES, tolerance_for


def test_bound_scales_with_the_output() -> None:
    fp32 = tolerance_for("fp32")
    assert fp32.bound(100.0) == pytest.approx(100 * fp32.rtol + fp32.atol)
    assert fp32.allows(0.9 * fp32.bound(100.0), 100.0)
    assert not fp32.allows(0.9 * fp32.bound(100.0), 1.0)  # the same error on a smaller output


def test_precisions_are_ordered_and_nan_fails() -> None:
    assert TOLERANCES["fp32"].rtol < TOLERANCES["fp16"].rtol < TOLERANCES["int8"].rtol
    for policy in TOLERANCES.values():
        assert not policy.allows(math.nan, 1.0) and not policy.allows(math.inf, 1.0)
    assert tolerance_for("fp32", atol=0.5).atol == 0.5
    with pytest.raises(ValueError, match="fp32, fp16, int8"):
        tolerance_for("bf8")


def test_fp16_onnx_verification_catches_a_changed_weight(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from pipeline.export.onnx import export_onnx, verify_onnx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 4))
    x = torch.randn(3, 3, 8, 8)
    path = export_onnx(net, x[:2], tmp_path / "h.onnx", half=True, simplify=False)
    check = verify_onnx(path, net, x)
    assert check.passed and check.tolerance["precision"] == "fp16" and check.max_abs_err > 0
    proto = onnx.load(str(path))
    weight = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    array = onnx.numpy_helper.to_array(weight).copy()
    array[0] *= 1.1  # a 10% change of one output channel's filter
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    assert not verify_onnx(tmp_path / "bad.onnx", net, x).passed
