"""Wire a latency budget (``train.target_cost: latency``, ``recede prune --target-ms``) through
the stages: check the deployment, build or load the latency model, cut to the target,
measure, report.

Order, so that a bad input leaves nothing on disk: :func:`check_latency_deployment` before any
work (``int8``, ``tensorrt``, ``cuda`` without a GPU, ``torchrun``), then :func:`latency_model`
(cached per machine, ``pipeline.bench.latency_cache``) and :func:`check_latency_target` before
the output folder is staged; after training, :func:`prune_to_latency` cuts and re-measures
(``pipeline.prune.latency_cut``), and after the export :func:`measure_final` times the final
pruned ONNX file, beside the dense one, for the report.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.bench.latency_cache import cached_latency_model
from pipeline.bench.latency_pieces import check_deployment
from pipeline.bench.latency_profiles import (
    build_latency_model,
    median_ms,
    quietest_ms,
    time_models_ms,
    time_onnx_ms,
)
from pipeline.config import ConfigError, LatencyConfig, PruneConfig, RunConfig
from pipeline.data.datasets import DataBundle
from pipeline.graph.latency_cost import LatencyModel
from pipeline.prune.latency_cut import (
    TOLERANCE,
    Cutter,
    LatencyFit,
    check_cut_ranking,
    fit_to_latency,
)
from pipeline.prune.stage import Pruned, prune_model
from pipeline.run.latency_report import LatencyBudgetSummary, Measured
from pipeline.train.polarise import BUDGET_TOLERANCE, budget_outcome, budget_reached
from pipeline.train.stage import BudgetSummary

logger = logging.getLogger(__name__)

FINAL_WARMUP, FINAL_RUNS = 20, 100


def check_latency_deployment(cfg: RunConfig) -> None:
    """Refuse, before any work, a latency budget that cannot be measured here (naming the key).

    Raises:
        ConfigError: see :func:`pipeline.bench.latency_pieces.check_deployment`; also a latency
            budget under ``torchrun`` (every rank would time the backend at once).
    """
    if cfg.train.target_cost != "latency":
        return
    check_deployment(cfg.train.latency)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "train.target_cost latency cannot train under torchrun: every process would time "
            "the backend at once on one machine; train in one process or use target_cost macs"
        )


def latency_model(
    model: nn.Module, example: torch.Tensor, cfg: LatencyConfig
) -> tuple[LatencyModel, bool]:
    """``model``'s latency model on ``cfg`` (from the cache when there), and whether it was."""
    return cached_latency_model(model, example, cfg, build_latency_model)


def check_latency_target(target_ms: float, model: LatencyModel, what: str) -> None:
    """Refuse a target the dense model already meets (``what`` names the key or flag)."""
    if target_ms >= model.dense_ms:
        raise ConfigError(
            f"{what} {target_ms:g} ms is not below the dense model's predicted "
            f"{model.dense_ms:.4g} ms on {model.describe()}: nothing needs to be pruned; set it "
            f"below {model.dense_ms:.4g}"
        )


def dense_example(shape: tuple[int, ...]) -> torch.Tensor:
    """Two random samples of per-sample ``shape``: what the latency model traces and exports."""
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))


def latency_model_for_run(cfg: RunConfig, data: DataBundle) -> tuple[LatencyModel, bool] | None:
    """The latency model a ``train.target_cost: latency`` budget trains to (None otherwise),
    and whether it came from the cache; the target is checked against it."""
    if cfg.train.target_cost != "latency":
        return None
    from pipeline.models.zoo import build_model

    dense = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
    built = latency_model(dense, dense_example(data.input_shape), cfg.train.latency)
    check_latency_target(cfg.train.target_latency_ms, built[0], "train.target_latency_ms")
    return built


