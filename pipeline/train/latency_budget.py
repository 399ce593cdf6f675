"""A latency budget in training: ``train.target_latency_ms`` as the share of predicted latency
the budget controller drives to.

``train.target_cost: latency`` counts a group's removal by what it takes off the model's
predicted latency (:class:`pipeline.graph.latency_cost.KeptLatency`, read smoothly), so the
controller's machinery is the MAC budget's: the target share is ``1 - target_ms / dense_ms``
(both predicted), the penalised set the weakest groups up to it, and the layer floors cap it.
The latency model itself is measured on the deployment backend before training
(``pipeline.bench.latency_profiles``; ``recede run`` builds or loads it), and handed in as data.
"""

from __future__ import annotations

import logging

from pipeline.config import PruneConfig, TrainConfig
from pipeline.graph.channel_graph import ChannelGraph
from pipeline.graph.latency_cost import KeptLatency, LatencyModel

logger = logging.getLogger(__name__)


def latency_cost(
    graph: ChannelGraph, cfg: TrainConfig, latency: LatencyModel | None
) -> KeptLatency | None:
    """The budget's cost of kept groups under ``train.target_cost: latency``, else None.

    Raises:
        ValueError: a latency budget without a latency model.
    """
    if cfg.target_cost != "latency":
        return None
    if latency is None:
        raise ValueError(
            "train.target_cost latency needs the latency model measured on the deployment "
            "(train.latency); `recede run` and `recede train` build it, or pass one from "
            "pipeline.bench.latency_profiles.build_latency_model as Polariser.prepare(latency=...)"
        )
    if cfg.target is not None:
        logger.warning(
            "train.target %g is not used under train.target_cost latency: the share comes from "
            "train.target_latency_ms %g; set train.target=null to silence this",
            cfg.target, cfg.target_latency_ms,
        )  # fmt: skip
    return KeptLatency(graph, latency, tuple(g.id for g in graph.removable_groups))


def warn_latency_unreachable(
    cfg: TrainConfig, prune: PruneConfig, cost: KeptLatency, reachable: float
) -> bool:
    """Log a warning, before training, when the layer floors keep the predicted latency above
    ``train.target_latency_ms``, with both numbers; return whether they do."""
    floor_ms = cost.dense * (1.0 - reachable)
    target = cfg.target_latency_ms
    if target is None or floor_ms <= target * (1 + 1e-9):
        return False
    logger.warning(
        "train.target_latency_ms %.4g cannot be reached: prune.min_channels %d and "
        "prune.max_layer_ratio %.2f keep at least %.4g ms predicted on %s (dense %.4g ms), and "
        "the strength would climb to its cap chasing the rest; raise prune.max_layer_ratio or "
        "set train.target_latency_ms >= %.4g",
        target, prune.min_channels, prune.max_layer_ratio, floor_ms, cost.latency.describe(),
        cost.dense, floor_ms,
    )  # fmt: skip
    return True
