"""Training: a plain SGD loop with a BN-scale penalty, one eval and one checkpoint per epoch.

BN parameters (bounded-BN logits and shifts, or plain gamma/beta) get ``bn_lr_mult`` x the
learning rate and no weight decay, as in the receding-importance reference code. The penalty,
its budget controller and the post-step projection come from a ``pipeline.train.polarise.Polariser``,
the same object a user's own loop calls. After each epoch one line is logged: loss, penalty per
channel, accuracy, the importance distribution and the budget's progress; its fields are named
in words and explained in :func:`format_epoch`'s docstring (the legend). Epochs, evaluation and
BN recalibration show tqdm bars (``pipeline.core.progress``) when someone is watching.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.core import distributed
from pipeline.core.atomic import save_torch_atomic
from pipeline.core.progress import progress
from pipeline.data.datasets import DataBundle
from pipeline.layers.bn import bn_modules, channel_importance, is_bn
from pipeline.prune.threshold import importance_summary
from pipeline.train.budget_outcome import budget_outcome, budget_reached
from pipeline.train.polarise import Polariser, bn_param_groups

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochLog:
    """What one epoch did."""

    epoch: int
    loss: float
    penalty: float
    accuracy: float
    below_005: float
    above_05: float
    bimodality: float
    seconds: float
    strength: float | None = None  # penalty strength at the end of the epoch
    receded: float | None = None  # receded share (as the budget counts it)
    wanted: float | None = None  # the budget schedule's share at the end of the epoch
    reachable: float | None = None  # the most the layer floors let recede (None: no budget)
    channels: int | None = None  # BN channels the penalty sums over (None: no polariser)

    @property
    def penalty_per_channel(self) -> float | None:
        """The penalty term per BN channel, lambda x mean per-channel penalty (see format_epoch)."""
        return self.penalty / self.channels if self.channels else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto"
        )
    return torch.device(name)


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, lr: float, polariser: Polariser | None = None
) -> torch.optim.SGD:
    """SGD with BN parameters at ``bn_lr_mult`` x lr and no weight decay (ISTA: see polarise)."""
    if polariser is not None:
        groups = polariser.param_groups(lr, cfg.weight_decay)
    else:  # ISTA's gammas still get their momentum-0 group without a polariser
        from pipeline.train.penalties import scale_parameters

        ista = cfg.penalty.method == "ista"
        plain = scale_parameters(model, bounded=False) if ista else ()
        groups = bn_param_groups(model, lr, cfg.weight_decay, cfg.bn_lr_mult, plain)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def maybe_compile(model: nn.Module, cfg: TrainConfig, backend: str = "inductor") -> nn.Module:
    """The module the training loop calls: ``model``, or with ``train.compile`` a
    ``torch.compile`` wrapper of it.

    The wrapper shares ``model``'s parameters and buffers, so checkpoints, evaluation and the
    stages after training keep using the plain ``model``. AOTAutograd compiles forward and
    backward; recede's bounded BN enters the graph as one ``recede::bounded_bn_forward`` /
    ``_backward`` op per layer on the Triton backend, and as ``F.batch_norm`` on the torch
    reference (CPU), which inductor fuses itself. The penalty, the budget controller (Python
    bookkeeping with host syncs) and the optimizer step stay eager, between backward and the
    next step.
    """
    if not cfg.compile:
        return model
    return torch.compile(model, backend=backend)


def _schedule(cfg: TrainConfig, epochs: int) -> Callable[[int], float]:
    if cfg.schedule == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * e / max(1, epochs)))
    if cfg.schedule == "step":
        return lambda e: 0.1 ** sum(e >= m for m in (epochs // 2, 3 * epochs // 4))
    return lambda e: 1.0


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in progress(loader, "evaluate"):
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        total += len(y)
    model.train(was)
    return correct / max(1, total)


def all_importances(model: nn.Module) -> np.ndarray:
    """Every BN channel's importance, concatenated in module order."""
    values = [channel_importance(m).cpu() for m in bn_modules(model).values()]
    return torch.cat(values).numpy() if values else np.zeros(0)


