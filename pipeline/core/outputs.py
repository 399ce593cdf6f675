"""A model's outputs as a tree of tensors, flattened to named leaves and rebuilt from them.

A model may return a tensor, or tuples, lists and dicts of tensors, nested (torchvision's
segmenters return ``OrderedDict(out=..., aux=...)``, an FPN neck a tuple of feature maps, a
detector a list of dicts). Every check, export and timing in recede works on the **leaves**:

- a single tensor is one leaf named ``output`` (the ONNX output name recede always used);
- otherwise a leaf's name is its path: dict keys, namedtuple fields and sequence positions
  joined by ``.`` (``out``, ``aux``, ``features.0``); a name that would not start with a letter or ``_`` (a
  tuple's ``0``, a numeric key) gets ``output.`` in front (``output.0``, ``output.1.feat``), so
  it never collides with the numbered tensor names ONNX exporters give intermediate values;
- ``None`` is no leaf (``aux=None`` carries nothing), and is kept in the structure.

Anything else (a Python number, a string, an object) is refused with :class:`OutputError`:
recede compares, exports and times tensors, and silently dropping an output would verify less
than the model returns. Leaf names must be unique and differ from the input's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

ROOT = "output"
"""The name of a model's only output, and the prefix of names that do not start with a letter."""

INPUT_NAME = "input"
"""The input's name in exported graphs (``pipeline.export.onnx``); no output may take it."""


class OutputError(ValueError):
    """A model returns something recede cannot treat as a tree of tensors (bad input: exit 2)."""


def _child(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _walk(value: Any, prefix: str, visit: Callable[[str, torch.Tensor], Any]) -> Any:
    """Rebuild ``value`` with every tensor replaced by ``visit(path, tensor)``."""
    if isinstance(value, torch.Tensor):
        return visit(prefix, value)
    if value is None:
        return None
    if isinstance(value, Mapping):
        items = {k: _walk(v, _child(prefix, k), visit) for k, v in value.items()}
        return type(value)(items) if type(value) is not dict else items
    if isinstance(value, (tuple, list)):
        keys = getattr(value, "_fields", None) or range(len(value))  # a namedtuple's fields
        items = [_walk(v, _child(prefix, k), visit) for k, v in zip(keys, value, strict=True)]
        if hasattr(value, "_fields"):  # a namedtuple takes its fields positionally
            return type(value)(*items)
        return type(value)(items)
    where = f"output {leaf_name(prefix)!r}" if prefix else "the model's output"
    raise OutputError(
        f"{where} is a {type(value).__name__}, not a tensor; recede verifies, exports and times "
        "tensors, or tuples, lists and dicts of them (nested); return a tensor there, or "
        "leave that value out of forward's result"
    )


def leaf_name(path: str) -> str:
    """The public name of the leaf at ``path`` (see the module docstring)."""
    if not path:
        return ROOT
    return path if path[0].isalpha() or path[0] == "_" else f"{ROOT}.{path}"


def flatten(value: Any) -> dict[str, torch.Tensor]:
    """The tensors of ``value`` by leaf name, in the order the tree holds them.

    Raises:
        OutputError: a leaf is not a tensor, two leaves share a name, a leaf is named like the
            input, or there is no tensor at all.
    """
    leaves: dict[str, torch.Tensor] = {}

    def visit(path: str, tensor: torch.Tensor) -> None:
        name = leaf_name(path)
        if name in leaves or name == INPUT_NAME:
            raise OutputError(
                f"two outputs would both be named {name!r} (dict keys and positions joined by "
                f"'.', and {INPUT_NAME!r} is the input's name); rename a dict key so every "
                "output has its own name"
            )
        leaves[name] = tensor

    _walk(value, "", visit)
    if not leaves:
        raise OutputError(
            f"the model returned no tensor ({type(value).__name__} without tensors in it); "
            "expected a tensor, or tuples, lists and dicts of tensors"
        )
    return leaves


def structure(value: Any) -> Any:
    """``value`` with every tensor replaced by its leaf name: what :func:`unflatten` rebuilds."""
    return _walk(value, "", lambda path, _: leaf_name(path))


def unflatten(skeleton: Any, leaves: Mapping[str, Any]) -> Any:
    """The tree :func:`structure` described, with each leaf name replaced by ``leaves[name]``."""
    if isinstance(skeleton, str):
        return leaves[skeleton]
    if skeleton is None:
        return None
    if isinstance(skeleton, Mapping):
        items = {k: unflatten(v, leaves) for k, v in skeleton.items()}
        return type(skeleton)(items) if type(skeleton) is not dict else items
    items = [unflatten(v, leaves) for v in skeleton]
    return type(skeleton)(*items) if hasattr(skeleton, "_fields") else type(skeleton)(items)


def map_leaves(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor, structure kept (``.double()``, ``.cpu()``)."""
    return _walk(value, "", lambda _, tensor: fn(tensor))


def as_arrays(value: Any) -> dict[str, Any]:
    """Leaves of a tree of tensors as float64 numpy arrays on the CPU, by name."""
    return {n: t.detach().cpu().double().numpy() for n, t in flatten(value).items()}


def single(value: Any) -> torch.Tensor | None:
    """The tensor itself when ``value`` is one (a one-output model), else None."""
    return value if isinstance(value, torch.Tensor) else None


def batch_axes(value: Any, batch: int) -> dict[str, bool]:
    """Per leaf, whether its first axis is the batch (its size is ``batch``, ``batch`` > 1)."""
    return {n: t.dim() > 0 and batch > 1 and t.shape[0] == batch for n, t in flatten(value).items()}


def describe(value: Any) -> str:
    """``name [shape]`` for every leaf, for messages and summaries."""
    return ", ".join(f"{n} {list(t.shape)}" for n, t in flatten(value).items())
