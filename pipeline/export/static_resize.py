"""Resize nodes whose output size is fixed get constant scales, so ONNX Runtime takes its fast path.

``F.interpolate(x, size=other.shape[-2:])`` (every torchvision segmenter's last step, the
LR-ASPP and FPN top-down paths) is exported by torch as ``Resize(x, sizes=Concat(Slice(Shape(x),
0, 2), [H_out, W_out]))``: with a symbolic batch axis the sizes are computed at run time, and
ONNX Runtime's CPU Resize then recomputes its coordinate tables on every call. On the pruned
``lraspp_mobilenet_v3_large`` at 256 px (one thread, 2026-12-07) the two Resize nodes took
3.2 ms of a 14.8 ms run that way and 1.3 ms with constant scales: a fixed cost that pruning
cannot shrink and that hid a third of the speed-up the MAC cut bought.

:func:`constant_scales` rewrites such a node to ``Resize(x, scales=[1, 1, H_out/H, W_out/W])``
**only where that is exact**: the sizes' first two entries are ``Shape(x)[0:2]`` of the node's
own input (so batch and channels keep their size), the input's and output's spatial sizes are
static (ONNX shape inference with data propagation computes the rest of the sizes), and in float32 (as ONNX Runtime computes both) ``H_out / H`` times ``H`` is
exactly ``H_out``. With sizes given, ONNX Runtime maps coordinates with the scale
``float(H_out) / float(H)`` and outputs ``H_out``; with that same scale given it outputs
``floor(H * scale)``, which the check makes ``H_out`` (in float32 and float64 alike): the same
output size and coordinate mapping. The values agree to float32 rounding, not bit for bit
(the constant-scale node runs another kernel: 6e-8 apart on outputs of about 1,
``tests/export/test_static_resize.py``). Any other Resize is left as it is (correct, only
slower). The export is verified against PyTorch afterwards like any other.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.export.onnx_graph import attribute, inferred_shapes

logger = logging.getLogger(__name__)


def constant_scales(proto: Any) -> int:
    """Rewrite, in place, every Resize of ``proto`` whose sizes can exactly be constant scales
    (module docstring); drop the nodes and initializers left unused. Returns how many."""
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:  # the exporter writes small constants as Constant nodes
        value = attribute(node, "value") if node.op_type == "Constant" else None
        if value is not None:
            constants[node.output[0]] = numpy_helper.to_array(value)
    shapes = inferred_shapes(proto)
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Resize" or len(node.input) != 4 or not node.input[3]:
            continue
        if not _keeps_batch_and_channels(node, producer, constants):
            continue
        shape, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if shape is None or out is None or len(shape) != len(out) or len(shape) < 3:
            continue
        scales = _exact_scales(shape[2:], out[2:])
        if scales is None:
            continue
        name = f"{node.name or node.output[0]}/constant_scales"
        graph.initializer.append(
            numpy_helper.from_array(np.array([1.0, 1.0, *scales], dtype=np.float32), name)
        )
        node.input[2] = name
        del node.input[3]
        rewritten += 1
    if rewritten:
        _drop_unused(graph)
        logger.info("%d Resize node(s) given constant scales (exact)", rewritten)
    return rewritten


def _keeps_batch_and_channels(node: Any, producer: dict, constants: dict) -> bool:
    """Whether the node's sizes are ``Concat(Shape(x)[0:2], spatial)`` of its own input ``x``:
    batch and channels keep their size, so their scale is exactly 1. The spatial sizes are
    read from shape inference with data propagation (they are computed from static shapes)."""
    concat = producer.get(node.input[3])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        return False
    if attribute(concat, "axis") != 0:
        return False
    head = producer.get(concat.input[0])
    if head is None or head.op_type != "Slice" or len(head.input) < 3:
        return False
    shape_of = producer.get(head.input[0])
    if shape_of is None or shape_of.op_type != "Shape" or shape_of.input[0] != node.input[0]:
        return False
    if shape_of.attribute:  # Shape's start/end would change what the slice reads
        return False
    bounds = [constants.get(name) for name in head.input[1:]]
    if any(b is None for b in bounds):
        return False
    starts, ends, *rest = (b.reshape(-1).tolist() for b in bounds)
    axes = rest[0] if rest else [0]
    steps = rest[1] if len(rest) > 1 else [1]
    return (starts, ends, axes, steps) == ([0], [2], [0], [1])


def _exact_scales(inputs: list[int | None], outputs: list[int | None]) -> list[float] | None:
    """``out / in`` per axis in float32 where ``floor(in * scale)`` gives back ``out`` exactly
    in float32 (ONNX Runtime's kernel) and in float64 (ONNX and ONNX Runtime's shape inference;
    scale 1.8 from 5 to 9 passes the first and not the second, and ONNX Runtime then declared
    one output size and produced another); None where any axis is symbolic or would not."""
    import numpy as np

    scales = []
    for size, out in zip(inputs, outputs, strict=True):
        if not size or not out:
            return None
        scale = np.float32(out) / np.float32(size)
        in_float32 = int(np.floor(np.float32(size) * scale))
        in_float64 = int(np.floor(np.float64(size) * np.float64(scale)))
        if in_float32 != out or in_float64 != out:
            return None
        scales.append(float(scale))
    return scales


def _drop_unused(graph: Any) -> None:
    """Remove nodes no output depends on (a subgraph's reads count), then the initializers and
    value infos of what is gone."""
    needed = {out.name for out in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for field in (graph.initializer, graph.value_info):
        for item in [item for item in field if item.name not in needed]:
            field.remove(item)


def _reads(node: Any) -> set[str]:
    """The names ``node`` reads, its subgraphs' (If, Loop, Scan) outer-scope reads included."""
    from onnx import AttributeProto

    names = {i for i in node.input if i}
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == AttributeProto.GRAPH else []
        graphs += list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []
        for sub in graphs:
            for inner in sub.node:
                names |= _reads(inner)
    return names
