"""Structured channel pruning: rank channel groups, plan which to drop, remove them for real.

A plan is data: frozen dataclasses keyed by module qualified names with the kept indices of
every layer that changes. It can be printed, saved as JSON and applied later. Applying a plan
slices conv/linear weights and BN entries in place; it never re-creates module objects, so
hooks, names and the model class survive.

Group importance aggregates the importances of the BN channels that gate the group (sigmoid(w)
for bounded BN, |gamma| for plain BN). The default aggregate is ``max``: a group is only as
unimportant as its most important member, so a residual channel that one block still relies on
is kept. ``mean`` and ``sum`` are available; ``sum`` favours keeping wide coupled groups.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.bounded_bn import BoundedBatchNorm2d, channel_importance
from pipeline.channel_graph import ChannelGraph, LayerChannels

logger = logging.getLogger(__name__)

ZERO_SCALE_LOGIT = -1000.0
"""Bounded-BN logit of a channel whose scale must be exactly zero.

``sigmoid(-1000)`` is exactly 0 in fp16, bf16, fp32 and fp64 (``exp(1000)`` overflows all of
them), so a zeroed channel emits exactly its shift and removing it stays exact. Unlike ``-inf``
the logit is finite: the receding penalty ``s(1 - log s)`` uses ``log s = -softplus(-w)``, which
is -1000 here, so its value and gradient are 0 instead of ``0 * inf = NaN``.
"""


def zero_scale_(bn: nn.Module, channel: int) -> None:
    """Make the scale of one BN channel exactly zero (a finite logit for bounded BN)."""
    bn.weight[channel] = ZERO_SCALE_LOGIT if isinstance(bn, BoundedBatchNorm2d) else 0.0


class PruneError(ValueError):
    """A plan cannot be made or applied; the message says why and what to change."""


@dataclass(frozen=True)
class LayerPlan:
    """Kept input and output channel indices of one layer."""

    name: str
    kind: str
    keep_in: tuple[int, ...]
    keep_out: tuple[int, ...]
    conv_groups: int = 1


@dataclass(frozen=True)
class PrunePlan:
    """Which channel groups to drop, and the resulting per-layer kept indices."""

    dropped_groups: tuple[int, ...]
    layers: tuple[LayerPlan, ...]
    threshold_mode: str
    threshold_value: float | None
    channels_total: int
    channels_kept: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        raw = json.loads(text)
        layers = tuple(
            LayerPlan(
                l["name"], l["kind"], tuple(l["keep_in"]), tuple(l["keep_out"]), l["conv_groups"]
            )
            for l in raw.pop("layers")
        )
        return cls(layers=layers, dropped_groups=tuple(raw.pop("dropped_groups")), **raw)


@dataclass(frozen=True)
class SelectionRules:
    """Constraints on which groups may go.

    Args:
        min_channels: every layer keeps at least this many output channels.
        max_layer_ratio: no layer loses more than this fraction of its output channels.
        round_to: kept output channels of each conv/linear rounded up to a multiple of this.
    """

    min_channels: int = 4
    max_layer_ratio: float = 0.95
    round_to: int = 1


def group_importance(
    model: nn.Module, graph: ChannelGraph, aggregate: str = "max"
) -> dict[int, float]:
    """Importance of each prunable group, aggregated over its BN channels."""
    modules = dict(model.named_modules())
    groups = graph.removable_groups
    per_bn = {
        name: channel_importance(modules[name]).tolist()  # python floats: no per-element tensor ops
        for name in {n for g in groups for n, _ in g.bn_channels}
    }
    reduce = {"max": max, "sum": sum, "mean": lambda v: sum(v) / len(v)}[aggregate]
    return {g.id: float(reduce([per_bn[name][c] for name, c in g.bn_channels])) for g in groups}


def _layer_floors(graph: ChannelGraph, rules: SelectionRules) -> dict[str, tuple[Counter, int]]:
    """Per layer: how many output channels each group holds, and how many must stay."""
    floors = {}
    for name, layer in graph.layers.items():
        total = len(layer.out_groups)
        floor = max(rules.min_channels, math.ceil((1.0 - rules.max_layer_ratio) * total))
        floors[name] = (Counter(layer.out_groups), min(floor, total))
    return floors


def select_groups(
    importance: Mapping[int, float],
    graph: ChannelGraph,
    *,
    threshold: float | None = None,
    ratio: float | None = None,
    rules: SelectionRules = SelectionRules(),
) -> set[int]:
    """Drop groups below ``threshold``, or the ``ratio`` least important ones, within ``rules``."""
    if (threshold is None) == (ratio is None):
        raise PruneError("select_groups needs exactly one of threshold or ratio")
    order = sorted(importance, key=lambda g: (importance[g], g))
    target = len(order) if threshold is not None else int(math.floor(ratio * len(order)))
    floors = _layer_floors(graph, rules)
    member_of: dict[int, list[str]] = {}
    for name, (counts, _) in floors.items():
        for g in counts:
            member_of.setdefault(g, []).append(name)
    kept = {name: len(graph.layers[name].out_groups) for name in floors}
    dropped: set[int] = set()
    for g in order:
        if len(dropped) >= target or (threshold is not None and importance[g] >= threshold):
            break
        layers = member_of.get(g, [])
        if all(kept[n] - floors[n][0][g] >= floors[n][1] for n in layers):
            dropped.add(g)
            for n in layers:
                kept[n] -= floors[n][0][g]
    if rules.round_to > 1:
        _round_kept(dropped, importance, graph, floors, rules.round_to)
    return dropped


def _round_kept(
    dropped: set[int],
    importance: Mapping[int, float],
    graph: ChannelGraph,
    floors: dict[str, tuple[Counter, int]],
    multiple: int,
) -> None:
    """Restore the most important dropped groups until kept counts are multiples."""
    for _ in range(len(graph.layers) + 1):
        changed = False
        for name, layer in graph.layers.items():
            if layer.kind == "bn":
                continue
            kept = sum(1 for g in layer.out_groups if g not in dropped)
            candidates = sorted(
                (g for g in floors[name][0] if g in dropped), key=lambda g: -importance[g]
            )
            while kept % multiple and candidates:
                g = candidates.pop(0)
                dropped.discard(g)
                kept += floors[name][0][g]
                changed = True
        if not changed:
            return


def make_plan(
    graph: ChannelGraph, dropped: Iterable[int], *, mode: str = "ratio", value: float | None = None
) -> PrunePlan:
    """Turn a set of dropped groups into per-layer kept indices."""
    dropped = frozenset(dropped)
    removable = {g.id for g in graph.removable_groups}
    if not dropped <= removable:
        raise PruneError(
            f"groups {sorted(dropped - removable)[:10]} are not removable; "
            "drop only ids from graph.removable_groups"
        )
    layers, total, kept = [], 0, 0
    for layer in graph.layers.values():
        keep_in = tuple(i for i, g in enumerate(layer.in_groups) if g not in dropped)
        keep_out = tuple(i for i, g in enumerate(layer.out_groups) if g not in dropped)
        if not keep_out or not keep_in:
            raise PruneError(
                f"dropping groups would remove every channel of {describe(layer)}; keep at "
                "least one (raise prune.min_channels or drop fewer groups)"
            )
        if layer.kind == "bn":
            total, kept = total + len(layer.out_groups), kept + len(keep_out)
        if len(keep_in) < len(layer.in_groups) or len(keep_out) < len(layer.out_groups):
            layers.append(LayerPlan(layer.name, layer.kind, keep_in, keep_out, layer.conv_groups))
    return PrunePlan(tuple(sorted(dropped)), tuple(layers), mode, value, total, kept)


def _index(t: torch.Tensor | None, keep: list[int], dim: int = 0) -> torch.Tensor | None:
    return (
        None
        if t is None
        else t.detach()
        .index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))
        .clone()
    )


def _set_param(m: nn.Module, name: str, value: torch.Tensor | None) -> None:
    old = getattr(m, name)
    if value is None or old is None:
        return
    if isinstance(old, nn.Parameter):
        setattr(m, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(m, name, value)


def _prune_conv(m: nn.Conv2d, plan: LayerPlan) -> None:
    keep_out, keep_in = list(plan.keep_out), list(plan.keep_in)
    g, cin, cout = m.groups, m.in_channels, m.out_channels
    weight = _index(m.weight, keep_out)
    if g == cin == cout:  # depthwise: groups shrink with the channels
        if keep_in != keep_out:
            raise PruneError(f"{plan.name}: depthwise conv must keep the same in and out channels")
        m.groups = len(keep_out)
    elif g > 1:
        ipg = cin // g
        within = [j for j in keep_in if j < ipg]
        if keep_in != [k * ipg + j for k in range(g) for j in within]:
            raise PruneError(f"{plan.name}: grouped conv lost uneven input channels across groups")
        weight = _index(weight, within, dim=1)
    else:
        weight = _index(weight, keep_in, dim=1)
    _set_param(m, "weight", weight)
    _set_param(m, "bias", _index(m.bias, keep_out))
    for name in (
        "const_kernel",
        "const_map",
    ):  # constant corrections (CorrectedConv2d) are per output
        if getattr(m, name, None) is not None:
            setattr(m, name, _index(getattr(m, name), keep_out))
    m.in_channels, m.out_channels = len(keep_in), len(keep_out)


def _prune_linear(m: nn.Linear, plan: LayerPlan) -> None:
    _set_param(
        m, "weight", _index(_index(m.weight, list(plan.keep_out)), list(plan.keep_in), dim=1)
    )
    _set_param(m, "bias", _index(m.bias, list(plan.keep_out)))
    m.in_features, m.out_features = len(plan.keep_in), len(plan.keep_out)


def _prune_bn(m: nn.Module, plan: LayerPlan) -> None:
    keep = list(plan.keep_out)
    for name in ("weight", "bias", "running_mean", "running_var"):
        _set_param(m, name, _index(getattr(m, name, None), keep))
    m.num_features = len(keep)


def apply_plan_(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Physically remove the planned channels from ``model``, in place. Returns ``model``.

    Exact (equal to ``mask_groups_``) for ``graph.prunable_groups``. Groups that are only
    absorbable need ``pipeline.absorb.remove_groups``, which also restores their constants.
    """
    modules = dict(model.named_modules())
    for layer in plan.layers:
        m = modules.get(layer.name)
        if m is None:
            raise PruneError(
                f"plan names layer {layer.name!r}, which {type(model).__name__} lacks; "
                "apply a plan only to the architecture it was made for"
            )
        if layer.kind == "conv":
            _prune_conv(m, layer)
        elif layer.kind == "linear":
            _prune_linear(m, layer)
        else:
            _prune_bn(m, layer)
    return model


def mask_groups_(model: nn.Module, graph: ChannelGraph, dropped: Iterable[int]) -> nn.Module:
    """Zero the BN scale and shift of every channel in ``dropped`` groups, in place.

    The masked model is the reference that the physically pruned model must equal.
    """
    modules = dict(model.named_modules())
    by_id = {g.id: g for g in graph.groups}
    with torch.no_grad():
        for gid in dropped:
            for name, c in by_id[gid].bn_channels:
                bn = modules[name]
                zero_scale_(bn, c)
                if bn.bias is not None:
                    bn.bias[c] = 0.0
    return model


def layer_widths(graph: ChannelGraph, plan: PrunePlan | None = None) -> dict[str, tuple[int, int]]:
    """Kept and total output channels of each conv/linear layer (for reports and plots)."""
    changed = {l.name: len(l.keep_out) for l in (plan.layers if plan else ())}
    return {
        name: (changed.get(name, len(l.out_groups)), len(l.out_groups))
        for name, l in graph.layers.items()
        if l.kind == "conv"
    }


def describe(layer: LayerChannels) -> str:
    return f"{layer.name} ({layer.kind}, {len(layer.in_groups)}->{len(layer.out_groups)})"