def prune_to_latency(
    model: nn.Module,
    example: torch.Tensor,
    prune: PruneConfig,
    latency: LatencyModel,
    target_ms: float,
    *,
    receded_below: float | None = None,
) -> tuple[Pruned, LatencyFit]:
    """Cut ``model`` to ``target_ms``: the latency model's cut, measured on the backend, moved
    up the ranking while over (``pipeline.prune.latency_cut.fit_to_latency``)."""
    cfg = LatencyConfig(**latency.deployment)
    cutter = Cutter(model, example, prune, latency)
    pruned: dict[int, Pruned] = {}

    def measure(cut) -> float:
        check_cut_ranking(cutter.importance, cut)
        pruned[cut.index] = prune_model(model, example, cut.prune, receded_below=receded_below)
        dense_ms, cut_ms = time_models_ms([model, pruned[cut.index].model], example, cfg)
        return cut_ms / dense_ms * latency.dense_ms  # in the latency model's own frame

    fit = fit_to_latency(lambda aim, start: cutter.best(aim, start), measure, target_ms)
    return pruned[fit.cut.index], fit


def both(blocks: list[list[float]]) -> tuple[float, float]:
    """The p50 of every run and the quietest block's median (:func:`quietest_ms`)."""
    return median_ms(blocks), quietest_ms(blocks)


def measure_final(paths: tuple[Path, Path], cfg: LatencyConfig) -> Measured:
    """The dense and the pruned ONNX file on the deployment ``cfg``, timed together
    (:data:`FINAL_RUNS` runs each, alternating blocks)."""
    (dense, _), (pruned, quiet) = time_onnx_ms(
        list(paths), cfg, warmup=FINAL_WARMUP, runs=FINAL_RUNS, statistic=both
    )
    return Measured(pruned, quiet, dense)


def latency_summary(
    model: LatencyModel, fit: LatencyFit, measured: Measured, cached: bool
) -> LatencyBudgetSummary:
    """The report's latency section from the final measurement."""
    d = model.deployment
    return LatencyBudgetSummary(
        target_ms=fit.target_ms,
        predicted_ms=fit.cut.predicted_ms,
        measured_ms=measured.p50_ms,
        measured_quiet_ms=measured.quiet_ms,
        dense_measured_ms=measured.dense_p50_ms,
        backend=d["backend"], device=d["device"], precision=d["precision"], batch=d["batch"],
        threads=d["threads"], clock=d["clock"],
        table_error=model.table_error,
        dense_predicted_ms=model.dense_ms,
        reached=measured.quiet_ms <= (1 + TOLERANCE) * fit.target_ms,
        remeasures=fit.remeasures,
        round_to=fit.cut.round_to,
        cache="hit" if cached else "built",
        build_seconds=0.0 if cached else model.build_seconds,
    )  # fmt: skip


def training_budget(cfg: RunConfig, model: LatencyModel, logs: list) -> BudgetSummary:
    """The training budget in shares of the predicted latency (what the controller drove)."""
    dense = model.predict_ms({}, exact=False)
    target_ms = cfg.train.target_latency_ms
    share = 1.0 - target_ms / dense
    last = logs[-1] if logs else None
    receded = None if last is None else last.receded
    reachable = None if last is None else last.reachable
    return BudgetSummary(
        target=share,
        cost="latency",
        receded=receded,
        reachable=reachable,
        reached=budget_reached(share, receded),
        outcome=_outcome(share, receded, reachable, dense, target_ms),
    )


def _outcome(
    share: float, receded: float | None, reachable: float | None, dense: float, target_ms: float
) -> str:
    """``budget_outcome`` in the latency's own terms: ms beside the shares, and fixes that name
    ``train.target_latency_ms``."""
    if receded is None or budget_reached(share, receded):
        return budget_outcome(share, receded, reachable)
    ms = dense * (1.0 - receded)
    line = (
        f"budget MISSED: receded {receded:.3f} of the predicted latency ({ms:.4g} ms), target "
        f"{share:.3f} ({target_ms:.4g} ms); "
    )
    if reachable is not None and reachable < share - BUDGET_TOLERANCE:
        floor = dense * (1.0 - reachable)
        return line + (
            f"the layer floors keep at least {floor:.4g} ms: raise prune.max_layer_ratio or "
            f"lower prune.min_channels, or raise train.target_latency_ms to >= {floor:.4g}"
        )
    return line + (
        "train longer (train.epochs), raise prune.max_layer_ratio, or raise train.target_latency_ms"
    )
