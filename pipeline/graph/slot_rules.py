"""The vocabulary of the slot engine and its rule registry: op name -> rule, layer type -> rule.

A *rule* says how one op family moves channel ids and the ``zero``/``const`` flags from its inputs
to its output (``pipeline.graph.channel_slots`` explains the slot tensors). Rules are plain functions
registered with a decorator, like timm's model registry; the interpreter looks them up and never
branches on op names itself. An op with no rule is a barrier: its channels are pinned and it is
reported. Nothing falls back to "element-wise".

How to add a rule for a new op:

1. Find its name as the interpreter sees it: ``op_name(node, module)`` is the function's
   ``__name__`` (``torch.roll`` -> ``"roll"``), the method name (``x.roll``) or, for a module,
   ``MODULE_OPS[type(module)]``. A torch.nn module that only calls one function gets an entry in
   ``MODULE_OPS`` naming that function, so the function's rule covers it.
2. If the op behaves like an existing family, add its name to that family's table in
   ``pipeline.graph.slot_ops`` (``ZERO_KEEPING``, ``PER_CHANNEL``, ``INDEX``...). Only do so when it
   truly has that family's semantics: ``f(0) == 0`` for ``ZERO_KEEPING``, channel ``c`` stays
   channel ``c`` for ``PER_CHANNEL``, a pure index move for ``INDEX``.
3. Otherwise write a rule ``def rule(interp, node, op, value) -> Slots | None`` and decorate it
   with ``@register_op("name", ...)``; a layer with weights gets
   ``@register_module(LayerType)`` and the signature ``(interp, node, module, value)``; it
   matches subclasses too. Use ``interp.barrier(...)`` for every case the rule cannot prove.
4. Add a case to ``tests/graph/test_channel_graph.py`` that prunes through the op and compares the
   pruned model with the masked one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.fx as fx
from torch import nn


class Interpreter(Protocol):
    """What a slot rule may use of the interpreter that calls it.

    ``pipeline.graph.channel_slots.SlotInterpreter`` is the one implementation; the rules are typed
    against this protocol, so they import nothing from the interpreter (no import circle, not
    even a type-only one).
    """

    env: dict[fx.Node, Any]
    uf: UnionFind
    slots: dict[fx.Node, Any]
    writer_mask: bool

    def module_of(self, n: fx.Node) -> nn.Module | None: ...
    def pinned_like(self, value: Any) -> Any: ...
    def tensor_args(self, n: fx.Node) -> list[Slots]: ...
    def substituted(self, n: fx.Node, pick: str) -> tuple[tuple, dict]: ...
    def barrier(self, n: fx.Node, op: str, value: Any, why: str = "") -> Any: ...
    def channels_of(
        self, s: Slots, dim: int, n: fx.Node
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def record(
        self,
        name: str,
        kind: str,
        in_ids: torch.Tensor,
        make_out: Callable[[], torch.Tensor],
        groups: int = 1,
    ) -> torch.Tensor: ...
    def read(
        self, layer: str, ids: torch.Tensor, zero: torch.Tensor, const: torch.Tensor
    ) -> None: ...
    def gate(self, bn: str, ids: torch.Tensor) -> None: ...


OpRule = Callable[[Interpreter, fx.Node, str, Any], Any]
ModuleRule = Callable[[Interpreter, fx.Node, Any, Any], Any]
_OP_RULES: dict[str, OpRule] = {}
_MODULE_RULES: dict[type[nn.Module], ModuleRule] = {}

# torch.nn modules that call exactly one function: they share that function's rule.
MODULE_OPS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.Hardswish: "hardswish",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.Tanh: "tanh",
    nn.Mish: "mish",
    nn.Identity: "identity",
    nn.Dropout: "dropout",
    nn.Dropout2d: "dropout",
    nn.Hardtanh: "hardtanh",
    nn.Sigmoid: "sigmoid",
    nn.Hardsigmoid: "hardsigmoid",
    nn.MaxPool2d: "max_pool2d",
    nn.AvgPool2d: "avg_pool2d",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
    nn.AdaptiveMaxPool2d: "adaptive_max_pool2d",
    nn.Upsample: "interpolate",
    nn.Flatten: "flatten",
}


def _add_rule(table: dict[Any, Any], keys: tuple[Any, ...], rule: Any, what: Callable[[Any], str]):
    """Enter ``rule`` for every key; a key has one rule (a second is a bug, named by ``what``)."""
    for key in keys:
        if key in table:
            raise ValueError(f"{what(key)} already has the rule {table[key].__name__}")
        table[key] = rule
    return rule


def register_op(*names: str) -> Callable[[OpRule], OpRule]:
    """Decorator: ``rule`` handles the function/method ops ``names``; a name has one rule."""
    return lambda rule: _add_rule(_OP_RULES, names, rule, lambda name: f"op {name!r}")


def register_module(*types: type[nn.Module]) -> Callable[[ModuleRule], ModuleRule]:
    """Decorator: ``rule`` handles layers of ``types`` and of their subclasses."""
    return lambda rule: _add_rule(_MODULE_RULES, types, rule, lambda t: t.__name__)


def op_rule(op: str) -> OpRule | None:
    """The rule registered for ``op``; ``None``: unknown, a barrier."""
    return _OP_RULES.get(op)


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule of the nearest registered class in ``module``'s type hierarchy, if any."""
    return next((_MODULE_RULES[t] for t in type(module).__mro__ if t in _MODULE_RULES), None)


