"""Cut a trained model to a latency: the importance cut whose predicted latency fits, then
measured, and moved up the ranking while the measurement is over.

The cut is an importance threshold, as ``prune.threshold`` takes one: groups below it go, within
the layer floors (``prune.min_channels``, ``prune.max_layer_ratio``) and with kept widths rounded
up to ``round_to``. :func:`latency_cut` finds the lowest threshold whose plan the latency model
(:class:`pipeline.graph.latency_cost.KeptLatency`, read exactly) predicts at or under the target,
for two roundings: ``prune.round_to`` and its multiple with the backend's block
(``LatencyModel.align``). Rounding up to the block keeps channels the blocked kernels compute
anyway (they pad to the block), so it is usually the one that drops fewest groups for the same
predicted latency; the one that drops fewer is taken, and the log says which.

:func:`fit_to_latency` is the loop after it: time the cut model on the backend; while it runs more
than ``tolerance`` (5%) over the target, aim the prediction lower by the measured excess and cut
again at least one step further up the ranking, a bounded number of times (as the MAC budget's
fit moves its cut until the MACs fit). Both callables are injected, so the loop is tested with
a fake clock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from pipeline.config import PruneConfig
from pipeline.graph.channel_graph import ChannelGraph, build_channel_graph
from pipeline.graph.latency_cost import KeptLatency, LatencyModel
from pipeline.prune.plan import (
    SelectionRules,
    check_ranking_signal,
    group_importance,
    select_groups,
)

logger = logging.getLogger(__name__)

TOLERANCE = 0.05  # a measurement this far over the target still counts as reached
MAX_REMEASURES = 3  # times the cut moves up after its first measurement


@dataclass(frozen=True)
class LatencyCut:
    """One cut: its position in the threshold list, the prune settings that reproduce it, what
    it drops and the latency predicted for it."""

    index: int
    prune: PruneConfig
    dropped: frozenset[int]
    predicted_ms: float

    @property
    def round_to(self) -> int:
        return self.prune.round_to


class Cutter:
    """The cuts of one trained model: thresholds between its distinct group importances."""

    def __init__(
        self, model: nn.Module, example: torch.Tensor, prune: PruneConfig, latency: LatencyModel
    ) -> None:
        self.graph: ChannelGraph = build_channel_graph(model, example)
        self.importance = group_importance(model, self.graph, prune.aggregate)
        self.ids = tuple(self.importance)
        self.cost = KeptLatency(self.graph, latency, self.ids)
        values = sorted(set(self.importance.values()))
        top = values[-1] * (1 + 1e-6) if values and values[-1] > 0 else 1e-38
        low = values[0] if values and values[0] > 0 else 1e-45
        # index i > 0 drops the i weakest importance values; index 0 drops nothing
        self.thresholds = [low, *values[1:], top]
        self.prune = replace(prune, threshold="ratio", scope="global")
        align = latency.align
        self.roundings = sorted(
            {prune.round_to, prune.round_to * align // math.gcd(prune.round_to, align)}
        )

    def at(self, index: int, round_to: int) -> LatencyCut:
        """The cut at ``thresholds[index]`` with kept widths rounded up to ``round_to``."""
        cfg = replace(self.prune, threshold=self.thresholds[index], round_to=round_to)
        rules = SelectionRules(cfg.min_channels, cfg.max_layer_ratio, round_to)
        dropped = frozenset(
            select_groups(self.importance, self.graph, threshold=cfg.threshold, rules=rules)
            if index > 0
            else ()
        )
        return LatencyCut(
            index, cfg, dropped, self.cost.latency_ms(self._kept(dropped), exact=True)
        )

    def _kept(self, dropped) -> torch.Tensor:
        return torch.tensor([0.0 if g in dropped else 1.0 for g in self.ids])

    def fitting(self, aim_ms: float, round_to: int, start: int = 0) -> LatencyCut:
        """The first cut from ``start`` on whose prediction is at or under ``aim_ms`` (bisection:
        the prediction falls as the cut moves up), else the last one."""
        lo, hi = start, len(self.thresholds) - 1
        if self.at(hi, round_to).predicted_ms > aim_ms:
            return self.at(hi, round_to)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.at(mid, round_to).predicted_ms <= aim_ms else (mid + 1, hi)
        return self.at(lo, round_to)

    def best(self, aim_ms: float, start: int = 0) -> LatencyCut:
        """Of the roundings' fitting cuts, the one that drops fewest groups among those that fit
        (the lowest prediction when none fits)."""
        cuts = [self.fitting(aim_ms, r, start) for r in self.roundings]
        fits = [c for c in cuts if c.predicted_ms <= aim_ms]
        chosen = (
            min(fits, key=lambda c: (len(c.dropped), c.predicted_ms))
            if fits
            else min(cuts, key=lambda c: c.predicted_ms)
        )
        if len(cuts) > 1:
            logger.info(
                "latency cut: widths rounded to %d (%s)", chosen.round_to,
                ", ".join(f"round_to {c.round_to}: {len(c.dropped)} groups, {c.predicted_ms:.4g} ms" for c in cuts),
            )  # fmt: skip
        return chosen


@dataclass(frozen=True)
class LatencyFit:
    """The cut the loop ended on, its measured latency and every (predicted, measured) pair."""

    cut: LatencyCut
    measured_ms: float
    target_ms: float
    history: tuple[tuple[float, float], ...] = field(default=())

    @property
    def reached(self) -> bool:
        return self.measured_ms <= (1 + TOLERANCE) * self.target_ms

    @property
    def remeasures(self) -> int:
        return len(self.history) - 1


def fit_to_latency(
    cut_at: Callable[[float, int], LatencyCut],
    measure: Callable[[LatencyCut], float],
    target_ms: float,
    *,
    max_remeasures: int = MAX_REMEASURES,
) -> LatencyFit:
    """Cut at the target, measure, and move up while over it (see the module docstring).

    Args:
        cut_at: ``(aim_ms, start_index) -> cut``: the cheapest cut from ``start_index`` on
            whose prediction is at or under ``aim_ms``.
        measure: The cut's latency on the backend, in ms.
        target_ms: The latency to reach.
        max_remeasures: Moves up the ranking after the first measurement, at most.
    """
    cut = cut_at(target_ms, 0)
    history: list[tuple[float, float]] = []
    while True:
        measured = measure(cut)
        history.append((cut.predicted_ms, measured))
        logger.info(
            "latency cut %d: predicted %.4g ms, measured %.4g ms, target %.4g ms",
            len(history), cut.predicted_ms, measured, target_ms,
        )  # fmt: skip
        fit = LatencyFit(cut, measured, target_ms, tuple(history))
        if fit.reached or len(history) > max_remeasures:
            return fit
        aim = cut.predicted_ms * target_ms / measured  # the prediction, lowered by the excess
        nxt = cut_at(aim, cut.index + 1)
        if nxt.index <= cut.index or nxt.dropped == cut.dropped:
            logger.warning("latency cut: nothing more can go within the layer floors")
            return fit
        cut = nxt


def check_cut_ranking(importance: Mapping[int, float], cut: LatencyCut) -> None:
    """Refuse a cut inside a wide run of tied importances (an untrained model): index order,
    not importance, would decide it (``pipeline.prune.plan.check_ranking_signal``)."""
    if importance:
        check_ranking_signal(importance, len(cut.dropped) / len(importance))
