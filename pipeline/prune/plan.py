"""Plans: which channel groups to drop, chosen by importance within selection rules.

A plan is data: frozen dataclasses keyed by module qualified names with the kept indices of
every layer that changes. It can be printed, saved as JSON and applied later
(``pipeline.prune.remove``).

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

from torch import nn

from pipeline.graph.channel_graph import ChannelGraph, LayerChannels
from pipeline.layers.bn import channel_importance

logger = logging.getLogger(__name__)


class PruneError(ValueError):
    """A plan cannot be made or applied; the message says why and what to change."""


class TiedImportanceError(PruneError):
    """A global ratio cut would fall inside a wide run of exactly tied importances (exit 2)."""


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
        round_to: kept output channels of each conv/linear at least
            :data:`ROUND_MIN_BLOCKS` x ``round_to`` wide rounded up to a multiple of this.
    """

    min_channels: int = 4
    max_layer_ratio: float = 0.95
    round_to: int = 1


SCOPES = ("global", "layer")

# A global ratio cut may split at most this many exactly tied groups, or this share of all the
# ranked groups if that is more, before the ranking is said to carry no signal there.
MAX_TIED_AT_CUT = 2
MAX_TIED_SHARE = 0.01


@dataclass(frozen=True)
class TieAtCut:
    """The run of exactly equal importances that a ratio cut splits.

    ``start``/``stop`` are ranks (ascending importance) of the run, ``[start, stop)``; ``cut`` is
    the number of groups the ratio asks to drop; ``total`` the number ranked.
    """

    value: float
    start: int
    stop: int
    cut: int
    total: int

    @property
    def width(self) -> int:
        return self.stop - self.start

    @property
    def wide(self) -> bool:
        """Wider than ``MAX_TIED_AT_CUT`` groups and than ``MAX_TIED_SHARE`` of the ranking."""
        return self.width > max(MAX_TIED_AT_CUT, MAX_TIED_SHARE * self.total)


def tie_at_cut(importance: Mapping[int, float], ratio: float) -> TieAtCut | None:
    """The tied run a global ``ratio`` cut falls inside, or None when the cut is between values.

    The ratio asks to drop the ``k = floor(ratio * n)`` least important of the ``n`` ranked
    groups. When ``0 < k < n`` and the k-th and (k+1)-th smallest importances are exactly equal,
    the cut splits the run of every group holding that value, and which of them go would be
    decided by group index, not importance. Selection rules (layer floors, rounding) are not
    considered: the question is whether the ranking itself can place the cut.
    """
    values = sorted(importance.values())
    n, k = len(values), int(math.floor(ratio * len(values)))
    if not 0 < k < n or values[k - 1] != values[k]:
        return None
    value = values[k]
    start = next(i for i, v in enumerate(values) if v == value)
    stop = start + values.count(value)
    return TieAtCut(value, start, stop, k, n)


def check_ranking_signal(importance: Mapping[int, float], ratio: float) -> None:
    """Refuse a global ``ratio`` cut where the importances carry no ranking signal.

    *No ranking signal* means: the cut falls inside a run of exactly equal importances wider
    than ``MAX_TIED_AT_CUT`` (2) groups and than ``MAX_TIED_SHARE`` (1 %) of the ranked groups
    (``tie_at_cut``). All importances equal (an untrained model, whose BN scales all start at
    one value) is the extreme case. Index order would then decide how many channels each layer
    loses, so this raises ``TiedImportanceError`` naming the per-layer rule instead; a narrower
    tie is broken by group index with a warning, never silently.

    A run tied at exactly 0 is not a lack of signal: training drove those groups to zero scale
    (dead channels, removed exactly whichever go), and the ranking did place them all below
    every live group. Such a tie is broken by group index with a warning too.
    """
    tie = tie_at_cut(importance, ratio)
    if tie is None:
        return
    if not tie.wide or tie.value == 0.0:
        logger.warning(
            "ratio %.4g: the cut splits %d groups of equal importance %.4g; group index decides "
            "which of them go",
            ratio, tie.width, tie.value,
        )  # fmt: skip
        return
    share = f"all {tie.total}" if tie.width == tie.total else f"{tie.width} of the {tie.total}"
    outside = []  # ratios whose cut falls outside the run: floor(r * n) <= start or >= stop
    if tie.start > 0:
        outside.append(f"below {(tie.start + 1) / tie.total:.3g}")
    if tie.stop < tie.total:
        outside.append(f"{tie.stop / tie.total:.3g} or more")
    raise TiedImportanceError(
        f"a global ratio {ratio:g} would cut inside a run of {share} ranked channel groups "
        f"whose importances are exactly {tie.value:.4g}: the importances carry no ranking "
        "signal there (an untrained model?), and group index order would decide which layers "
        "lose channels. Expected importances that differ at the cut; use the per-layer rule "
        "instead (--scope layer; prune.scope: layer), which drops the ratio from every layer "
        "alike"
        + (f", or a ratio {' or '.join(outside)} to cut outside the tie" if outside else "")
        + ", or train with a sparsity penalty first (recede train)"
    )


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


