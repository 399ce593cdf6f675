"""The latency-budget parts of the command line: ``recede prune --target-ms`` and
``recede inspect --latency-table``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli.args import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.config import LatencyConfig, PruneConfig
    from pipeline.graph.latency_cost import LatencyModel
    from pipeline.prune.stage import Pruned

logger = logging.getLogger("recede")

DEPLOYMENT_FLAGS = ("backend", "device", "precision", "batch", "threads", "clock")
LATENCY_FILE = "latency_model.json"


def latency_flags(args: argparse.Namespace) -> LatencyConfig | None:
    """The deployment ``--target-ms`` is measured on, checked here before any work; None
    without ``--target-ms``.

    Raises:
        UsageError: a deployment flag without ``--target-ms``, an invalid combination (the cpu
            clock with more than one thread), or a deployment this machine cannot time.
    """
    from pipeline.bench.latency_pieces import check_deployment
    from pipeline.config import ConfigError, LatencyConfig

    given = {k: getattr(args, k) for k in DEPLOYMENT_FLAGS if getattr(args, k, None) is not None}
    if args.target_ms is None:
        if given:
            flags = ", ".join(f"--{k}" for k in given)
            raise UsageError(f"{flags} set the deployment of a latency budget; expected them "
                             "with --target-ms MS, got no --target-ms")  # fmt: skip
        return None
    if "clock" not in given and (given.get("threads", 1) != 1 or given.get("device") == "cuda"):
        given["clock"] = "wall"  # the cpu clock times one CPU thread only
    try:
        cfg = LatencyConfig(**given)
        check_deployment(cfg)
    except ConfigError as err:
        raise UsageError(_as_flags(str(err))) from None
    return cfg


def _as_flags(message: str) -> str:
    """A config message about ``train.latency.X`` in terms of the ``--X`` flag."""
    for key in DEPLOYMENT_FLAGS:
        message = message.replace(f"train.latency.{key}=", f"--{key} ").replace(
            f"train.latency.{key}", f"--{key}"
        )
    return message


def cut_to_latency(
    args: argparse.Namespace,
    model: nn.Module,
    example: torch.Tensor,
    prune: PruneConfig,
    deployment: LatencyConfig,
) -> tuple[Pruned, dict[str, Any], LatencyModel]:
    """``recede prune --target-ms``: the latency model (cached), the cut, the measurements.

    Returns:
        The pruned result, the ``latency`` section of the prune's report.json and the model.
    """
    from pipeline.bench.latency_profiles import time_models_ms
    from pipeline.config import ConfigError
    from pipeline.run.latency_budget import (
        both,
        check_latency_target,
        latency_model,
        latency_summary,
        prune_to_latency,
    )
    from pipeline.run.latency_report import Measured

    lm, cached = latency_model(model, example, deployment)
    try:
        check_latency_target(args.target_ms, lm, "--target-ms")
    except ConfigError as err:
        raise UsageError(str(err)) from None
    pruned, fit = prune_to_latency(model, example, prune, lm, args.target_ms)
    (dense, _), (p50, quiet) = time_models_ms(
        [model, pruned.model], example, deployment, statistic=both
    )
    summary = latency_summary(lm, fit, Measured(p50, quiet, dense), cached)
    (logger.info if summary.reached else logger.warning)("%s", summary.line())
    return pruned, dataclasses.asdict(summary), lm


def print_latency_table(folder: Path, args: argparse.Namespace) -> None:
    """``recede inspect --latency-table DIR``: the latency model DIR's budget used."""
    import json

    from pipeline.cli.bench import verify_unless_forced
    from pipeline.graph.latency_cost import LatencyModel
    from pipeline.run.latency_report import latency_table_text

    path = folder / LATENCY_FILE
    if not path.is_file():
        raise UsageError(
            f"--latency-table: {folder} holds no {LATENCY_FILE}; expected a folder written by "
            "`recede run` or `recede train` with train.target_cost latency, or by "
            "`recede prune --target-ms`"
        )
    verify_unless_forced(folder, args)
    try:
        model = LatencyModel.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--latency-table: {path} is not a latency model ({err})") from None
    print(latency_table_text(model))
