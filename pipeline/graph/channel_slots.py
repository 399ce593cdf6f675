"""Slot-tensor interpretation: the engine behind ``pipeline.graph.channel_graph``.

Every tensor in the interpretation carries a *slot tensor* of the same shape: each element holds
the id of the channel it came from. Index-moving ops (view, permute, cat, split, getitem, flatten,
channel shuffle...) are applied verbatim to the slot tensors, so index mappings are exact by
construction. Broadcasting element-wise ops (residual adds, SE gates) union the ids they line up.
Convs and linears start new ids; depthwise convs pass them through; grouped convs tie the same
in-group index across groups so groups stay equal.

Beside the ids travel two boolean tensors: ``zero`` (the element is exactly zero once its group's
BN scale and shift are zeroed) and ``const`` (the element is input-independent once only the
scale is zeroed). An op this module does not understand is a barrier: its inputs and outputs are
pinned and it is recorded with its location. Nothing is ever guessed.

The interpreter only plumbs values and looks rules up; what each op does lives in registered
rules: ``pipeline.graph.slot_ops`` (functions and methods) and ``pipeline.graph.slot_layers`` (convs,
linears, BNs). ``pipeline.graph.slot_rules`` holds the registry and says how to add a rule for a new op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from pipeline.graph import slot_layers, slot_ops  # noqa: F401 - importing them registers their rules
from pipeline.graph.slot_rules import (
    MODULE_OPS,
    Barrier,
    Slots,
    UnionFind,
    compact,
    module_rule,
    op_name,
    op_rule,
)

logger = logging.getLogger(__name__)

_SHARED = (
    "called more than once: shared weights hold one set of constant corrections, which "
    "cannot be exact for every call's input"
)


@dataclass(frozen=True)
class LayerRecord:
    """Channel ids a conv, linear or BN layer reads (``in_ids``) and writes (``out_ids``)."""

    kind: str  # "conv" | "linear" | "bn"
    in_ids: torch.Tensor
    out_ids: torch.Tensor
    conv_groups: int = 1


@dataclass(frozen=True)
class Read:
    """A conv/linear that mixes its input channels; per input channel, its id and flags."""

    layer: str
    ids: torch.Tensor
    zero: torch.Tensor  # the channel reads exactly zero under its group's mask
    const: torch.Tensor  # the channel reads a constant once its group's BN scale is zeroed


@dataclass(frozen=True)
class Gate:
    """An affine BN: ``ids[c]`` is the id its channel ``c`` gates."""

    bn: str
    ids: torch.Tensor


def _is_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return (
        isinstance(value, (tuple, list))
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value)
    )


class SlotInterpreter(fx.Interpreter):
    """Runs the graph on real values and propagates slot/zero tensors beside them."""

    def __init__(
        self, gm: fx.GraphModule, opaque: dict[str, str] | None = None, *, writer_mask: bool = False
    ) -> None:
        super().__init__(gm)
        self.opaque = opaque or {}  # submodules kept whole by the tracing fallback -> why
        self.writer_mask = writer_mask  # flags under zeroed filter rows (pipeline.graph.slot_layers)
        self.uf = UnionFind()
        self.slots: dict[fx.Node, Any] = {}
        self.layers: dict[str, LayerRecord] = {}
        self.gates: list[Gate] = []
        self.reads: list[Read] = []
        self.barriers: list[Barrier] = []

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.slots[n] = self._propagate(n, value)
        return value

    def _propagate(self, n: fx.Node, value: Any) -> Any:
        """Dispatch: layer rules by module type, then op rules by name; no rule is a barrier."""
        if n.op in ("placeholder", "get_attr"):
            return self.pinned_like(value)
        if n.op == "output":
            for s in self.tensor_args(n):
                self.uf.pin(s.ids)
            return None
        if not _is_tensors(value):
            return None
        module = self.module_of(n)
        layer_rule = module_rule(module) if module is not None else None
        if layer_rule is not None:
            again = n.target in self.layers
            out = layer_rule(self, n, module, value)
            if again and self.layers[n.target].kind != "bn":  # a BN holds no corrections
                self._shared(n, op_name(n, module))
            return out
        op = op_name(n, module)
        if module is not None and type(module) not in MODULE_OPS:
            return self.barrier(n, op, value, self.opaque.get(n.target, "unsupported layer type"))
        if not self.tensor_args(n):
            return self.pinned_like(value)  # a fresh constant such as torch.zeros(...)
        rule = op_rule(op)
        if rule is None:
            return self.barrier(n, op, value, "unknown op")
        return rule(self, n, op, value)

    # -- helpers the rules use ----------------------------------------------------------------
    def module_of(self, n: fx.Node) -> nn.Module | None:
        """The submodule a ``call_module`` node calls; ``None`` for functions and methods."""
        return self.module.get_submodule(n.target) if n.op == "call_module" else None

    def pinned_like(self, value: Any) -> Any:
        """Slots for ``value`` (a tensor or a tuple/list of them) with fresh pinned ids."""
        if isinstance(value, torch.Tensor):
            pid = self.uf.new(1, pinned=True)
            false = torch.zeros((), dtype=torch.bool).expand(value.shape)
            ids = pid.view([1] * value.dim()).expand(value.shape) if value.dim() else pid[0]
            return Slots(ids, false, false)
        if _is_tensors(value):
            items = [self.pinned_like(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return None

    def tensor_args(self, n: fx.Node) -> list[Slots]:
        """Slots of every tensor argument of ``n``, in argument order (tuples flattened)."""
        found: list[Slots] = []

        def collect(a: fx.Node) -> fx.Node:
            s = self.slots.get(a)
            items = s if isinstance(s, (tuple, list)) else [s]
            found.extend(x for x in items if isinstance(x, Slots))
            return a

        fx.node.map_arg((n.args, n.kwargs), collect)
        return found

    def substituted(self, n: fx.Node, pick: str) -> tuple[tuple, dict]:
        """``n``'s arguments with the data operand replaced by its ``ids``/``zero``/``const``."""

        def sub(a: fx.Node) -> Any:
            s = self.slots.get(a)
            if isinstance(s, Slots):
                return getattr(s, pick).contiguous()
            if isinstance(s, (tuple, list)):
                return type(s)(getattr(x, pick).contiguous() for x in s)
            return self.env[a]

        # Only the data operand (first argument) is substituted; index tensors stay real.
        first = fx.node.map_arg(n.args[:1], sub) if n.args else ()
        return tuple(first) + tuple(
            n.args[1:] and fx.node.map_arg(n.args[1:], self.env.__getitem__)
        ), dict(fx.node.map_arg(n.kwargs, self.env.__getitem__))

    def _location(self, n: fx.Node) -> str:
        stack = n.meta.get("nn_module_stack") or {}
        return next(reversed(stack)) if stack else (n.target if n.op == "call_module" else "<top>")

    def barrier(self, n: fx.Node, op: str, value: Any, why: str = "") -> Any:
        """Pin ``n``'s inputs, report it, and give its outputs fresh pinned ids."""
        inputs = self.tensor_args(n)
        for s in inputs:
            self.uf.pin(s.ids)
        if inputs:
            self.barriers.append(
                Barrier(op + (f" ({why})" if why else ""), n.name, self._location(n))
            )
        return self.pinned_like(value)

    def _shared(self, n: fx.Node, op: str) -> None:
        """Keep a conv/linear called more than once whole: pin its channels, with one barrier.

        Its calls already share their ids (``record``); pinning them keeps every group it reads
        or writes, because one correction per layer cannot absorb each call's constants.
        """
        record = self.layers[n.target]
        self.uf.pin(record.in_ids)
        self.uf.pin(record.out_ids)
        if any(b.module == n.target and b.op.endswith(f"({_SHARED})") for b in self.barriers):
            return
        self.barriers.append(Barrier(f"{op} ({_SHARED})", n.name, n.target))
        logger.warning("%s (%s) is %s; its channels are kept whole", n.target, op, _SHARED)

    def channels_of(
        self, s: Slots, dim: int, n: fx.Node
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-channel ids along ``dim``; channels whose ids vary by position are pinned."""
        c = s.ids.shape[dim]
        ids, zero, const = (
            t.movedim(dim, 0).reshape(c, -1) for t in compact(s.ids, s.zero, s.const, keep=dim)
        )
        lo, hi = ids.amin(1), ids.amax(1)
        zero, const = zero.all(1), const.all(1)
        mixed = lo != hi
        if bool(mixed.any()):
            self.uf.pin(ids[mixed])
            lo = lo.clone()
            lo[mixed] = self.uf.new(1, pinned=True)
            self.barriers.append(
                Barrier("channel axis mixed with other axes", n.name, self._location(n))
            )
        return lo, zero, const

    # -- records ----------------------------------------------------------------------------
    def record(
        self,
        name: str,
        kind: str,
        in_ids: torch.Tensor,
        make_out: Callable[[], torch.Tensor],
        groups: int = 1,
    ) -> torch.Tensor:
        """Store a layer's channel ids; a layer called twice shares its ids across calls."""
        if name in self.layers:
            self.uf.union_pairs(self.layers[name].in_ids, in_ids)
            return self.layers[name].out_ids
        out = make_out()
        self.layers[name] = LayerRecord(kind, in_ids, out, groups)
        return out

    def read(self, layer: str, ids: torch.Tensor, zero: torch.Tensor, const: torch.Tensor) -> None:
        """Record that ``layer`` mixes the channels ``ids`` with these flags."""
        self.reads.append(Read(layer, ids, zero, const))

    def gate(self, bn: str, ids: torch.Tensor) -> None:
        """Record the affine BN ``bn`` as gating ``ids``."""
        self.gates.append(Gate(bn, ids))
