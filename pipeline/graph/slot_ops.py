"""Slot rules for function and method ops: element-wise, per-channel, index moves, reductions.

Each table below is one op family; its rule is registered for every name in it
(``pipeline.graph.slot_rules`` says how to add an op or a family). An op in none of them is a barrier.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from pipeline.graph.slot_rules import (
    Interpreter,
    Slots,
    compact,
    expand_channels,
    op_name,
    register_op,
)

ZERO_KEEPING = frozenset(
    {
        "relu",
        "relu_",
        "relu6",
        "leaky_relu",
        "elu",
        "selu",
        "celu",
        "gelu",
        "silu",
        "mish",
        "hardswish",
        "hardtanh",
        "tanh",
        "dropout",
        "dropout2d",
        "neg",
        "abs",
        "identity",
        "contiguous",
        "clone",
        "detach",
        "float",
        "half",
        "double",
        "to",
        "type",
        "type_as",
        "softsign",
        "tanhshrink",
        "stochastic_depth",  # torchvision's stochastic depth scales whole samples
    }
)
ZERO_BREAKING = frozenset({"sigmoid", "hardsigmoid", "exp", "softplus", "cos", "sigmoid_"})
PER_CHANNEL = frozenset(
    {
        "max_pool2d",
        "avg_pool2d",
        "adaptive_avg_pool2d",
        "adaptive_max_pool2d",
        "interpolate",
        "upsample",
        "pad",
        "max_pool1d",
        "avg_pool1d",
        "adaptive_avg_pool1d",
    }
)
INDEX = frozenset(
    {
        "view",
        "reshape",
        "permute",
        "transpose",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
        "cat",
        "concat",
        "stack",
        "split",
        "chunk",
        "unbind",
        "narrow",
        "t",
        "movedim",
        "getitem",
        "__getitem__",
        "roll",
        "flip",
        "repeat",
    }
)
ADD = frozenset(
    {"add", "add_", "iadd", "__add__", "__radd__", "__iadd__"}
    | {"sub", "sub_", "isub", "__sub__", "__rsub__"}
)
DIV = frozenset({"truediv", "div", "div_", "__truediv__"})
MUL = frozenset({"mul", "mul_", "imul", "__mul__", "__rmul__", "__imul__"}) | DIV
REDUCE = frozenset({"mean", "sum", "amax", "amin"})


@register_op(*ZERO_KEEPING, *ZERO_BREAKING)
def elementwise(interp: Interpreter, n: fx.Node, op: str, value: Any) -> Any:
    """One-input element-wise functions: ids pass through; ``zero`` survives iff ``f(0) == 0``."""
    x = interp.tensor_args(n)[0]
    if not isinstance(value, torch.Tensor) or value.shape != x.ids.shape:
        return interp.barrier(n, op, value, "changes shape")
    zero = x.zero if op in ZERO_KEEPING else torch.zeros_like(x.zero)
    return Slots(x.ids, zero, x.const)  # any function of a constant is constant


@register_op(*PER_CHANNEL)
def per_channel(interp: Interpreter, n: fx.Node, op: str, value: Any) -> Any:
    """Spatial ops that keep channel c in channel c (pooling, resize, spatial pad)."""
    x = interp.tensor_args(n)[0]
    if value.dim() != x.ids.dim() or value.dim() < 2 or value.shape[1] != x.ids.shape[1]:
        return interp.barrier(n, op, value, "does not keep the channel axis")
    ids, zero, const = interp.channels_of(x, 1, n)
    if op == "pad" and (n.kwargs.get("value") or (len(n.args) > 3 and n.args[3])):
        zero = torch.zeros_like(zero)
    return Slots(*(expand_channels(t, value.shape, 1) for t in (ids, zero, const)))


@register_op(*INDEX)
def index(interp: Interpreter, n: fx.Node, op: str, value: Any) -> Any:
    """Apply the same index-moving op to the slot and zero tensors."""
    module = interp.module_of(n)
    results = []
    for pick in ("ids", "zero", "const"):
        args, kwargs = interp.substituted(n, pick)
        if n.op == "call_function":
            results.append(n.target(*args, **kwargs))
        elif n.op == "call_method":
            results.append(getattr(args[0], n.target)(*args[1:], **kwargs))
        else:  # nn.Flatten
            results.append(torch.flatten(args[0], module.start_dim, module.end_dim))
    ids, zero, const = results
    problem = _channel_split(interp, n, ids)
    if problem:
        return interp.barrier(n, op_name(n, module), value, problem)
    if isinstance(ids, torch.Tensor):
        return Slots(ids, zero, const)
    return type(ids)(Slots(i, z, c) for i, z, c in zip(ids, zero, const, strict=False))


def _channel_split(interp: Interpreter, n: fx.Node, out: Any) -> str:
    """Tie or refuse index ops that cut or select along the channel axis.

    The pruned model re-runs the same Python code on fewer channels. Pieces whose size is
    computed from the channel count (``chunk``, ``split`` by a traced size,
    ``view(b, groups, c // groups, ...)`` as in channel shuffle, or ``view(b, c // k, k, ...)``)
    stay aligned only if every piece loses the same in-piece indices: those are tied. A cut or
    selection at a literal position (``split(4)``, ``narrow``, ``x[:, :4]``) cannot follow the
    smaller count: barrier.
    """
    base = interp.slots.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
    if not isinstance(base, Slots):  # indexing a tuple of pieces, or cat of a list
        return ""
    x = base.ids
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if x.dim() < 2:
        return ""
    if name in ("chunk", "split", "unbind", "tensor_split"):
        return _split_pieces(interp, n, name, x, out)
    if name in ("view", "reshape", "unflatten") and isinstance(out, torch.Tensor):
        problem = _split_axis(interp, n, x, out)
        if problem:
            return problem
    outs = out if isinstance(out, (tuple, list)) else [out]
    kept = torch.unique(torch.cat([o.reshape(-1) for o in outs]))
    if not bool(torch.isin(torch.unique(x), kept).all()):
        return "selects channels at fixed positions"
    return ""


def _split_pieces(interp: Interpreter, n: fx.Node, name: str, x: torch.Tensor, out: Any) -> str:
    pos = 1 if name == "unbind" else 2
    dim = n.kwargs.get("dim", n.args[pos] if len(n.args) > pos else 0)
    if dim % x.dim() != 1:
        return ""
    size = n.args[1] if len(n.args) > 1 else n.kwargs.get("split_size_or_sections")
    if name in ("unbind", "tensor_split") or len({p.shape[1] for p in out}) > 1:
        return "cuts the channel axis at fixed positions"
    if name == "split" and len(out) > 1 and not isinstance(size, fx.Node):
        return "splits the channel axis at a fixed size"
    for piece in out[1:]:
        interp.uf.union_pairs(out[0], piece)
    return ""


def _split_axis(interp: Interpreter, n: fx.Node, x: torch.Tensor, out: torch.Tensor) -> str:
    """``view`` that splits channels C into (a, b): tie across the factor that is a literal."""
    if not (
        out.dim() == x.dim() + 1
        and out.shape[0] == x.shape[0]
        and out.shape[1] * out.shape[2] == x.shape[1]
        and max(out.shape[1], out.shape[2]) > 1
    ):
        return ""
    sizes = n.args[1:]  # x.view(n, a, b, ...) or torch.reshape(x, (n, a, b, ...))
    sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
    outer, inner = (sizes[1], sizes[2]) if len(sizes) > 2 else (None, None)
    if isinstance(inner, fx.Node) and not isinstance(outer, fx.Node):  # (groups, c // groups)
        interp.uf.union_pairs(out, out[:, :1].expand_as(out))
    elif isinstance(outer, fx.Node) and not isinstance(inner, fx.Node):  # (c // k, k)
        interp.uf.union_pairs(out, out[:, :, :1].expand_as(out))
    else:
        return "splits the channel axis into factors recede cannot attribute"
    return ""


def _operands(interp: Interpreter, n: fx.Node) -> list[tuple[Slots | None, float | None]]:
    """(slots, None) for tensor operands, (None, scalar) for numbers and 1-element tensors."""
    ops: list[tuple[Slots | None, float | None]] = []
    for a in list(n.args[:2]) + [v for k, v in n.kwargs.items() if k == "other"]:
        real = interp.env[a] if isinstance(a, fx.Node) else a
        if isinstance(real, torch.Tensor) and real.numel() > 1:
            ops.append((interp.slots[a], None))
        else:
            ops.append((None, float(real) if real is not None else 0.0))
    return ops


@register_op(*ADD, *MUL)
def binary(interp: Interpreter, n: fx.Node, op: str, value: Any) -> Any:
    """Broadcasting element-wise ops: aligned channels become one group."""
    operands = _operands(interp, n)
    tensors = [s for s, _ in operands if s is not None]
    scalars = [c for s, c in operands if s is None]
    if not tensors:
        return interp.pinned_like(value)
    for other in tensors[1:]:
        interp.uf.union_pairs(tensors[0].ids, other.ids)
    first_ids = tensors[0].ids
    ids = first_ids.expand(value.shape) if first_ids.shape != value.shape else first_ids
    zeros = [s.zero for s in tensors]
    if op in ADD:  # zero iff every operand is zero
        zero = (
            torch.zeros_like(ids, dtype=torch.bool)
            if any(c != 0 for c in scalars)
            else torch.stack(compact(*zeros)).all(0)
        )
    elif op in DIV:  # zero iff the numerator is
        first = operands[0][0]
        numerator = first.zero if first is not None else torch.tensor(operands[0][1] == 0)
        zero = numerator.expand(value.shape)
    else:  # product: zero if any factor is zero
        zero = torch.stack(compact(*zeros)).any(0) | any(c == 0 for c in scalars)
    const = torch.stack(compact(*[s.const for s in tensors])).all(0)
    return Slots(ids, zero.expand(value.shape), const.expand(value.shape))


def _tie_along(interp: Interpreter, ids: torch.Tensor, dim: Any) -> bool:
    """Union the ids that meet along ``dim`` where they still vary along another axis.

    An op that combines the entries along ``dim`` (a sum, a softmax) makes them one unit: output
    entry ``c`` depends on every ``x[..., p, c, ...]``, so removing all of them with ``c`` is
    exact. That holds when ``dim`` is a split-off axis such as the paths axis of a selective-
    kernel block ``(B, paths, C, H, W)``, where ``C`` keeps distinct ids. Combining over the
    channel axis itself would fuse every channel into one group; that returns False (a barrier).
    """
    if not isinstance(dim, int):
        return False
    d = dim % ids.dim()
    (slots,) = compact(ids, keep=d)
    per = slots.movedim(d, 0).reshape(slots.shape[d], -1)
    if per.shape[1] < 2 or bool((per[0] == per[0, :1]).all()):
        return False  # nothing but the combined axis carries channels
    for row in per[1:]:
        interp.uf.union_pairs(per[0], row)
    return True


@register_op(*REDUCE)
def reduce(interp: Interpreter, n: fx.Node, op: str, value: Any) -> Any:
    """Reductions over axes other than channels keep each channel's id.

    Over a split-off axis whose ids vary (the paths of a selective kernel) the ids meeting
    along it become one group (:func:`_tie_along`).
    """
    x = interp.tensor_args(n)[0]
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    keep = bool(n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False))
    if dim is None or isinstance(dim, fx.Node):
        return interp.barrier(n, op, value, "reduces every axis")
    lo = x.ids.amin(dim=dim, keepdim=keep)
    varies = not torch.equal(lo, x.ids.amax(dim=dim, keepdim=keep))
    if varies and not _tie_along(interp, x.ids, dim):
        return interp.barrier(n, op, value, "reduces over the channel axis")
    zero = x.zero.to(torch.uint8).amin(dim=dim, keepdim=keep).bool()
    const = x.const.to(torch.uint8).amin(dim=dim, keepdim=keep).bool()
    return Slots(lo, zero, const)


@register_op("softmax", "log_softmax")
def softmax(interp: Interpreter, n: fx.Node, op: str, value: Any) -> Any:
    """A softmax ties the entries it normalises together (:func:`_tie_along`); never zero."""
    x = interp.tensor_args(n)[0]
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    if not isinstance(dim, int) or value.shape != x.ids.shape:
        return interp.barrier(n, op, value, "softmax over no fixed axis")
    varies = not torch.equal(x.ids.amin(dim, keepdim=True), x.ids.amax(dim, keepdim=True))
    if varies and not _tie_along(interp, x.ids, dim):
        return interp.barrier(n, op, value, "normalises across the channel axis")
    const = x.const.to(torch.uint8).amin(dim, keepdim=True).bool().expand(value.shape)
    return Slots(x.ids, torch.zeros((), dtype=torch.bool).expand(value.shape), const)
