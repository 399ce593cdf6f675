"""The prune stage: rank channel groups, plan which to drop, remove them exactly.

It runs one way through its parts: ``pipeline.prune.plan`` (importance, selection rules, the plan),
then ``pipeline.prune.remove`` (slicing layers, absorbing constants via ``pipeline.prune.absorb``, verifying).
The names the README's Python API shows are re-exported here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.config import PruneConfig
from pipeline.graph.channel_graph import ChannelGraph, build_channel_graph
from pipeline.prune.plan import (
    LayerPlan,
    PruneError,
    PrunePlan,
    SelectionRules,
    group_importance,
    layer_widths,
    make_plan,
    select_groups,
    weight_importance,
)
from pipeline.prune.remove import RemovalReport, apply_plan_, remove_groups, zero_groups_
from pipeline.prune.threshold import auto_threshold

__all__ = [
    "LayerPlan",
    "PruneError",
    "PrunePlan",
    "PruneSummary",
    "Pruned",
    "RemovalReport",
    "SelectionRules",
    "apply_plan_",
    "group_importance",
    "layer_widths",
    "make_plan",
    "prune_model",
    "remove_groups",
    "select_groups",
    "weight_importance",
    "zero_groups_",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneSummary:
    """What a prune did, in the numbers ``recede prune`` and ``recede run`` report.

    Both commands write these into their ``report.json`` under keys of their own (a prune
    folder's ``groups``, ``threshold`` and ``barriers``; a run's ``groups`` and ``threshold``);
    this is the one place they are counted.

    Attributes:
        total: Channel groups in the traced graph.
        prunable: Groups that were ranked (the others are behind a barrier or fixed).
        dropped: Groups the plan removes.
        threshold_mode: ``ratio``, ``auto`` or ``value``.
        threshold_value: The importance cut (for ``ratio``, the value the ratio landed on).
        barriers: Ops the graph could not see through, as ``Barrier`` fields.
    """

    total: int
    prunable: int
    dropped: int
    threshold_mode: str
    threshold_value: float | None
    barriers: list[dict[str, Any]]


@dataclass(frozen=True, repr=False)
class Pruned:
    """Result of the prune step.

    ``repr`` is one line (groups and BN channels dropped, the threshold); ``summary()`` is the
    per-layer table with params and MACs before and after, which runs both models once.
    ``source`` is the model that was pruned (left unchanged) and ``input_shape`` the per-sample
    shape of the example, both kept for ``summary()``.
    """

    model: nn.Module
    plan: PrunePlan
    graph: ChannelGraph
    importances: dict[int, float]
    removal: RemovalReport
    source: nn.Module | None = field(default=None, compare=False)
    input_shape: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        p = self.plan
        value = "" if p.threshold_value is None else f" {p.threshold_value:.4g}"
        return (
            f"Pruned({type(self.model).__name__}: dropped {len(p.dropped_groups)} of "
            f"{len(self.importances)} prunable groups, BN channels {p.channels_total} -> "
            f"{p.channels_kept}, {p.threshold_mode}{value}; .summary() for the per-layer table)"
        )

    def report(self) -> PruneSummary:
        """The counts both commands report (see :class:`PruneSummary`)."""
        return PruneSummary(
            total=len(self.graph.groups),
            prunable=len(self.importances),
            dropped=len(self.plan.dropped_groups),
            threshold_mode=self.plan.threshold_mode,
            threshold_value=self.plan.threshold_value,
            barriers=[b.__dict__ for b in self.graph.barriers],
        )

    def summary(self) -> str:
        """The per-layer table (channels kept/total, params and MACs before and after) and a
        one-line summary, as ``recede prune`` prints them."""
        from pipeline.prune.layer_table import layer_table

        if self.source is None or self.input_shape is None:
            raise PruneError(
                "Pruned.summary() needs the source model and input shape prune_model records; "
                "build the result with prune_model(model, example, cfg)"
            )
        table = layer_table(self.source, self.graph, self.input_shape, self.model, self.plan)
        return f"{table.render()}\n{table.summary()}"


def prune_model(
    model: nn.Module,
    example: torch.Tensor,
    cfg: PruneConfig,
    *,
    receded_below: float | None = None,
) -> Pruned:
    """Plan and apply a prune of a copy of ``model`` according to ``cfg``.

    ``receded_below`` is the ``train.receded_below`` the model was trained with, when known: the
    automatic threshold cuts under the modes above it (``pipeline.prune.threshold``). None:
    the training is unknown (its default, 0.01).
    """
    graph = build_channel_graph(model, example)
    importance = group_importance(model, graph, cfg.aggregate)
    if cfg.scope == "layer":  # weight-gated groups rank only within their own layers
        importance |= weight_importance(model, graph)
    rules = SelectionRules(cfg.min_channels, cfg.max_layer_ratio, cfg.round_to)
    if cfg.threshold == "ratio":
        dropped, mode, value = (
            select_groups(importance, graph, ratio=cfg.ratio, rules=rules, scope=cfg.scope),
            "ratio",
            cfg.ratio,
        )
    else:
        value = (
            auto_threshold(list(importance.values()), receded_below=receded_below).value
            if cfg.threshold == "auto"
            else float(cfg.threshold)
        )
        mode = "auto" if cfg.threshold == "auto" else "value"
        dropped = select_groups(importance, graph, threshold=value, rules=rules)
    plan = make_plan(graph, dropped, mode=mode, value=value)
    pruned, removal = remove_groups(
        model.cpu(), graph, plan, example, exact_borders=cfg.exact_borders
    )
    logger.info(
        "pruned %d of %d prunable groups (%s threshold %.4g); BN channels %d -> %d",
        len(dropped),
        len(importance),
        mode,
        value,
        plan.channels_total,
        plan.channels_kept,
    )
    return Pruned(pruned, plan, graph, importance, removal, model, tuple(example.shape[1:]))
