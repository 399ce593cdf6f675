"""Channel dependency graph: which channels of which layers must be removed together.

Tracing (``pipeline.graph.tracing``: ``torch.fx`` with torch.nn layers and BN subclasses kept as
leaves, retried with values, then with untraceable parts kept whole) gives the graph, which is
then interpreted on a concrete batch-1 example. fx keeps module boundaries, so every conv, linear and BN is a
``call_module`` node whose qualified name keys the pruning plan; tracing, planning and applying a
50% prune of ``resnet50`` at 224x224 takes about 0.4 s on 2 cores (benchmarks/prune_speed.py). ``torch.export`` was rejected: it lowers to aten ops (module boundaries survive only
as metadata) and costs seconds per model. Interpreting with real values resolves shape arithmetic
such as ShuffleNet's ``x.size()`` to plain integers.

Each tensor carries channel ids and zero/constant flags beside it (``pipeline.graph.channel_slots``).

A *group* is a union-find class of ids. It is prunable when it holds at least one affine BN, no
barrier or graph input/output touches it, and every conv/linear that reads it reads zeros under
the mask. Under that rule, removing the group is exactly equal to masking it. An op the graph
does not understand is a barrier: its inputs and outputs are pinned and it is reported with its
location. Nothing is ever guessed.

A group that no BN gates (timm's ``conv_head``, VGG's fully connected layers as convs) is
*weight-gated*: its mask zeroes the filter rows (and bias) of the convs/linears that write it,
and the same exactness rules are decided by a second interpretation under that mask. Such
groups carry no trained importance, so only ``prune.scope=layer`` selects them, by the L2 norm
of their filter rows (``pipeline.prune.plan.weight_importance``); ``prunable_groups`` and
``removable_groups`` stay the BN-gated ones that training, budgets and thresholds act on.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from pipeline.graph.channel_slots import SlotInterpreter
from pipeline.graph.slot_layers import SLOT_BN_CLASSES, tail_ops
from pipeline.graph.slot_rules import Barrier, op_name
from pipeline.graph.tracing import GraphError, trace, trace_with_leaves

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "GraphError",  # raised here too; defined with the tracing it mostly comes from
    "LayerChannels",
    "build_channel_graph",
    "positively_homogeneous_bns",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerChannels:
    """Group id of each channel of one layer. BN layers have ``in_groups == out_groups``."""

    name: str
    kind: str  # "conv" | "linear" | "bn"
    in_groups: tuple[int, ...]
    out_groups: tuple[int, ...]
    conv_groups: int = 1

    @property
    def depthwise(self) -> bool:
        """A depthwise conv passes channels through: it reads nothing across channels."""
        return self.kind == "conv" and self.conv_groups == len(self.in_groups) == len(
            self.out_groups
        )


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together, with the BN channels that gate them."""

    id: int
    bn_channels: tuple[tuple[str, int], ...]
    size: int  # channel positions across all layers
    prunable: bool  # removal equals zeroing the group's BN scale and shift
    reason: str = ""
    absorbable: bool = False  # removal equals zeroing only the scale, once act(beta) is absorbed

    @property
    def weight_gated(self) -> bool:
        """No BN gates it: its mask zeroes the filter rows (scale) and biases (shift) of its writers."""
        return not self.bn_channels


@dataclass(frozen=True)
class ChannelGraph:
    """The traced dependency structure of a model; plain data."""

    layers: dict[str, LayerChannels]
    groups: tuple[ChannelGroup, ...]
    barriers: tuple[Barrier, ...]
    input_shape: tuple[int, ...]

    @property
    def prunable_groups(self) -> tuple[ChannelGroup, ...]:
        """BN-gated groups whose removal equals zeroing their BN scale and shift (``apply_plan_``)."""
        return tuple(g for g in self.groups if g.prunable and not g.weight_gated)

    @property
    def removable_groups(self) -> tuple[ChannelGroup, ...]:
        """BN-gated groups removable exactly, with constant absorption (``remove_groups``)."""
        return tuple(g for g in self.groups if (g.prunable or g.absorbable) and not g.weight_gated)

    @property
    def weight_groups(self) -> tuple[ChannelGroup, ...]:
        """Groups no BN gates, removable exactly by zeroing their writers' filter rows."""
        return tuple(g for g in self.groups if (g.prunable or g.absorbable) and g.weight_gated)

    def writers(self, group: int) -> list[tuple[str, int]]:
        """(conv/linear, output row) pairs that write ``group``; depthwise convs pass it on."""
        return self._writer_index.get(group, [])

    @cached_property
    def _writer_index(self) -> dict[int, list[tuple[str, int]]]:
        """Every group's writers, built in one pass (asking per group scanned every layer)."""
        index: dict[int, list[tuple[str, int]]] = {}
        for name, layer in self.layers.items():
            if layer.kind != "bn" and not layer.depthwise:
                for i, g in enumerate(layer.out_groups):
                    index.setdefault(g, []).append((name, i))
        return index

    def readers(self, groups: set[int]) -> dict[str, list[int]]:
        """Conv/linear layers (not depthwise) that read ``groups`` -> their input positions."""
        out = {}
        for name, layer in self.layers.items():
            if layer.kind != "bn" and not layer.depthwise:
                idx = [i for i, g in enumerate(layer.in_groups) if g in groups]
                if idx:
                    out[name] = idx
        return out


