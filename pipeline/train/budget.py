"""Budget-driven polarisation: adapt the penalty strength until the stated share has receded.

The user states what must go (``train.target``: a fraction of the prunable channel groups, or of
the MACs they hold with ``train.target_cost: macs``), not a penalty strength. Every step the
controller measures the *receded share*: the cost-weighted fraction of prunable groups whose
importance (the max over the group's BN channels, as pruning aggregates it) is below
``train.receded_below``. The same rule holds for every method: sigmoid(w) for bounded BN,
|gamma| for plain BN.

Each step the controller

1. schedules the wanted share: a smoothstep ramp from 0 to the target over the first
   ``target_ramp`` of the steps, then a hold;
2. chooses the penalised set: the weakest groups up to that share, within the layer floors the
   coming prune keeps, and never more than ``_SLACK`` x target ahead of how far the groups have
   actually travelled. The penalty acts on this set only (``Polariser`` masks its gradient or
   shrink), so groups outside it never feel it: no cliff, and the rest stays intact. The slack
   keeps a still-too-weak strength from gathering the whole budget and then dropping it at once
   when it gets strong (the receding push grows as a channel weakens, so a set that starts to
   fall falls together);
3. moves the strength multiplicatively, ``log lambda += gain * error``, ``train.strength_rate``
   (default three) decades in a tenth of training at full error, so the outcome does not depend
   on the starting strength. The error
   compares the schedule (allowed to trail by ``_LAG`` of the ramp) with a continuous *progress*:
   how far, in log importance, each group has come from the median starting importance towards
   the receded level. Unlike the receded share it moves as soon as groups move, so lambda stops
   rising before they arrive.

Deliberate differences from the seed paper: it trains with one fixed lambda per architecture on
every channel (``../shared/REFERENCE.md``); here lambda is an output of the budget and the
penalty acts on the scheduled set (``train.penalise: scheduled``). ``train.penalise: all`` is the
paper's form under a budget: the penalty acts on every channel and only its strength follows the
controller. ``train.target: null`` keeps the paper's fixed lambda on all channels.

A target the layer floors cannot reach (``train.target 0.9`` with ``prune.max_layer_ratio 0.5``)
is known before training: :meth:`ReceededShare.reachable` is the largest share the floors allow,
and ``Polariser.prepare`` warns with both numbers.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.graph.channel_graph import ChannelGraph
from pipeline.graph.costs import KeptMacs, group_costs
from pipeline.layers.bn import bn_modules, channel_importance

_LAG = 0.1  # the receded share may trail the schedule by this share of the ramp
_SLACK = 0.05  # the penalised set runs ahead of the groups already on their way by this share
_STRENGTH_RANGE = (1e-8, 1e6)
_SELECTIONS = 200


class ReceededShare:
    """Cost-weighted share of prunable groups below an importance level, measured in one pass."""

    def __init__(
        self,
        model: nn.Module,
        graph: ChannelGraph,
        weights: dict[int, float] | None = None,
        floors: tuple[int, float] = (1, 1.0),
        macs_example: torch.Tensor | None = None,
        kept_cost: Any | None = None,
    ) -> None:
        self.modules = list(bn_modules(model).items())
        offsets, start = {}, 0
        for name, m in self.modules:
            offsets[name] = start
            start += m.weight.numel()
        groups = graph.removable_groups
        if not groups:
            raise ValueError("the model has no prunable channel group, so no budget can be set")
        members = [(j, offsets[n] + c) for j, g in enumerate(groups) for n, c in g.bn_channels]
        self.group_ids = tuple(g.id for g in groups)
        self._member = torch.tensor([p for _, p in members], dtype=torch.long)
        self._group = torch.tensor([j for j, _ in members], dtype=torch.long)
        # float64 from the start: float32 weights summed to 0.4999999981 where the floors allow
        # exactly 0.5, and the warning then advised lowering 0.500 to <= 0.500
        w = [1.0 if weights is None else weights[g] for g in self.group_ids]
        w = torch.tensor(w, dtype=torch.float64)
        self.weights = w / w.sum()
        self._layers = _layer_limits(graph, self.group_ids, *floors)
        self._bn_groups: dict[str, list[int]] = {}  # BN name -> the groups its channels gate
        for j, g in enumerate(groups):
            for n in dict.fromkeys(n for n, _ in g.bn_channels):
                self._bn_groups.setdefault(n, []).append(j)
        # with an example, shares are exact shares of the MACs (train.target_cost: macs)
        self.macs = (
            None if macs_example is None else KeptMacs(model, graph, macs_example, self.group_ids)
        )
        if kept_cost is not None:  # any cost of kept groups: KeptLatency (target_cost: latency)
            self.macs = kept_cost

    def select(self, importance: torch.Tensor, share: float) -> torch.Tensor:
        """The weakest groups up to ``share`` that pruning could remove together: each layer
        keeps ``min_channels`` and ``1 - max_layer_ratio`` of its channels. The share is
        cost-weighted, or with ``macs`` the exact share of MACs the removal takes away."""
        order = self._eligible(importance)
        chosen = torch.zeros(len(self.group_ids), dtype=torch.bool)
        if self.macs is None:
            reached = torch.cumsum(self.weights[order], 0) >= share
            k = int(reached.nonzero()[0]) + 1 if bool(reached.any()) else len(order)
            k = 0 if share <= 0 else k
        else:  # the removed share grows with every group taken: bisect the prefix length
            lo, hi = 0, len(order)
            while lo < hi:
                mid = (lo + hi) // 2
                chosen.zero_()
                chosen[order[:mid]] = True
                lo, hi = (lo, mid) if self.removed(chosen) >= share else (mid + 1, hi)
            k = lo
        chosen.zero_()
        chosen[order[:k]] = True
        return chosen

    def frozen_bns(self) -> list[str]:
        """BNs whose scale is frozen (``requires_grad=False``) now: read at every call, so a
        layer frozen after ``Polariser.prepare`` counts as frozen from then on."""
        return [n for n, m in self.modules if m.weight is not None and not m.weight.requires_grad]

    def frozen(self) -> torch.Tensor:
        """Groups (bool, aligned with ``group_ids``) with a frozen BN: never chosen, never
        counted as receded, since nothing may move their scale."""
        out = torch.zeros(len(self.group_ids), dtype=torch.bool)
        for name in self.frozen_bns():
            out[self._bn_groups.get(name, [])] = True
        return out

    def _eligible(self, importance: torch.Tensor) -> torch.Tensor:
        """Groups weakest first, leaving out those the layer floors keep and frozen ones."""
        room = dict(self._layers[1])
        order = []
        frozen = self.frozen().tolist()
        for j in torch.argsort(importance).tolist():
            uses = self._layers[0][j]
            if not frozen[j] and all(room[name] >= n for name, n in uses):
                order.append(j)
                for name, n in uses:
                    room[name] -= n
        return torch.tensor(order, dtype=torch.long)

    def removed(self, gone: torch.Tensor) -> float:
        """Share (cost-weighted, or of the MACs) that the ``gone`` groups take away."""
        if self.macs is None:
            return float(self.weights[gone].sum())
        return self.macs.removed_share((~gone).double())

    def reachable(self) -> float:
        """The largest share the layer floors let recede: what ``select`` takes at share 1."""
        return self.removed(self.select(torch.zeros(len(self.group_ids)), 1.0))

    def channel_masks(self, chosen: torch.Tensor) -> dict[str, torch.Tensor]:
        """BN name -> bool mask of its channels that belong to a chosen group."""
        flat = torch.zeros(sum(m.weight.numel() for _, m in self.modules), dtype=torch.bool)
        flat[self._member[chosen[self._group]]] = True
        sizes = [m.weight.numel() for _, m in self.modules]
        return {n: part for (n, _), part in zip(self.modules, flat.split(sizes), strict=True)}

    @torch.no_grad()
    def group_importance(self) -> torch.Tensor:
        """Importance of every prunable group (max over its BN channels), on the CPU."""
        flat = torch.cat([channel_importance(m).float().cpu() for _, m in self.modules])
        out = torch.zeros(len(self.group_ids))
        return out.scatter_reduce_(0, self._group, flat[self._member], "amax", include_self=False)

    def progress(self, level: float, top: float, importance: torch.Tensor) -> float:
        """Weighted mean of how far (in log importance) each group has come from ``top`` to
        ``level``: 0 at or above ``top``, 1 once receded. It moves as soon as groups move."""
        way = torch.log(top / importance.double().clamp_min(1e-30)) / math.log(top / level)
        way = way.clamp(0.0, 1.0).masked_fill(self.frozen(), 0.0)  # a frozen group stays put
        if self.macs is not None:  # a group half-way counts as half kept
            return self.macs.removed_share(1.0 - way)
        return float((self.weights * way).sum())

    def share(self, level: float, importance: torch.Tensor | None = None) -> float:
        """Weighted fraction of groups whose importance is below ``level``."""
        imp = self.group_importance() if importance is None else importance
        return self.removed((imp < level) & ~self.frozen())


def _layer_limits(
    graph: ChannelGraph, group_ids: tuple[int, ...], min_channels: int, max_layer_ratio: float
) -> tuple[list[list[tuple[str, int]]], dict[str, int]]:
    """Per group, the (layer, channels) it takes; per layer, how many channels may go."""
    index = {g: j for j, g in enumerate(group_ids)}
    uses: list[list[tuple[str, int]]] = [[] for _ in group_ids]
    room = {}
    for name, layer in graph.layers.items():
        total = len(layer.out_groups)
        room[name] = total - min(total, max(min_channels, math.ceil((1 - max_layer_ratio) * total)))
        for g, n in Counter(layer.out_groups).items():
            if g in index:
                uses[index[g]].append((name, n))
    return uses, room


def budget_weights(
    model: nn.Module, graph: ChannelGraph, example: torch.Tensor, cost: str
) -> dict[int, float] | None:
    """Per-group weights for ``train.target_cost``: ``None`` (every group 1) or MACs held."""
    if cost == "groups":
        return None
    macs = group_costs(model, graph, example, "macs")
    return {g.id: max(macs[g.id], 1e-12) for g in graph.removable_groups}


def smoothstep(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3.0 - 2.0 * x)


@dataclass
class BudgetController:
    """Adapts a penalty strength so the receded share follows a ramp to ``target``.

    Args:
        target: share of prunable groups (or MACs) that must have receded by the end.
        total_steps: optimizer steps in the whole training run.
        strength: the starting strength (any value within three decades of a good one).
        level: importance under which a group counts as receded.
        ramp: share of ``total_steps`` over which the wanted share ramps up.
        rate: decades lambda may move in a tenth of ``total_steps`` at full error.
        delay: share of ``total_steps`` before the ramp starts: the penalised set is chosen
            only once the loss has shaped the importances (at the first step every importance
            is the same and the weakest groups are merely the first ones).
    """

    target: float
    total_steps: int
    strength: float
    level: float = 0.01
    ramp: float = 0.6
    rate: float = 3.0
    delay: float = 0.0
    step: int = 0
    top: float | None = None  # median group importance at the first step: where the way starts
    _chosen: torch.Tensor | None = None  # the penalised set, refreshed every select_every steps

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"target must be in (0, 1), got {self.target!r}")
        if not 0.0 <= self.delay < 1.0:
            raise ValueError(f"delay must be in [0, 1), got {self.delay!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps!r}")
        if not self.strength > 0:
            raise ValueError(f"the starting strength must be > 0, got {self.strength!r}")

    @property
    def gain(self) -> float:
        """Per-step change of log lambda at full error: ``rate`` decades in 10% of training."""
        return self.rate * math.log(10.0) / max(1.0, 0.1 * self.total_steps)

    def scheduled(self, step: int | None = None) -> float:
        """Wanted receded share at ``step`` (default: the current one)."""
        step = self.step if step is None else step
        return self.target * smoothstep((step - self.delay * self.total_steps) / self._ramp_steps)

    def update_(self, tracker: ReceededShare) -> torch.Tensor:
        """Measure, move the strength, advance one step.

        Returns:
            The groups the penalty acts on this step (bool, aligned with ``tracker.group_ids``):
            the weakest ones up to the scheduled share.
        """
        imp = tracker.group_importance()
        wanted = self.scheduled(self.step + 1)
        if self.top is None and wanted > 0:  # where the way starts: after any delay
            self.top = max(float(imp.median()), 10 * self.level)
        if self.top is None:  # the delay: the loss alone shapes the importances
            self.step += 1
            return torch.zeros(len(tracker.group_ids), dtype=torch.bool)
        moved = tracker.progress(self.level, self.top, imp)
        # the set grows only as fast as its groups recede: a strength still far too weak
        # must not gather the whole budget and then drop it at once when it gets strong
        if self._chosen is None or self.step % self.select_every == 0:
            self._chosen = tracker.select(imp, min(wanted, moved + _SLACK * self.target))
        chosen = self._chosen
        due = self.scheduled(self.step + 1 - _LAG * self._ramp_steps)
        if wanted > 0:
            error = max(-1.0, min(1.0, (due - moved) / (0.25 * self.target)))
            low, high = (math.log(v) for v in _STRENGTH_RANGE)
            log_strength = math.log(self.strength) + self.gain * error
            self.strength = math.exp(min(high, max(low, log_strength)))
        self.step += 1
        return chosen

    @property
    def select_every(self) -> int:
        """Steps between refreshes of the penalised set: at most ``_SELECTIONS`` per run.

        Choosing the set walks every group in Python (42 ms for ResNet-50's 11,456 groups at
        full budget), so long runs reuse it; runs of up to ``_SELECTIONS`` steps choose every
        step. The strength still moves every step.
        """
        return max(1, self.total_steps // _SELECTIONS)

    @property
    def _ramp_steps(self) -> float:
        return max(1.0, self.ramp * self.total_steps)

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the next step: a resumed run continues bit for bit, the
        penalised set included (it is refreshed only every ``select_every`` steps)."""
        chosen = None if self._chosen is None else self._chosen.clone()
        return {"strength": self.strength, "step": self.step, "top": self.top, "chosen": chosen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strength, self.step = float(state["strength"]), int(state["step"])
        self.top = state.get("top")
        chosen = state.get("chosen")
        self._chosen = None if chosen is None else torch.as_tensor(chosen, dtype=torch.bool)
