"""The prune stage: rank channel groups, plan which to drop, remove them exactly.

It runs one way through its parts: ``pipeline.prune.plan`` (importance, selection rules, the plan),
then ``pipeline.prune.remove`` (slicing layers, absorbing constants via ``pipeline.prune.absorb``, verifying).
The names the README's Python API shows are re-exported here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from pipeline.config import PruneConfig
from pipeline.core.checks import on_twin
from pipeline.graph.channel_graph import ChannelGraph, build_channel_graph, has_bns
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
from pipeline.prune.remove import (
    RemovalReport,
    apply_plan_,
    remove_groups,
    shifted_groups,
    zero_groups_,
)
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
        exact: Dropped groups removed exactly (constants absorbed, or nothing to absorb).
        approximate: Dropped groups whose gated shift was zeroed (``prune.allow_approximate``).
        approximate_rel_err: What zeroing those shifts changed, relative to the output scale.
        held_back: Groups the cut selected but kept, since only an approximation removes them
            and ``prune.allow_approximate`` is off.
    """

    total: int
    prunable: int
    dropped: int
    threshold_mode: str
    threshold_value: float | None
    barriers: list[dict[str, Any]]
    exact: int = 0
    approximate: int = 0
    approximate_rel_err: float = 0.0
    held_back: int = 0


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
    held_back: tuple[int, ...] = ()  # selected, kept: only an approximation would remove them

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
            exact=self.removal.absorbed_groups,
            approximate=self.removal.approximate_groups,
            approximate_rel_err=self.removal.approximate_err,
            held_back=len(self.held_back),
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

    Groups only an approximation removes (``pipeline.prune.remove.shifted_groups``: a gate reads
    their constant, and their shift is not zero) are kept out of the selection unless
    ``cfg.allow_approximate``; the cut is still computed over every group, and the ones it
    selected but kept are logged and counted (``PruneSummary.held_back``).
    """
    if not has_bns(model) and cfg.scope != "layer":
        raise PruneError(
            f"{type(model).__name__} has no BatchNorm layer: a {cfg.scope} cut ranks channels by "
            "BN scale, so there is nothing to rank; prune it per layer by filter norm with "
            "--scope layer --ratio R (prune.scope: layer, prune.threshold: ratio), or add "
            "BatchNorm after its convs and train it"
        )
    graph = build_channel_graph(model, example, require_bns=False)  # BN-free: weight groups
    importance = group_importance(model, graph, cfg.aggregate)
    if cfg.scope == "layer":  # weight-gated groups rank only within their own layers
        importance |= weight_importance(model, graph)
    mode = cfg.threshold if cfg.threshold in ("ratio", "auto") else "value"
    value = cfg.ratio if mode == "ratio" else None
    if mode == "auto":
        value = auto_threshold(list(importance.values()), receded_below=receded_below).value
    elif mode == "value":
        value = float(cfg.threshold)
    inexact = set() if cfg.allow_approximate else shifted_groups(model, graph, importance)
    dropped = _select(importance, graph, cfg, value, exclude=inexact)
    held = _select(importance, graph, cfg, value) & inexact if inexact else set()
    if held:
        _warn_held_back(held, len(dropped))
    plan = make_plan(graph, dropped, mode=mode, value=value)
    pruned, removal = remove_groups(
        model.cpu(),
        graph,
        plan,
        example,
        exact_borders=cfg.exact_borders,
        allow_approximate=cfg.allow_approximate,
    )

    def on_the_twin(twin: nn.Module):  # an untrained model's removal is checked on its twin too
        return remove_groups(
            twin,
            graph,
            plan,
            example,
            exact_borders=cfg.exact_borders,
            allow_approximate=cfg.allow_approximate,  # the plan's groups, removed the same way
        )[1].check

    removal = replace(removal, check=on_twin(removal.check, model, example, on_the_twin))
    logger.info(
        "pruned %d of %d prunable groups (%s threshold %.4g); BN channels %d -> %d",
        len(dropped),
        len(importance),
        mode,
        value,
        plan.channels_total,
        plan.channels_kept,
    )
    shape = tuple(example.shape[1:])
    return Pruned(pruned, plan, graph, importance, removal, model, shape, tuple(sorted(held)))


def _select(
    importance: dict[int, float],
    graph: ChannelGraph,
    cfg: PruneConfig,
    value: float,
    exclude: set[int] = frozenset(),
) -> set[int]:
    """The groups ``cfg``'s cut at ``value`` drops, never one of ``exclude``."""
    candidates = {g: v for g, v in importance.items() if g not in exclude}
    rules = SelectionRules(cfg.min_channels, cfg.max_layer_ratio, cfg.round_to)
    if cfg.threshold == "ratio":
        return select_groups(candidates, graph, ratio=value, rules=rules, scope=cfg.scope)
    return select_groups(candidates, graph, threshold=value, rules=rules)


def _warn_held_back(held: set[int], dropped: int) -> None:
    logger.warning(
        "kept %d channel groups the cut selected (dropped %d): a squeeze-excite gate or other "
        "non-affine reader sees the constant they emit and their shift is not zero, so "
        "removing them would change the model. Train with train.target (the shifts of "
        "receding gated channels are trained to 0), or set prune.allow_approximate=true to "
        "zero their shifts and remove them with the error measured in the report",
        len(held),
        dropped,
    )
