"""Resize nodes given constant scales (``pipeline.export.static_resize``): rewritten where
float32 and float64 give back every output size, left alone elsewhere; ONNX Runtime's outputs
have the shape of the graph as torch wrote it and its values to float32 rounding, over random
sizes and modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.export import static_resize
from pipeline.export.onnx import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class UpToSizeOf(torch.nn.Module):
    """A segmenter's last step: features resized to the size of another tensor (the input),
    or to a fixed ``size``."""

    def __init__(self, mode: str, size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.mode, self.size = mode, size
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2 if size is None else 1, padding=1)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.head(torch.relu(self.conv(x)))
        return F.interpolate(low, size=self.size or x.shape[-2:], mode=self.mode)


# (in, out) sizes: float32's out/in times in floors back to out, or (the last four) not
SIZES = [(5, 10), (4, 7), (7, 13), (6, 4), (9, 9), (5, 9), (7, 31), (11, 13), (11, 26)]
ROUNDING = 4 * 2.0**-23  # a few float32 ulps of the output's scale: another kernel's sums


def _exported(model: torch.nn.Module, size: tuple[int, int], path, rewrite: bool):
    example = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    if rewrite:
        export_onnx(model, example, path, simplify=False)
    else:
        original = static_resize.constant_scales
        static_resize.constant_scales = lambda proto: 0
        try:
            export_onnx(model, example, path, simplify=False)
        finally:
            static_resize.constant_scales = original
    return onnx.load(str(path))


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _resizes(proto) -> list[list[str]]:
    return [list(n.input) for n in proto.graph.node if n.op_type == "Resize"]


@settings(max_examples=16, deadline=None)
@given(
    st.sampled_from(SIZES), st.sampled_from(SIZES), st.sampled_from(["bilinear", "nearest"]),
    st.booleans(),
)  # fmt: skip
def test_a_resize_is_rewritten_exactly_where_float32_gives_its_size_back(hs, ws, mode, fixed):
    import tempfile
    from pathlib import Path

    torch.manual_seed(hs[0] * 100 + ws[0])
    if fixed:  # interpolate(size=(H_out, W_out)) from an input of (H, W)
        (h, out_h), (w, out_w) = hs, ws
        model, low = UpToSizeOf(mode, (out_h, out_w)).eval(), [h, w]
    else:  # interpolate(size=x.shape[-2:]) after a stride-2 conv
        h, w = hs[1] + 2, ws[1] + 2
        model, low, out_h, out_w = UpToSizeOf(mode).eval(), [(h + 1) // 2, (w + 1) // 2], h, w
    exact = static_resize._exact_scales(low, [out_h, out_w]) is not None
    with tempfile.TemporaryDirectory() as tmp:
        rewritten = _exported(model, (h, w), Path(tmp, "a.onnx"), rewrite=True)
        _exported(model, (h, w), Path(tmp, "b.onnx"), rewrite=False)
        inputs = _resizes(rewritten)
        assert len(inputs) == 1
        assert (inputs[0][2] != "" and len(inputs[0]) == 3) == exact, inputs
        assert not any(n.op_type == "Shape" for n in rewritten.graph.node) or not exact
        for batch in (1, 3):  # the batch axis stays symbolic
            x = np.random.default_rng(batch).standard_normal((batch, 3, h, w)).astype(np.float32)
            got, want = _run(Path(tmp, "a.onnx"), x), _run(Path(tmp, "b.onnx"), x)
            with torch.no_grad():
                assert got.shape == tuple(model(torch.from_numpy(x)).shape)
            assert np.abs(got - want).max() <= ROUNDING * np.abs(want).max()


def test_the_comparison_catches_a_rewrite_that_is_not_exact(tmp_path, monkeypatch):
    """7 -> 31 in float32: 31/7 times 7 floors to 30. Forced, the rewrite changes the output
    size, and the comparison above would fail."""
    assert static_resize._exact_scales([7], [31]) is None
    model = UpToSizeOf("bilinear", (31, 31)).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 7, 7)).astype(np.float32)
    _exported(model, (7, 7), tmp_path / "b.onnx", rewrite=False)
    monkeypatch.setattr(
        static_resize, "_exact_scales",
        lambda a, b: [float(np.float32(o) / np.float32(i)) for i, o in zip(a, b, strict=True)],
    )  # fmt: skip
    _exported(model, (7, 7), tmp_path / "a.onnx", rewrite=True)
    forced, want = _run(tmp_path / "a.onnx", x), _run(tmp_path / "b.onnx", x)
    assert forced.shape != want.shape


def test_the_segmenter_pattern_is_rewritten_and_its_shape_nodes_dropped(tmp_path):
    model = UpToSizeOf("bilinear").eval()
    proto = _exported(model, (16, 16), tmp_path / "a.onnx", rewrite=True)
    (inputs,) = _resizes(proto)
    scales = next(i for i in proto.graph.initializer if i.name == inputs[2])
    assert onnx.numpy_helper.to_array(scales).tolist() == [1.0, 1.0, 2.0, 2.0]
    assert not any(n.op_type in ("Shape", "Concat") for n in proto.graph.node)
