"""Multiply-accumulates per sample of an ONNX graph, counted as ``count_macs`` counts a model.

``recede bench RELEASE`` times a release folder, which holds ONNX files and no weights, so the
speed-up divided by the MAC ratio (how close latency came to the arithmetic cut) needs the MACs
of the graph itself. Counted like :func:`pipeline.graph.costs.count_macs` counts a PyTorch model
(convolutions and linear layers, once per call):

- ``Conv``: the weight's elements times the output's positions (``C_out x C_in/groups x k_h x
  k_w x H_out x W_out``);
- ``Gemm`` and ``MatMul`` with a constant (weight) operand: ``K x N`` per row, times the rows of
  one sample (a Linear over tokens or a channels-last map is one row per position).

Shapes come from ONNX shape inference with data propagation on the graph at batch 1 (a symbolic
batch would leave a ``flatten`` to tokens, ``Reshape(x, [b, c, -1])``, of unknown length): what
one sample costs is what a batch of one costs. An INT8 (QDQ) graph's
weights pass through ``DequantizeLinear``: those count as constants too. Returns None when a
layer's shape cannot be inferred, rather than a number that is silently short.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.export.onnx_graph import attribute, inferred_shapes


def onnx_macs(path: str | Path) -> int | None:
    """MACs per sample of the graph at ``path`` (module docstring); None when unknown."""
    import onnx

    proto = onnx.load(str(path))
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1  # one sample; clears the symbolic name
    shapes = inferred_shapes(proto)
    graph = proto.graph
    constant = _constants(graph)
    total = 0
    for node in graph.node:
        macs = _node_macs(node, shapes, constant)
        if macs is None:
            return None
        total += macs
    return total


def _constants(graph: Any) -> set[str]:
    """Initializers, Constant outputs, and what DequantizeLinear or Cast make of them."""
    names = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" or (
            node.op_type in ("DequantizeLinear", "Cast", "Identity") and node.input[0] in names
        ):
            names.update(node.output)
    return names


def _elements(dims: list[int | None]) -> int | None:
    """Elements of a value at batch 1; None if any dimension is unknown."""
    return None if any(d is None for d in dims) else math.prod(dims)


def _node_macs(node: Any, shapes: dict, constant: set[str]) -> int | None:
    if node.op_type == "Conv":
        weight, out = shapes.get(node.input[1]), shapes.get(node.output[0])
        if weight is None or out is None or any(d is None for d in weight):
            return None
        positions = _elements(out[2:])  # out[0] is the batch of 1, out[1] the channels
        return None if positions is None else math.prod(weight) * positions
    if node.op_type == "Gemm":
        return _gemm(node, shapes, constant)
    if node.op_type == "MatMul":
        return _matmul(node, shapes, constant)
    return 0


def _gemm(node: Any, shapes: dict, constant: set[str]) -> int | None:
    if node.input[1] not in constant:
        return 0  # two activations multiplied: not a layer's weights (count_macs counts none)
    weight, data = shapes.get(node.input[1]), shapes.get(node.input[0])
    if weight is None or data is None or len(weight) != 2 or None in weight or None in data:
        return None
    return data[1 if attribute(node, "transA", 0) else 0] * math.prod(weight)  # rows x K x N


def _matmul(node: Any, shapes: dict, constant: set[str]) -> int | None:
    if node.input[1] not in constant:
        return 0
    weight, data = shapes.get(node.input[1]), shapes.get(node.input[0])
    if weight is None or data is None or len(weight) != 2 or None in weight:
        return None
    rows = _elements(data[:-1])  # every position of the sample is a row
    return None if rows is None else rows * math.prod(weight)
