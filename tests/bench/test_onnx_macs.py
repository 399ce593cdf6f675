"""MACs counted on an ONNX graph (``pipeline.bench.onnx_macs``) are the PyTorch model's
(``count_macs`` and forward hooks), over random nets with every reader kind, fp32 and INT8."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.bench.onnx_macs import onnx_macs
from pipeline.export.onnx import export_onnx
from pipeline.graph.costs import count_macs
from tests.graph.random_nets import BLOCKS, RandomNet, hook_macs, shift_bns_

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SHAPE = (3, 12, 12)


@settings(max_examples=10, deadline=None)
@given(
    st.lists(st.sampled_from([*BLOCKS, "upsample"]), min_size=1, max_size=4),
    st.integers(0, 2), st.integers(0, 1000),
)  # fmt: skip
def test_an_onnx_graph_counts_the_macs_of_its_model(kinds, repeat, seed):
    """(No adaptive pool: torch cannot export one after a token mixer at a symbolic batch.)"""
    import tempfile
    from pathlib import Path

    torch.manual_seed(seed)
    model = shift_bns_(RandomNet(kinds, 8, repeat, 2), seed)
    x = torch.randn(2, *SHAPE)
    want = count_macs(model, SHAPE)
    assert want == hook_macs(model, x[:1])
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, x, Path(tmp, "m.onnx"), simplify=False)
        assert onnx_macs(path) == want


def test_an_int8_graph_counts_the_same_macs_and_a_wider_layer_would_show(tmp_path):
    from pipeline.export.int8 import Int8Options, preprocess, quantize_int8

    model = shift_bns_(RandomNet(["conv", "tokens"], 8, 1, 2), 0)
    x = torch.randn(2, *SHAPE)
    fp32 = export_onnx(model, x, tmp_path / "m.onnx", simplify=False)
    int8 = tmp_path / "m.int8.onnx"
    samples = torch.randn(16, *SHAPE).numpy()
    quantize_int8(preprocess(fp32, tmp_path / "pre.onnx"), int8, samples, Int8Options())
    assert onnx_macs(int8) == onnx_macs(fp32) == count_macs(model, SHAPE)
    wider = shift_bns_(RandomNet(["conv", "tokens"], 9, 1, 3), 0)  # one channel more
    assert onnx_macs(export_onnx(wider, x, tmp_path / "w.onnx", simplify=False)) != onnx_macs(fp32)
