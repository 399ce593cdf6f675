"""Slot rules for layers with weights: convs and linears start channel ids, BNs gate them.

Registered by layer type (``pipeline.graph.slot_rules``); a subclass (bounded BN, timm's ``BatchNormAct2d``,
a corrected conv) uses its base class's rule. Each rule records the layer on the interpreter
(``LayerRecord``), and a conv/linear that reads channels across their axis records a ``Read``.

A conv/linear's fresh output channels are not zero under a BN mask (the BN after it does the
zeroing). Under a *writer mask* (``SlotInterpreter(writer_mask=True)``: the channel's filter
rows and bias zeroed, the mask of a group that no BN gates) they are zero, and constant (the
bias) once only the rows are zeroed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from pipeline.graph.slot_ops import ZERO_BREAKING, ZERO_KEEPING
from pipeline.graph.slot_rules import (
    MODULE_OPS,
    Interpreter,
    Slots,
    expand_channels,
    op_name,
    register_module,
)
from pipeline.layers.bn_act import bn_tail
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.layers.corrected_conv import corrections

SLOT_BN_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, BoundedBatchNorm2d)
"""The exact BN classes the channel graph has a slot rule for (registered by type); every BN
*family* test uses ``pipeline.layers.bn.BN_TYPES`` / ``is_bn`` instead."""


def tail_ops(bn: nn.Module) -> list[str] | None:
    """Op names of what a BN applies after normalising (``pipeline.layers.bn_act``); ``None``: unknown.

    Activation modules outside torch.nn (timm's ``GELU``, ``Sigmoid``...) are fx-traced alone and
    named by their single call; a tail module holding per-channel parameters (a PReLU with one
    slope per channel) would need pruning itself, so it is unknown too.
    """
    tail = bn_tail(bn)
    if tail is None:
        return None
    ops = []
    for m in tail:
        op = MODULE_OPS.get(type(m)) or _traced_op(m)
        if op is None or any(p.numel() > 1 for p in m.parameters()):
            return None
        ops.append(op)
    return ops


def _traced_op(m: nn.Module) -> str | None:
    """The one function an eval-mode activation module calls (``identity`` for none)."""
    was_training = m.training
    try:
        graph = fx.symbolic_trace(m.eval()).graph
    except Exception:  # noqa: BLE001 - fx raises many types; an untraceable tail is unknown
        return None
    finally:
        m.train(was_training)
    calls = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    if len(calls) > 1:
        return None
    if not calls:
        return "identity"
    inner = m.get_submodule(calls[0].target) if calls[0].op == "call_module" else None
    return op_name(calls[0], inner)


def _on_channels(*per_channel: torch.Tensor, shape: torch.Size, dim: int) -> Slots:
    return Slots(*(expand_channels(t, shape, dim) for t in per_channel))


@register_module(nn.Conv2d)
def conv(interp: Interpreter, n: fx.Node, m: nn.Conv2d, value: torch.Tensor) -> Slots:
    """New ids per output channel; depthwise passes ids through; groups tie in-group indices."""
    x = interp.slots[n.args[0]]
    p_in, z_in, c_in = interp.channels_of(x, 1, n)
    g, cin, cout = m.groups, m.in_channels, m.out_channels
    if g == cin == cout:  # depthwise: channel c stays channel c
        out = interp.record(n.target, "conv", p_in, lambda: p_in, g)
        return _on_channels(out, z_in & (m.bias is None), c_in, shape=value.shape, dim=1)
    interp.read(n.target, p_in, z_in, c_in)
    if g > 1:  # tie in-group index j across groups so every group keeps the same count
        grid = p_in.view(g, cin // g)
        interp.uf.union_pairs(grid, grid[:1].expand_as(grid))
        out = interp.record(n.target, "conv", p_in, lambda: interp.uf.new(cout // g).repeat(g), g)
    else:
        out = interp.record(n.target, "conv", p_in, lambda: interp.uf.new(cout), g)
    # Under the writer mask a correction (what a past prune absorbed) still adds itself, and it
    # varies with position and input size: such a writer's channels are neither zero nor const.
    zero = torch.full((cout,), interp.writer_mask and not corrections(m))
    return _on_channels(out, zero, zero, shape=value.shape, dim=1)


@register_module(nn.Linear)
def linear(interp: Interpreter, n: fx.Node, m: nn.Linear, value: torch.Tensor) -> Slots:
    """New ids per output feature; the input features are read."""
    x = interp.slots[n.args[0]]
    p_in, z_in, c_in = interp.channels_of(x, -1, n)
    interp.read(n.target, p_in, z_in, c_in)
    out = interp.record(n.target, "linear", p_in, lambda: interp.uf.new(m.out_features))
    zero = torch.full((m.out_features,), interp.writer_mask)
    return _on_channels(out, zero, zero, shape=value.shape, dim=-1)


@register_module(*SLOT_BN_CLASSES)
def batch_norm(interp: Interpreter, n: fx.Node, m: nn.Module, value: torch.Tensor) -> Any:
    """A BN keeps ids and gates them: zeroing its scale and shift zeroes its channels."""
    ops = tail_ops(m)
    if ops is None:
        why = "BatchNorm subclass whose forward or activation recede does not know"
        return interp.barrier(n, type(m).__name__, value, why)
    if any(op not in ZERO_KEEPING and op not in ZERO_BREAKING for op in ops):
        return interp.barrier(n, "+".join(ops), value, f"activation inside {type(m).__name__}")
    x = interp.slots[n.args[0]]
    p, _, c_in = interp.channels_of(x, 1, n)
    interp.record(n.target, "bn", p, lambda: p)
    affine = getattr(m, "weight", None) is not None
    if affine:
        interp.gate(n.target, p)
    const = (
        torch.full((), affine).expand(value.shape)
        if affine
        else expand_channels(c_in, value.shape, 1)
    )
    zero = affine and not any(op in ZERO_BREAKING for op in ops)  # act(0) = 0 keeps zero
    return Slots(x.ids, torch.full((), zero).expand(value.shape), const)