def weight_importance(model: nn.Module, graph: ChannelGraph) -> dict[int, float]:
    """L2 norm of the filter rows that write each weight-gated group (no BN gates it).

    Comparable only within one layer set, so only ``scope="layer"`` selection uses it; on a
    different scale from BN importances, it never enters a global ranking.
    """
    modules = dict(model.named_modules())
    out = {}
    for g in graph.weight_groups:
        sq = sum(
            float(modules[n].weight[r].detach().double().pow(2).sum())
            for n, r in graph.writers(g.id)
        )
        out[g.id] = math.sqrt(sq)
    return out


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
    scope: str = "global",
) -> set[int]:
    """Drop groups below ``threshold``, or the ``ratio`` least important ones, within ``rules``.

    ``scope="global"`` ranks every group against every other (what a polarised model wants: the
    valley is one global cut). ``scope="layer"`` (ratio only) drops ``ratio`` of the groups of
    each *layer set*: the groups written by the same layers, so a plain conv is one set and a
    residual stream, whose channels every block of a stage writes, is one set. Every layer then
    loses the same fraction, like Torch-Pruning's default (``global_pruning=False``) uniform
    ratio; it suits models whose importances were never polarised, where a global ranking of
    unrelated scales decides nothing.

    Ties: a global ratio whose cut falls inside a wide run of equal importances is refused
    (``check_ranking_signal``). Within one layer set (``scope="layer"``) the number each layer
    loses is fixed by the rule, so tied groups there are taken in group index order: in an
    untrained layer they are interchangeable.

    Raises:
        TiedImportanceError: a global ratio with no ranking signal at its cut.
    """
    if (threshold is None) == (ratio is None):
        raise PruneError("select_groups needs exactly one of threshold or ratio")
    if scope not in SCOPES or (scope == "layer" and ratio is None):
        raise PruneError(f"scope must be one of {SCOPES} ('layer' with a ratio), got {scope!r}")
    if scope == "global" and ratio is not None:
        check_ranking_signal(importance, ratio)
    order = sorted(importance, key=lambda g: (importance[g], g))
    floors = _layer_floors(graph, rules)
    member_of: dict[int, list[str]] = {}
    for name, (counts, _) in floors.items():
        for g in counts:
            member_of.setdefault(g, []).append(name)
    layer_set = {g: frozenset(member_of.get(g, ())) if scope == "layer" else None for g in order}
    targets = Counter(layer_set.values())
    for key, size in targets.items():
        targets[key] = size if threshold is not None else int(math.floor(ratio * size))
    kept = {name: len(graph.layers[name].out_groups) for name in floors}
    dropped: set[int] = set()
    taken: Counter = Counter()
    for g in order:
        if threshold is not None and importance[g] >= threshold:
            break
        if taken[layer_set[g]] >= targets[layer_set[g]]:
            continue
        layers = member_of.get(g, [])
        if all(kept[n] - floors[n][0][g] >= floors[n][1] for n in layers):
            dropped.add(g)
            taken[layer_set[g]] += 1
            for n in layers:
                kept[n] -= floors[n][0][g]
    if rules.round_to > 1:
        _round_kept(dropped, importance, graph, floors, rules.round_to)
    return dropped


ROUND_MIN_BLOCKS = 2
"""A layer is rounded only when it is at least this many multiples wide (16 channels at
``round_to`` 8); a narrower one has no aligned width under its own but itself.

It was 4, on the belief that narrow layers are cheap to run unaligned. They are not when they
run at high resolution: torchvision's ``lraspp_mobilenet_v3_large`` at 256 px, pruned 30% per
layer, kept its 16- and 24-wide stem and first blocks at 12 and 17 channels, and ONNX Runtime
ran those 128x128 and 64x64 layers off its blocked layout with reorders: the 12-wide pointwise
conv took 168 us against dense's 84, a reorder of 513 us appeared, and the whole model ran 1.44x
faster at a MAC ratio of 1.89 (0.76). Rounding from 16 channels up kept those layers aligned:
1.55x at a MAC ratio of 1.79 (0.87; one thread, CPU clock, 50 runs interleaved, 2026-12-07,
docs/decisions.md)."""


def _round_kept(
    dropped: set[int],
    importance: Mapping[int, float],
    graph: ChannelGraph,
    floors: dict[str, tuple[Counter, int]],
    multiple: int,
) -> None:
    """Restore the most important dropped groups until kept counts are multiples (in layers at
    least :data:`ROUND_MIN_BLOCKS` multiples wide)."""
    for _ in range(len(graph.layers) + 1):
        changed = False
        for name, layer in graph.layers.items():
            if layer.kind == "bn" or len(layer.out_groups) < ROUND_MIN_BLOCKS * multiple:
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
    removable = {g.id for g in graph.removable_groups + graph.weight_groups}
    if not dropped <= removable:
        raise PruneError(
            f"groups {sorted(dropped - removable)[:10]} are not removable; "
            "drop only ids from graph.removable_groups or graph.weight_groups"
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


def layer_widths(
    graph: ChannelGraph, plan: PrunePlan | None = None, kinds: tuple[str, ...] = ("conv",)
) -> dict[str, tuple[int, int]]:
    """Kept and total output channels of each layer of ``kinds`` (for reports and plots)."""
    changed = {l.name: len(l.keep_out) for l in (plan.layers if plan else ())}
    return {
        name: (changed.get(name, len(l.out_groups)), len(l.out_groups))
        for name, l in graph.layers.items()
        if l.kind in kinds
    }


def describe(layer: LayerChannels) -> str:
    return f"{layer.name} ({layer.kind}, {len(layer.in_groups)}->{len(layer.out_groups)})"
