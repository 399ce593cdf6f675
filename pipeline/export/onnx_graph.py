"""Reading an ONNX graph: a node's attribute, and every value's shape after shape inference.

Shared by the graph rewrites (``pipeline.export.static_resize``) and the graph's MAC count
(``pipeline.bench.onnx_macs``).
"""

from __future__ import annotations

from typing import Any


def attribute(node: Any, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` where it is not set."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def inferred_shapes(proto: Any) -> dict[str, list[int | None]]:
    """Every value's shape (inputs, intermediates, outputs, initializers) after ONNX shape
    inference with data propagation (a shape computed from ``Shape`` ops resolves); ``None``
    for a dimension that stays symbolic. ``proto`` is not changed."""
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(proto, data_prop=True).graph
    shapes = {
        v.name: [
            d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim
        ]
        for v in (*graph.input, *graph.value_info, *graph.output)
    }
    shapes.update({init.name: list(init.dims) for init in graph.initializer})
    return shapes