@torch.no_grad()
def recalibrate_bn_(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    max_batches: int = 50,
) -> None:
    """Re-estimate BN running statistics with a cumulative average over training batches.

    BN scales move fast (they get ``bn_lr_mult`` x the learning rate), so exponential running
    statistics lag behind the weights; eval accuracy then understates the model.
    """
    norms = [m for m in model.modules() if is_bn(m)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
        m.num_batches_tracked.zero_()
        m.momentum = None
    was = model.training
    model.train()
    total = min(max_batches, len(loader))
    for i, (x, _) in enumerate(progress(loader, "BN recalibration", total=total)):
        if i >= max_batches:
            break
        model(x.to(device))
    model.train(was)
    for m, momentum in zip(norms, saved, strict=False):
        m.momentum = momentum


class DivergedError(ValueError):
    """The loss or a BN scale became NaN/Inf; training stopped (CLI exit 2: lower the lr)."""


def _first_bad_scale(model: nn.Module) -> str | None:
    """Qualified name of the first BN whose scale parameter is not finite, else None."""
    bns = [(n, m.weight) for n, m in bn_modules(model).items() if m.weight is not None]
    if not bns or bool(torch.isfinite(torch.stack([w.detach().sum() for _, w in bns])).all()):
        return None  # one reduction and one sync per step
    return next(n for n, w in bns if not bool(torch.isfinite(w).all()))


def _check_finite(model: nn.Module, loss: float, step: int, where: str) -> None:
    layer = _first_bad_scale(model)
    if math.isfinite(loss) and layer is None:
        return
    scale = f"the BN scale of {layer!r} is not finite" if layer else "every BN scale is finite"
    raise DivergedError(
        f"{where}, step {step}: loss {loss:.4g}, {scale}; expected finite values; "
        "lower train.lr or train.penalty.strength"
    )


def _run_epoch(
    model, loader, opt, polariser: Polariser | None, device, desc: str, net=None
) -> tuple[float, float]:
    """One epoch; ``net`` (default ``model``) runs the forward pass: the DDP wrapper under torchrun."""
    net = model if net is None else net
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total_loss = total_pen = 0.0
    bar = progress(loader, desc)
    for step, (x, y) in enumerate(bar, 1):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x.to(device)), y.to(device))
        _check_finite(model, float(loss.detach()), step, desc)  # before this batch's update
        loss.backward()
        pen = polariser.before_step() if polariser is not None else torch.zeros(())
        opt.step()
        if polariser is not None:
            polariser.after_step(opt)
        total_loss += float(loss.detach())
        total_pen += float(pen)
        bar.set_postfix_str(f"loss {total_loss / step:.4f}", refresh=False)
    mean_loss = total_loss / max(1, len(loader))
    _check_finite(model, mean_loss, len(loader), f"{desc} (after its last update)")
    return mean_loss, total_pen / max(1, len(loader))


def _epoch_log(model, data, polariser, device, epoch: int, losses: tuple, start: float) -> EpochLog:
    stats = importance_summary(all_importances(model))
    state = polariser.progress() if polariser is not None else None
    return EpochLog(
        epoch,
        *losses,
        evaluate(model, data.test, device),
        stats["below_0.05"],
        stats["above_0.5"],
        stats["bimodality"],
        time.perf_counter() - start,
        state.strength if state else None,
        state.receded if state else None,
        state.wanted if state else None,
        state.reachable if state else None,
        sum(p.numel() for p in polariser.penalty.params) if polariser is not None else None,
    )


def train_(
    model: nn.Module,
    data: DataBundle,
    cfg: TrainConfig,
    *,
    epochs: int,
    lr: float,
    polariser: Polariser | None,
    checkpoint_dir: Path | None = None,
    tag: str = "train",
    resume: bool = False,
) -> list[EpochLog]:
    """Train ``model`` in place for ``epochs``; return one log per epoch.

    With ``checkpoint_dir``, each epoch writes ``<tag>_epochNNN.pt`` (the state dict) and
    ``<tag>_last.pt`` (everything needed to continue, see ``pipeline.train.resume``); ``resume``
    continues from ``<tag>_last.pt`` when it exists.

    Inside an open process group (``pipeline.core.distributed``) each rank trains on its share of
    every global batch through DistributedDataParallel, and rank 0 alone writes checkpoints.

    After the last epoch's steps the polariser zeroes the shifts of receded gated channels
    (``Polariser.finish_``), so the last evaluation and the saved model are what the prune cuts.

    Raises:
        DivergedError: The loss or a BN scale became NaN/Inf; the last good checkpoint stays.
    """
    from pipeline.train.fuse_relu import fused_for_training
    from pipeline.train.resume import TrainingState

    device = distributed.device_for(resolve_device(cfg.device))
    model.to(device)
    opt = make_optimizer(model, cfg, lr, polariser)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, epochs))
    loader = distributed.shard_loader(data.train, cfg.seed)
    state = TrainingState(model, opt, sched, polariser, loader)
    last = Path(checkpoint_dir) / f"{tag}_last.pt" if checkpoint_dir is not None else None
    logs = [EpochLog(**log) for log in state.load(last)] if resume and last else []
    # BN+ReLU fused on CUDA only while training: later stages see plain nn.ReLU modules
    with fused_for_training(model, data.input_shape, enabled=device.type == "cuda"):
        net = maybe_compile(distributed.wrap(model, device), cfg)  # runs the forward pass
        for epoch in range(len(logs) + 1, epochs + 1):
            start, desc = time.perf_counter(), f"{tag} epoch {epoch}/{epochs}"
            distributed.set_epoch(loader, epoch)
            try:
                losses = _run_epoch(model, loader, opt, polariser, device, desc, net)
                losses = distributed.mean_across_ranks(losses, device)  # each rank saw its share
            except DivergedError as err:
                good = last is not None and last.exists()
                kept = f"the last good checkpoint is {last}" if good else "no checkpoint"
                raise DivergedError(f"{err}; {kept}") from None
            sched.step()
            if polariser is not None and epoch == epochs:  # before the last evaluation
                polariser.finish_()
            recalibrate_bn_(model, loader, device)
            distributed.average_buffers_(model)
            logs.append(_epoch_log(model, data, polariser, device, epoch, losses, start))
            _log_epoch(tag, logs[-1], epochs)
            if last is not None and distributed.is_main():
                save_torch_atomic(model.state_dict(), last.with_name(f"{tag}_epoch{epoch:03d}.pt"))
                state.save(last, [dataclasses.asdict(log) for log in logs])
    if polariser is not None and polariser.controller is not None and logs:
        target = getattr(polariser, "target", cfg.target)  # a latency budget derives its share
        reached = budget_reached(target, logs[-1].receded)
        log = logger.info if reached else logger.warning
        last_log = logs[-1]
        outcome = budget_outcome(target, last_log.receded, last_log.reachable, polariser.prune)
        log("%s: %s", tag, outcome)
    return logs


