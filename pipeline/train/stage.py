"""The train stage: a run config in, a trained model (saved with its spec) out; and the fine-tune
that follows a prune.

``pipeline.train.loop`` is the loop (one SGD epoch after another with the polariser's penalty); this
module wires it from a :class:`~pipeline.config.RunConfig`: it builds the model from its spec,
readies it for the penalty, trains it as one rank of a DDP job under ``torchrun``, saves it, and
fine-tunes a pruned model. ``recede run``, ``recede train`` and ``benchmarks/quality.py`` call
these functions, so each step exists once.

Decision: the wiring is its own module rather than part of ``pipeline/train/loop.py``: the loop is one
idea (an epoch, its log line, checkpoints) and already near the 400-line mark; building from a
config, the output folder's set-up and the fine-tune recipe are the stage around it, as
``pipeline.prune.stage`` is the stage around ``plan``, ``remove`` and ``absorb``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import PruneConfig, RunConfig, TrainConfig, dump_config
from pipeline.core import distributed
from pipeline.core.atomic import write_text_atomic
from pipeline.core.output_folders import check_out_folder, partial_folder
from pipeline.data.datasets import DataBundle, load_data
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.graph.latency_cost import LatencyModel
from pipeline.models.checkpoint import save_pruned
from pipeline.models.zoo import ModelSpec, build_model
from pipeline.train.budget_outcome import BUDGET_TOLERANCE, budget_outcome, budget_reached
from pipeline.train.feasibility import check_feasible
from pipeline.train.loop import (
    EpochLog,
    evaluate,
    recalibrate_bn_,
    resolve_device,
    seed_everything,
    train_,
)
from pipeline.train.polarise import Polariser
from pipeline.train.resume import check_resume_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrunedAccuracy:
    """Test accuracy of the pruned model at each step after the cut."""

    before_finetune: float
    recalibrated: float | None  # None when prune.recalibrate is off
    after_finetune: float


@dataclass(frozen=True)
class BudgetSummary:
    """Whether training reached ``train.target``: what was asked, what receded, the verdict.

    ``reachable`` is the largest share the layer floors allow (known before training); ``outcome``
    is the one line the log and report.md print (``pipeline.train.budget_outcome``), achieved
    beside target; ``tolerance`` the relative shortfall still counted as reached.
    """

    target: float | None
    cost: str
    receded: float | None
    reachable: float | None
    reached: bool | None
    outcome: str
    tolerance: float = BUDGET_TOLERANCE


def model_spec(cfg: RunConfig, data: DataBundle) -> ModelSpec:
    """Everything needed to rebuild the trained model from its constructor."""
    return ModelSpec(
        model=cfg.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        input_shape=data.input_shape,
        bounded_bn=cfg.train.penalty.bounded,
        bn_shift=cfg.train.bn_shift,
    )


def example_batch(data: DataBundle, n: int = 32) -> torch.Tensor:
    """The first ``n`` test images: the example every stage traces and verifies with."""
    return next(iter(data.test))[0][:n].cpu()


def reseed_(data: DataBundle, seed: int) -> None:
    """Restart every random stream a training draws from at ``seed``: the global RNGs and the
    training loader's own shuffling generator (when it has one), so what follows does not
    depend on what ran before it in the same process."""
    seed_everything(seed)
    if data.train.generator is not None:
        data.train.generator.manual_seed(seed)


def build_and_train(
    cfg: RunConfig,
    data: DataBundle,
    checkpoint_dir: Path | None,
    *,
    resume: bool = False,
    latency: LatencyModel | None = None,
) -> tuple[nn.Module, list[EpochLog]]:
    """Build the model, ready it for the penalty (``Polariser.prepare``) and train it.

    ``resume`` continues from ``checkpoint_dir/train_last.pt`` when it exists. Under
    ``torchrun`` the training is one rank of a DDP job (see ``pipeline.core.distributed``).

    For ISTA with ``rescale != 1`` the gamma/W rescaling is applied before training and undone
    after, so the saved model has the original parameterisation.

    ``latency`` is the measured latency model a ``train.target_cost: latency`` budget needs.
    """
    device = resolve_device(cfg.train.device)
    with distributed.process_group(device, cfg.data.batch_size):  # only under torchrun
        return _build_and_train(cfg, data, checkpoint_dir, resume, latency)


def _build_and_train(
    cfg: RunConfig,
    data: DataBundle,
    checkpoint_dir: Path | None,
    resume: bool,
    latency: LatencyModel | None = None,
) -> tuple[nn.Module, list[EpochLog]]:
    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
    pen_cfg = cfg.train.penalty
    example = example_batch(data, 2)
    steps = cfg.train.epochs * len(distributed.shard_loader(data.train, cfg.train.seed))
    polariser = Polariser.prepare(
        model, example, cfg.train, total_steps=max(1, steps), prune=cfg.prune, latency=latency
    )
    rescaled: list[str] = []
    if pen_cfg.method == "ista" and pen_cfg.rescale != 1.0:
        from pipeline.train.ista import rescale_gamma_

        graph = build_channel_graph(model, example)
        rescaled = rescale_gamma_(model, graph, example, pen_cfg.rescale)
    logs = train_(
        model,
        data,
        cfg.train,
        epochs=cfg.train.epochs,
        lr=cfg.train.lr,
        polariser=polariser,
        checkpoint_dir=checkpoint_dir,
        tag="train",
        resume=resume,
    )
    if rescaled:
        rescale_gamma_(model.cpu(), graph, example, 1.0 / pen_cfg.rescale, only=rescaled)
    return model.cpu().eval(), logs


def open_training(
    cfg: RunConfig, out: str | Path, *, kind: str, resume: bool, force: bool
) -> tuple[Path, DataBundle]:
    """Check the output folder (and, resuming, that the config is unchanged), then load data.

    The setup ``recede run`` and ``recede train`` share, done before any training.

    Raises:
        OutputError: ``out`` cannot be written (see ``pipeline.core.output_folders.check_out_folder``).
        CheckpointError: ``resume`` with a training config that differs from the folder's.
        ConfigError: the model cannot be built or would not fit (``pipeline.train.feasibility``).
    """
    final = check_out_folder(out, kind=kind, force=force, flag="--out")
    if resume:
        check_resume_config(cfg, final)
    check_feasible(cfg)  # the model builds and fits: refused now, not after data or training
    return final, load_data(cfg.data, seed=cfg.train.seed)


def train_into(
    cfg: RunConfig,
    data: DataBundle,
    stage: Path,
    model_dir: str,
    *,
    resume: bool,
    latency: LatencyModel | None = None,
) -> tuple[nn.Module, list[EpochLog]]:
    """Write ``config.yaml``, train (checkpoints in ``stage/checkpoints``) and save the trained
    model into ``stage/model_dir``; returns the model and the epoch logs."""
    write_text_atomic(stage / "config.yaml", dump_config(cfg))
    seed_everything(cfg.train.seed)
    model, logs = build_and_train(cfg, data, stage / "checkpoints", resume=resume, latency=latency)
    save_pruned(model, stage / model_dir, spec=model_spec(cfg, data))
    return model, logs


def train_as_worker(cfg: RunConfig, data: DataBundle, final: Path, *, resume: bool) -> None:
    """A torchrun rank other than 0: train in step with rank 0 and write nothing.

    Resuming, it reads rank 0's checkpoint in ``final``'s partial folder.
    """
    seed_everything(cfg.train.seed)
    build_and_train(cfg, data, partial_folder(final) / "checkpoints", resume=resume)


def budget_summary(cfg: RunConfig, logs: list[EpochLog]) -> BudgetSummary:
    """Target against what training receded (``train.target`` null: no budget)."""
    last = logs[-1] if logs else None
    receded = last.receded if last is not None else None
    reachable = last.reachable if last is not None else None
    target = cfg.train.target
    return BudgetSummary(
        target=target,
        cost=cfg.train.target_cost,
        receded=receded,
        reachable=reachable,
        reached=budget_reached(target, receded),
        outcome=budget_outcome(target, receded, reachable, cfg.prune),
    )


def finetune_(
    model: nn.Module,
    data: DataBundle,
    train: TrainConfig,
    prune: PruneConfig,
    *,
    device: torch.device | None = None,
    test: torch.utils.data.DataLoader | None = None,
    seed: int | None = None,
) -> PrunedAccuracy:
    """Recalibrate BN (``prune.recalibrate``) and fine-tune a pruned ``model`` in place for
    ``prune.finetune_epochs`` at ``prune.finetune_lr``, without a penalty.

    The pruned model's downstream BN statistics still describe the unpruned network, hence the
    recalibration (no gradient steps) before the fine-tune.

    Args:
        model: The pruned model; it ends on ``device`` in eval mode.
        data: Its training batches fine-tune and recalibrate; its test loader is what each
            fine-tune epoch's log line evaluates.
        train: The training loop's settings (device, momentum, BN learning-rate multiplier).
        prune: ``recalibrate``, ``finetune_epochs`` and ``finetune_lr``.
        device: Where the accuracies are measured and BN is recalibrated; None means the CPU
            (``recede run`` measures where it exports). Training runs on ``train.device``.
        test: The loader every returned accuracy uses; None means ``data.test``. (The quality
            benchmark logs epochs on a test subset and reports on the whole test set.)
        seed: None continues the caller's random streams; a seed restarts them (see
            :func:`reseed_`) after the first accuracy, so a benchmark cell's fine-tune does not
            depend on the cells before it.

    Returns:
        The accuracy as pruned, after recalibration (None when off) and after the fine-tune.
    """
    device = torch.device("cpu") if device is None else device
    test = data.test if test is None else test
    before = evaluate(model.to(device), test, device)
    if seed is not None:
        reseed_(data, seed)
    recalibrated = None
    if prune.recalibrate:
        recalibrate_bn_(model, data.train, device)
        recalibrated = evaluate(model, test, device)
    train_(
        model,
        data,
        train,
        epochs=prune.finetune_epochs,
        lr=prune.finetune_lr,
        polariser=None,
        tag="finetune",
    )
    after = evaluate(model.to(device).eval(), test, device)
    return PrunedAccuracy(before, recalibrated, after)