def has_bns(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer the channel graph gates channels with."""
    return any(isinstance(m, SLOT_BN_CLASSES) for m in model.modules())


def build_channel_graph(
    model: nn.Module, example: torch.Tensor, *, require_bns: bool = True
) -> ChannelGraph:
    """Trace ``model`` on ``example`` (only its first sample is used) and group its channels.

    ``require_bns=False`` builds the graph of a model without BatchNorm too: its channels are
    then all weight-gated (``ChannelGraph.weight_groups``), which only a per-layer prune ranks
    (by filter norm, ``pipeline.prune.plan.weight_importance``).

    Raises:
        GraphError: the model cannot be traced, or (``require_bns``) it has no BatchNorm to
            gate channels.
    """
    if require_bns and not has_bns(model):
        raise GraphError(
            f"{type(model).__name__} has no BatchNorm layer: recede ranks channels by BN scale, so "
            "there is nothing to prune. Add BatchNorm after convs (or use a BN variant of the model)."
        )
    was_training = model.training
    model.eval()  # trace the inference graph: no aux heads, no training-only branches
    try:
        gm, opaque = trace_with_leaves(model, example[:1])
        interp = SlotInterpreter(gm, opaque)
        with torch.no_grad():
            interp.run(example[:1])
            writer_masked = None
            if _writes_without_bn(interp):  # only then is the second interpretation needed
                writer_masked = SlotInterpreter(gm, opaque, writer_mask=True)
                writer_masked.run(example[:1])
    finally:
        model.train(was_training)
    if writer_masked is not None and writer_masked.uf.parent != interp.uf.parent:
        raise GraphError("the writer-masked interpretation grouped channels differently (a bug)")
    return _finalise(interp, writer_masked, tuple(example.shape[1:]))


def _writes_without_bn(interp: SlotInterpreter) -> bool:
    """Whether a conv/linear writes a channel that no BN gates and nothing pins."""
    root = _roots(interp.uf.parent)

    def roots(ids: list[torch.Tensor]) -> set[int]:
        return set(root[torch.cat(ids).numpy()].tolist()) if ids else set()

    covered = roots([g.ids for g in interp.gates])
    covered |= roots([torch.tensor(sorted(interp.uf.pinned), dtype=torch.long)])
    return any(
        roots([rec.out_ids]) - covered
        for rec in interp.layers.values()
        if rec.kind != "bn" and not (rec.conv_groups == len(rec.in_ids) == len(rec.out_ids))
    )


def _roots(parent: list[int]) -> np.ndarray:
    """Union-find roots of every id at once, by pointer jumping (parents always point lower)."""
    root = np.asarray(parent, dtype=np.int64)
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            return root
        root = nxt


def _group_numbers(interp: SlotInterpreter) -> np.ndarray:
    """Id -> group number (-1: never seen by a layer); numbers follow first appearance."""
    root = _roots(interp.uf.parent)
    order = [t for rec in interp.layers.values() for t in (rec.in_ids, rec.out_ids)]
    seen = root[torch.cat(order).numpy()] if order else np.zeros(0, dtype=np.int64)
    uniq, first = np.unique(seen, return_index=True)
    number = np.full(len(root), -1, dtype=np.int64)
    number[uniq[np.argsort(first)]] = np.arange(len(uniq))
    return number[root]


def _finalise(
    interp: SlotInterpreter, writer_masked: SlotInterpreter | None, input_shape: tuple[int, ...]
) -> ChannelGraph:
    """Resolve union-find roots into numbered groups and decide which are prunable."""
    gid_of = _group_numbers(interp)

    def group_ids(ids: torch.Tensor) -> tuple[int, ...]:
        return tuple(gid_of[ids.numpy()].tolist())

    layers = {
        name: LayerChannels(
            name, rec.kind, group_ids(rec.in_ids), group_ids(rec.out_ids), rec.conv_groups
        )
        for name, rec in interp.layers.items()
    }
    bn_channels: dict[int, list[tuple[str, int]]] = {}
    for gate in interp.gates:
        for c, g in enumerate(group_ids(gate.ids)):
            bn_channels.setdefault(g, []).append((gate.bn, c))
    groups = _groups(interp, writer_masked, gid_of, layers, bn_channels)
    graph = ChannelGraph(layers, groups, tuple(interp.barriers), input_shape)
    logger.info(
        "channel graph: %d layers, %d groups (%d prunable, %d weight-gated), %d barriers",
        len(layers),
        len(groups),
        len(graph.prunable_groups),
        len(graph.weight_groups),
        len(graph.barriers),
    )
    return graph


def _groups(
    interp: SlotInterpreter,
    writer_masked: SlotInterpreter | None,
    gid_of: np.ndarray,
    layers: dict[str, LayerChannels],
    bn_channels: dict[int, list[tuple[str, int]]],
) -> tuple[ChannelGroup, ...]:
    """Every group with its size and whether removing it is exact (prunable, absorbable).

    BN-gated groups are judged by ``interp``'s reads (under the BN mask), the others by
    ``writer_masked``'s (under the writer mask; ``None`` when no such group exists).
    """

    def groups_of(ids: torch.Tensor) -> set[int]:
        return {g for g in gid_of[ids.numpy()].tolist() if g >= 0}

    def bad_and_varying(reads: list) -> tuple[set[int], set[int]]:
        return (
            set().union(*(groups_of(r.ids[~r.zero]) for r in reads)),
            set().union(*(groups_of(r.ids[~r.const]) for r in reads)),
        )

    pinned = groups_of(torch.tensor(sorted(interp.uf.pinned), dtype=torch.long))
    bad_bn, varying_bn = bad_and_varying(interp.reads)
    bad_w, varying_w = bad_and_varying(writer_masked.reads if writer_masked else [])
    written = {
        g
        for layer in layers.values()
        if layer.kind != "bn" and not layer.depthwise
        for g in layer.out_groups
    }
    sizes: Counter[int] = Counter()
    for layer in layers.values():
        sizes.update(layer.in_groups)
        sizes.update(layer.out_groups)
    groups = []
    for g in range(int(gid_of.max(initial=-1)) + 1):
        gated = g in bn_channels
        bad_reads, varying_reads = (bad_bn, varying_bn) if gated else (bad_w, varying_w)
        reason = (
            "touches a graph input/output or a barrier"
            if g in pinned
            else "no BatchNorm gates it and no conv/linear writes it"
            if not gated and g not in written
            else "a conv/linear reads it before its BN"
            if gated and g in bad_reads
            else "a conv/linear reads it where zeroed filters leave a varying value"
            if g in bad_reads
            else ""
        )
        absorbable = g not in pinned and (gated or g in written) and g not in varying_reads
        groups.append(
            ChannelGroup(
                g, tuple(bn_channels.get(g, ())), sizes.get(g, 0), not reason, reason, absorbable
            )
        )
    return tuple(groups)


# f(a x) = a f(x) for every a > 0 and every x: scale passes through exactly. Clipping
# activations (ReLU6, Hardtanh) are absent on purpose: they are homogeneous only below the clip.
_POSITIVELY_HOMOGENEOUS = {
    "relu",
    "relu_",
    "leaky_relu",
    "PReLU",
    "identity",
    "dropout",
    "dropout2d",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "max_pool1d",
    "avg_pool1d",
    "adaptive_avg_pool1d",
    "interpolate",
    "mean",
    "sum",
    "amax",
    "amin",
    "flatten",
    "view",
    "reshape",
    "permute",
    "transpose",
    "contiguous",
    "clone",
    "squeeze",
    "unsqueeze",
    "cat",
    "concat",
    "getitem",
    "split",
    "chunk",
}


def positively_homogeneous_bns(model: nn.Module) -> set[str]:
    """BN layers whose every path to its conv/linear readers is positively homogeneous.

    Scaling such a BN's output channel by ``a > 0`` scales what its readers see by exactly
    ``a`` on every input, so the factor can move into the readers' weights (BN conversion, the
    ISTA gamma/W rescaling). Decided from the fx graph's op types, never from one example's
    numbers. A path may not reach a graph output, an unknown op, a residual add or a gate, and
    its readers must be ungrouped convs or linears (grouped readers index inputs per group).
    """
    gm = trace(model)
    modules = dict(model.named_modules())
    return {
        node.target
        for node in gm.graph.nodes
        if node.op == "call_module"
        and isinstance(modules.get(node.target), SLOT_BN_CLASSES)
        and _homogeneous_tail(modules[node.target])
        and _homogeneous_to_readers(node, modules)
    }


def _homogeneous_tail(bn: nn.Module) -> bool:
    ops = tail_ops(bn)
    return ops is not None and set(ops) <= _POSITIVELY_HOMOGENEOUS


def _homogeneous_to_readers(start: fx.Node, modules: dict[str, nn.Module]) -> bool:
    stack, seen = list(start.users), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if getattr(module, "groups", 1) > 1:
                return False
            continue  # a reader: the scale ends in its weights
        if node.op == "output" or op_name(node, module) not in _POSITIVELY_HOMOGENEOUS:
            return False
        stack.extend(node.users)
    return bool(seen)