def format_epoch(tag: str, log: EpochLog, epochs: int) -> str:
    """One epoch as a line a reader can follow without the source.

    Example (a receding run under a 50% budget)::

        train epoch 3/10: loss 0.4321, penalty 0.83/channel (lambda 124), test accuracy 92.00%
        | importance: 46.4% < 0.05, 30.0% > 0.5, bimodality 0.92 | receded 20.9% (scheduled 50.0%)
        | 61.2 s

    Legend (the order of the line):

    - ``loss``: mean cross-entropy of the epoch's training batches.
    - ``penalty X/channel (lambda L)``: the sparsity penalty the optimiser adds, per BN channel:
      lambda times the mean per-channel penalty, i.e. the epoch's mean penalty term divided by
      the number of BN channels it sums over. Decision: the raw sum grows with the network's
      width and with lambda (a budget's controller raised lambda to 124 and the sum to ~4e5 on
      a ResNet), so it cannot be read beside the loss; per channel it can (it is what one
      channel's scale pays, as the loss is what one sample pays), and it stays comparable
      across models. ``lambda`` is the strength in force at the epoch's end (a budget's
      controller moves it). Under a budget the gradient reaches only the channels the
      controller chose, while the figure averages over all of them (those near their plateau
      weigh most), so read it as the pressure in force rather than the pull on the chosen
      channels. ISTA shrinks scales after each step instead of adding a term, so its penalty
      reads 0. Absent without a polariser (fine-tuning).
    - ``test accuracy``: top-1 on the test split after the epoch's BN recalibration.
    - ``importance``: the distribution of BN channel importances (|gamma|, or the bounded BN's
      scale): the share of channels below 0.05 (receded, about to be pruned) and above 0.5
      (clearly kept), and Sarle's bimodality coefficient (``pipeline.prune.threshold.sarle_bc``):
      above 5/9 = 0.555 the importances form two modes, i.e. a valley to cut in is emerging.
    - ``receded X (scheduled Y)``: under a budget (``train.target``), the share that has
      receded, counted as the target counts it (groups or MACs), and the share the controller's
      schedule asks for by now (it ramps up to the target). Absent without a budget.
    - the epoch's wall-clock seconds, evaluation included.
    """
    parts = [f"loss {log.loss:.4f}"]
    if log.penalty_per_channel is not None:
        lam = "" if log.strength is None else f" (lambda {log.strength:.3g})"
        parts.append(f"penalty {log.penalty_per_channel:.3g}/channel{lam}")
    parts.append(f"test accuracy {log.accuracy:.2%}")
    fields = [
        ", ".join(parts),
        f"importance: {log.below_005:.1%} < 0.05, {log.above_05:.1%} > 0.5, "
        f"bimodality {log.bimodality:.2f}",
    ]
    if log.receded is not None and log.wanted is not None:
        fields.append(f"receded {log.receded:.1%} (scheduled {log.wanted:.1%})")
    elif log.receded is not None and log.reachable is not None:
        fields.append(f"receded {log.receded:.1%}")
    fields.append(f"{log.seconds:.1f} s")
    return f"{tag} epoch {log.epoch}/{epochs}: " + " | ".join(fields)


def _log_epoch(tag: str, log: EpochLog, epochs: int) -> None:
    logger.info("%s", format_epoch(tag, log, epochs))
