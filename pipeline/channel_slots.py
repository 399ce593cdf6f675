"""Slot-tensor interpretation: the engine behind ``pipeline.channel_graph``.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from pipeline.bn_act import bn_tail
from pipeline.bounded_bn import BoundedBatchNorm2d

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, BoundedBatchNorm2d)
_ZERO_KEEPING = {
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
    "stochastic_depth",
}  # torchvision's stochastic depth scales whole samples
_ZERO_BREAKING = {"sigmoid", "hardsigmoid", "exp", "softplus", "cos", "sigmoid_"}
_PER_CHANNEL = {
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
_INDEX = {
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
_ADD = {
    "add",
    "add_",
    "iadd",
    "__add__",
    "__radd__",
    "__iadd__",
    "sub",
    "sub_",
    "isub",
    "__sub__",
    "__rsub__",
}
_MUL = {
    "mul",
    "mul_",
    "imul",
    "__mul__",
    "__rmul__",
    "__imul__",
    "truediv",
    "div",
    "div_",
    "__truediv__",
}
_REDUCE = {"mean", "sum", "amax", "amin"}
_MODULE_OPS = {
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


@dataclass(frozen=True)
class Barrier:
    """An op the graph does not understand; channels on both sides of it are kept."""

    op: str
    node: str
    module: str


@dataclass
class _Slots:
    ids: torch.Tensor  # int64, same shape as the value
    zero: torch.Tensor  # bool: exactly zero once its group's BN scale and shift are zeroed
    const: torch.Tensor  # bool: input-independent once its group's BN scale is zeroed


def _compact(*ts: torch.Tensor, keep: int | None = None) -> list[torch.Tensor]:
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


@dataclass
class _UnionFind:
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
        a, b = _compact(a, b)
        key = torch.unique(a.reshape(-1) * len(self.parent) + b.reshape(-1))
        for k in key.tolist():
            self.union(k // len(self.parent), k % len(self.parent))

    def pin(self, ids: torch.Tensor) -> None:
        self.pinned.update(torch.unique(ids).tolist())


def _op_name(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "call_module":
        return _MODULE_OPS.get(type(module), type(module).__name__)
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def tail_ops(bn: nn.Module) -> list[str] | None:
    """Op names of what a BN applies after normalising (``pipeline.bn_act``); ``None``: unknown.

    Activation modules outside torch.nn (timm's ``GELU``, ``Sigmoid``...) are fx-traced alone and
    named by their single call; a tail module holding per-channel parameters (a PReLU with one
    slope per channel) would need pruning itself, so it is unknown too.
    """
    tail = bn_tail(bn)
    if tail is None:
        return None
    ops = []
    for m in tail:
        op = _MODULE_OPS.get(type(m)) or _traced_op(m)
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
    return _op_name(calls[0], inner)


def _is_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return (
        isinstance(value, (tuple, list))
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value)
    )


def _expand_channels(per_channel: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = -1
    return per_channel.view(view).expand(shape)


class SlotInterpreter(fx.Interpreter):
    """Runs the graph on real values and propagates slot/zero tensors beside them."""

    def __init__(self, gm: fx.GraphModule, opaque: dict[str, str] | None = None) -> None:
        super().__init__(gm)
        self.opaque = opaque or {}  # submodules kept whole by the tracing fallback -> why
        self.uf = _UnionFind()
        self.slots: dict[fx.Node, Any] = {}
        self.layers: dict[str, list[Any]] = {}  # name -> [kind, in_ids, out_ids, conv_groups]
        self.bns: list[tuple[str, torch.Tensor]] = []
        self.reads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.barriers: list[Barrier] = []

    # -- plumbing ---------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.slots[n] = self._propagate(n, value)
        return value

    def _pinned_like(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            pid = self.uf.new(1, pinned=True)
            false = torch.zeros((), dtype=torch.bool).expand(value.shape)
            return _Slots(
                pid.view([1] * value.dim()).expand(value.shape) if value.dim() else pid[0],
                false,
                false,
            )
        if _is_tensors(value):
            items = [self._pinned_like(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return None

    def _tensor_args(self, n: fx.Node) -> list[_Slots]:
        found: list[_Slots] = []

        def collect(a: fx.Node) -> fx.Node:
            s = self.slots.get(a)
            items = s if isinstance(s, (tuple, list)) else [s]
            found.extend(x for x in items if isinstance(x, _Slots))
            return a

        fx.node.map_arg((n.args, n.kwargs), collect)
        return found

    def _substituted(self, n: fx.Node, pick: str) -> tuple[tuple, dict]:
        def sub(a: fx.Node) -> Any:
            s = self.slots.get(a)
            if isinstance(s, _Slots):
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

    def _barrier(self, n: fx.Node, op: str, value: Any, why: str = "") -> Any:
        inputs = self._tensor_args(n)
        for s in inputs:
            self.uf.pin(s.ids)
        if inputs:
            self.barriers.append(
                Barrier(op + (f" ({why})" if why else ""), n.name, self._location(n))
            )
        return self._pinned_like(value)

    def _channels_of(
        self, s: _Slots, dim: int, n: fx.Node
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-channel ids along ``dim``; channels whose ids vary by position are pinned."""
        c = s.ids.shape[dim]
        ids, zero, const = (
            t.movedim(dim, 0).reshape(c, -1) for t in _compact(s.ids, s.zero, s.const, keep=dim)
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

    # -- dispatch ---------------------------------------------------------------------------
    def _propagate(self, n: fx.Node, value: Any) -> Any:
        if n.op == "placeholder":
            return self._pinned_like(value)
        if n.op == "get_attr":
            return self._pinned_like(value)
        if n.op == "output":
            for s in self._tensor_args(n):
                self.uf.pin(s.ids)
            return None
        if not _is_tensors(value):
            return None
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(module, nn.Conv2d):
            return self._conv(n, module, value)
        if isinstance(module, nn.Linear):
            return self._linear(n, module, value)
        if isinstance(module, _BN_TYPES):
            return self._bn(n, module, value)
        op = _op_name(n, module)
        if module is not None and type(module) not in _MODULE_OPS:
            return self._barrier(n, op, value, self.opaque.get(n.target, "unsupported layer type"))
        if not self._tensor_args(n):
            return self._pinned_like(value)  # a fresh constant such as torch.zeros(...)
        return self._function(n, op, module, value)

    def _function(self, n: fx.Node, op: str, module: nn.Module | None, value: Any) -> Any:
        x = self._tensor_args(n)[0]
        if op in _ZERO_KEEPING or op in _ZERO_BREAKING:
            if not isinstance(value, torch.Tensor) or value.shape != x.ids.shape:
                return self._barrier(n, op, value, "changes shape")
            zero = x.zero if op in _ZERO_KEEPING else torch.zeros_like(x.zero)
            return _Slots(x.ids, zero, x.const)  # any function of a constant is constant
        if op in _PER_CHANNEL:
            return self._per_channel(n, op, x, value)
        if op in _INDEX or op == "flatten":
            return self._index(n, module, value)
        if op in _ADD or op in _MUL:
            return self._binary(n, op, value)
        if op in _REDUCE:
            return self._reduce(n, op, x, value)
        return self._barrier(n, op, value, "unknown op")

    # -- op families ------------------------------------------------------------------------
    def _index(self, n: fx.Node, module: nn.Module | None, value: Any) -> Any:
        """Apply the same index-moving op to the slot and zero tensors."""
        results = []
        for pick in ("ids", "zero", "const"):
            args, kwargs = self._substituted(n, pick)
            if n.op == "call_function":
                results.append(n.target(*args, **kwargs))
            elif n.op == "call_method":
                results.append(getattr(args[0], n.target)(*args[1:], **kwargs))
            else:  # nn.Flatten
                results.append(torch.flatten(args[0], module.start_dim, module.end_dim))
        ids, zero, const = results
        problem = self._channel_split(n, ids)
        if problem:
            return self._barrier(n, _op_name(n, module), value, problem)
        if isinstance(ids, torch.Tensor):
            return _Slots(ids, zero, const)
        return type(ids)(_Slots(i, z, c) for i, z, c in zip(ids, zero, const, strict=False))

    def _channel_split(self, n: fx.Node, out: Any) -> str:
        """Tie or refuse index ops that cut or select along the channel axis.

        The pruned model re-runs the same Python code on fewer channels. Pieces whose size is
        computed from the channel count (``chunk``, ``split`` by a traced size,
        ``view(b, groups, c // groups, ...)`` as in channel shuffle, or ``view(b, c // k, k, ...)``)
        stay aligned only if every piece loses the same in-piece indices: those are tied. A cut or
        selection at a literal position (``split(4)``, ``narrow``, ``x[:, :4]``) cannot follow the
        smaller count: barrier.
        """
        base = self.slots.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if not isinstance(base, _Slots):  # indexing a tuple of pieces, or cat of a list
            return ""
        x = base.ids
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if x.dim() < 2:
            return ""
        if name in ("chunk", "split", "unbind", "tensor_split"):
            return self._split_pieces(n, name, x, out)
        if name in ("view", "reshape", "unflatten") and isinstance(out, torch.Tensor):
            problem = self._split_axis(n, x, out)
            if problem:
                return problem
        outs = out if isinstance(out, (tuple, list)) else [out]
        kept = torch.unique(torch.cat([o.reshape(-1) for o in outs]))
        if not bool(torch.isin(torch.unique(x), kept).all()):
            return "selects channels at fixed positions"
        return ""

    def _split_pieces(self, n: fx.Node, name: str, x: torch.Tensor, out: Any) -> str:
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
            self.uf.union_pairs(out[0], piece)
        return ""

    def _split_axis(self, n: fx.Node, x: torch.Tensor, out: torch.Tensor) -> str:
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
            self.uf.union_pairs(out, out[:, :1].expand_as(out))
        elif isinstance(outer, fx.Node) and not isinstance(inner, fx.Node):  # (c // k, k)
            self.uf.union_pairs(out, out[:, :, :1].expand_as(out))
        else:
            return "splits the channel axis into factors recede cannot attribute"
        return ""

    def _per_channel(self, n: fx.Node, op: str, x: _Slots, value: torch.Tensor) -> Any:
        """Spatial ops that keep channel c in channel c (pooling, resize, spatial pad)."""
        if value.dim() != x.ids.dim() or value.dim() < 2 or value.shape[1] != x.ids.shape[1]:
            return self._barrier(n, op, value, "does not keep the channel axis")
        ids, zero, const = self._channels_of(x, 1, n)
        if op == "pad" and (n.kwargs.get("value") or (len(n.args) > 3 and n.args[3])):
            zero = torch.zeros_like(zero)
        return _Slots(*(_expand_channels(t, value.shape, 1) for t in (ids, zero, const)))

    def _operands(self, n: fx.Node) -> list[tuple[_Slots | None, float | None]]:
        """(slots, None) for tensor operands, (None, scalar) for numbers and 1-element tensors."""
        ops: list[tuple[_Slots | None, float | None]] = []
        for a in list(n.args[:2]) + [v for k, v in n.kwargs.items() if k == "other"]:
            real = self.env[a] if isinstance(a, fx.Node) else a
            if isinstance(real, torch.Tensor) and real.numel() > 1:
                ops.append((self.slots[a], None))
            else:
                ops.append((None, float(real) if real is not None else 0.0))
        return ops

    def _binary(self, n: fx.Node, op: str, value: torch.Tensor) -> Any:
        """Broadcasting element-wise ops: aligned channels become one group."""
        operands = self._operands(n)
        tensors = [s for s, _ in operands if s is not None]
        scalars = [c for s, c in operands if s is None]
        if not tensors:
            return self._pinned_like(value)
        for other in tensors[1:]:
            self.uf.union_pairs(tensors[0].ids, other.ids)
        ids = (
            tensors[0].ids.expand(value.shape)
            if tensors[0].ids.shape != value.shape
            else tensors[0].ids
        )
        zeros = [s.zero for s in tensors]
        if op in _ADD:  # zero iff every operand is zero
            zero = (
                torch.zeros_like(ids, dtype=torch.bool)
                if any(c != 0 for c in scalars)
                else torch.stack(_compact(*zeros)).all(0)
            )
        elif op in ("truediv", "div", "div_", "__truediv__"):
            first = operands[0][0]
            zero = (first.zero if first is not None else torch.tensor(operands[0][1] == 0)).expand(
                value.shape
            )
        else:  # product: zero if any factor is zero
            zero = torch.stack(_compact(*zeros)).any(0) | any(c == 0 for c in scalars)
        const = torch.stack(_compact(*[s.const for s in tensors])).all(0)
        return _Slots(ids, zero.expand(value.shape), const.expand(value.shape))

    def _reduce(self, n: fx.Node, op: str, x: _Slots, value: torch.Tensor) -> Any:
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        keep = bool(n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False))
        if dim is None or isinstance(dim, fx.Node):
            return self._barrier(n, op, value, "reduces every axis")
        lo = x.ids.amin(dim=dim, keepdim=keep)
        if not torch.equal(lo, x.ids.amax(dim=dim, keepdim=keep)):
            return self._barrier(n, op, value, "reduces over the channel axis")
        zero = x.zero.to(torch.uint8).amin(dim=dim, keepdim=keep).bool()
        const = x.const.to(torch.uint8).amin(dim=dim, keepdim=keep).bool()
        return _Slots(lo, zero, const)

    # -- layers -----------------------------------------------------------------------------
    def _record(
        self, name: str, kind: str, in_ids: torch.Tensor, make_out: Any, groups: int = 1
    ) -> torch.Tensor:
        """Store a layer's channel ids; a layer called twice shares its ids across calls."""
        if name in self.layers:
            self.uf.union_pairs(self.layers[name][1], in_ids)
            return self.layers[name][2]
        out = make_out()
        self.layers[name] = [kind, in_ids, out, groups]
        return out

    def _conv(self, n: fx.Node, m: nn.Conv2d, value: torch.Tensor) -> Any:
        x = self.slots[n.args[0]]
        p_in, z_in, c_in = self._channels_of(x, 1, n)
        g, cin, cout = m.groups, m.in_channels, m.out_channels
        if g == cin == cout:  # depthwise: channel c stays channel c
            out = self._record(n.target, "conv", p_in, lambda: p_in, g)
            zero, const = z_in & (m.bias is None), c_in
        else:
            self.reads.append((n.target, p_in, z_in, c_in))
            if g > 1:  # tie in-group index j across groups so every group keeps the same count
                grid = p_in.view(g, cin // g)
                self.uf.union_pairs(grid, grid[:1].expand_as(grid))
                out = self._record(
                    n.target, "conv", p_in, lambda: self.uf.new(cout // g).repeat(g), g
                )
            else:
                out = self._record(n.target, "conv", p_in, lambda: self.uf.new(cout), g)
            zero = const = torch.zeros(cout, dtype=torch.bool)
        return _Slots(*(_expand_channels(t, value.shape, 1) for t in (out, zero, const)))

    def _linear(self, n: fx.Node, m: nn.Linear, value: torch.Tensor) -> Any:
        x = self.slots[n.args[0]]
        p_in, z_in, c_in = self._channels_of(x, -1, n)
        self.reads.append((n.target, p_in, z_in, c_in))
        out = self._record(n.target, "linear", p_in, lambda: self.uf.new(m.out_features))
        zero = torch.zeros(m.out_features, dtype=torch.bool)
        return _Slots(*(_expand_channels(t, value.shape, -1) for t in (out, zero, zero)))

    def _bn(self, n: fx.Node, m: nn.Module, value: torch.Tensor) -> Any:
        ops = tail_ops(m)
        if ops is None:
            return self._barrier(
                n,
                type(m).__name__,
                value,
                "BatchNorm subclass whose forward or activation recede does not know",
            )
        if any(op not in _ZERO_KEEPING and op not in _ZERO_BREAKING for op in ops):
            return self._barrier(n, "+".join(ops), value, f"activation inside {type(m).__name__}")
        x = self.slots[n.args[0]]
        p, _, c_in = self._channels_of(x, 1, n)
        self._record(n.target, "bn", p, lambda: p)
        affine = getattr(m, "weight", None) is not None
        if affine:
            self.bns.append((n.target, p))
        const = (
            torch.full((), affine).expand(value.shape)
            if affine
            else _expand_channels(c_in, value.shape, 1)
        )
        zero = affine and not any(op in _ZERO_BREAKING for op in ops)  # act(0) = 0 keeps zero
        return _Slots(x.ids, torch.full((), zero).expand(value.shape), const)
