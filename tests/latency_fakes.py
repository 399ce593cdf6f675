"""Synthetic latency for tests: a cost per layer that knows the layer's shape and alignment, as
a table (a LatencyModel) or as a fake piece clock that reads the ONNX piece it is given."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.bench.latency_pieces import LayerGeometry, layer_geometries
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.graph.latency_cost import Blocking, LatencyModel, LayerTable, axis_points

BLOCKS = Blocking(align=16, quantum=4)
DEPLOYMENT = {
    "backend": "onnxruntime",
    "device": "cpu",
    "precision": "fp32",
    "batch": 1,
    "threads": 1,
    "clock": "cpu",
}
SLOW = 2.0  # a slow (unaligned) input width costs twice its arithmetic


def layer_cost(geom: LayerGeometry, cin: int, cout: int) -> float:
    """ms of one layer: its MACs at 1 GMAC/s, input widths off the quantum twice as slow."""
    groups = cin if geom.kind == "depthwise" else geom.groups
    area = geom.in_hw[0] * geom.in_hw[1] // (geom.stride[0] * geom.stride[1])
    kernel = geom.kernel[0] * geom.kernel[1]
    macs = area * kernel * (cin // groups) * cout
    return 1e-6 * macs * (1.0 if BLOCKS.fast(cin) else SLOW) + 1e-4


def synthetic_latency(
    model: nn.Module, example: torch.Tensor, offset: float = 0.01, scale: float = 1.0
) -> LatencyModel:
    """A latency model of ``model`` whose tables are :func:`layer_cost` at the usual points."""
    net = model.eval()
    graph = build_channel_graph(net, example[:1])
    tables = []
    for g in layer_geometries(net, graph, example[:1]):
        ins = axis_points(g.cin, BLOCKS.align, BLOCKS.quantum, g.prunable_in)
        if g.kind == "depthwise":
            ms = tuple((layer_cost(g, c, c),) for c in ins)
            tables.append(LayerTable(g.name, g.kind, g.cin, g.cout, ins, (), ms))
            continue
        outs = tuple(
            p
            for p in axis_points(g.cout, BLOCKS.align, BLOCKS.quantum, g.prunable_out)
            if p % BLOCKS.align == 0 or p == g.cout
        )
        ms = tuple(tuple(layer_cost(g, ci, co) for co in outs) for ci in ins)
        tables.append(LayerTable(g.name, g.kind, g.cin, g.cout, ins, outs, ms))
    return LatencyModel(tuple(tables), BLOCKS.align, BLOCKS.quantum, offset, scale, DEPLOYMENT)


def piece_clock(calls: list[bytes] | None = None):
    """A fake piece timer: the ms of the one Conv/Gemm in the serialised piece (by its weight
    and input shapes), recording every piece it was given in ``calls``."""
    import onnx
    from onnx import numpy_helper

    def timer(proto: bytes) -> float:
        if calls is not None:
            calls.append(proto)
        model = onnx.load_from_string(proto)
        if not model.graph.initializer:  # the overhead piece
            return 0.001
        w = numpy_helper.to_array(model.graph.initializer[0])
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        cin = shape[1]
        node = model.graph.node[0]
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        macs = w.size * (shape[2] * shape[3] if len(shape) == 4 else 1)
        kind_fast = BLOCKS.fast(cin) or groups > 1 and groups == cin and BLOCKS.fast(cin)
        return 0.001 + 1e-6 * macs * (1.0 if kind_fast else SLOW) + 1e-4

    return timer