def registered_ops() -> frozenset[str]:
    """Every op name with a rule."""
    return frozenset(_OP_RULES)


def op_name(node: fx.Node, module: nn.Module | None) -> str:
    """The name rules are registered under: function/method name, or ``MODULE_OPS`` entry."""
    if node.op == "call_module":
        return MODULE_OPS.get(type(module), type(module).__name__)
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


@dataclass(frozen=True)
class Barrier:
    """An op the graph does not understand; channels on both sides of it are kept."""

    op: str
    node: str
    module: str


@dataclass
class Slots:
    """What travels beside one tensor value."""

    ids: torch.Tensor  # int64, same shape as the value
    zero: torch.Tensor  # bool: exactly zero once its group's BN scale and shift are zeroed
    const: torch.Tensor  # bool: input-independent once its group's BN scale is zeroed


def compact(*ts: torch.Tensor, keep: int | None = None) -> list[torch.Tensor]:
    """Broadcast ``ts`` together, then keep one slice of every axis that all of them only expand.

    Slot tensors are mostly expanded views (one id per channel); comparing them element by element
    at full resolution would sort millions of equal entries for each residual add.
    """
    ts = list(torch.broadcast_tensors(*ts))
    keep = None if keep is None else keep % max(1, ts[0].dim())
    for d in range(ts[0].dim()):
        if d != keep and ts[0].shape[d] > 1 and all(t.stride(d) == 0 for t in ts):
            ts = [t.narrow(d, 0, 1) for t in ts]
    return ts


def expand_channels(per_channel: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """A per-channel vector broadcast (as a view) to ``shape`` along ``dim``."""
    view = [1] * len(shape)
    view[dim] = -1
    return per_channel.view(view).expand(shape)


@dataclass
class UnionFind:
    """Channel ids and their classes; pinned ids belong to groups that are never pruned."""

    parent: list[int] = field(default_factory=list)
    pinned: set[int] = field(default_factory=set)

    def new(self, n: int, *, pinned: bool = False) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if pinned:
            self.pinned.update(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = compact(a, b)
        key = torch.unique(a.reshape(-1) * len(self.parent) + b.reshape(-1))
        for k in key.tolist():
            self.union(k // len(self.parent), k % len(self.parent))

    def pin(self, ids: torch.Tensor) -> None:
        self.pinned.update(torch.unique(ids).tolist())
