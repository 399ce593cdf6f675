"""The peers of the quality grid: UCS and Torch-Pruning's recipes, driven to a MACs budget.

Settings follow Torch-Pruning's own ``benchmarks/main.py`` (see ``benchmarks/quality.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import PruneConfig
from pipeline.graph.costs import count_macs
from pipeline.prune.stage import prune_model


def fit_macs(prune_at: Callable[[float], nn.Module], lo: float, hi: float, budget: int, shape):
    """The pruned model at the smallest knob in [lo, hi] whose MACs fit ``budget`` (bisection,
    the knob grows the cut); ``hi`` must fit."""
    best = prune_at(hi)
    for _ in range(12):
        mid = (lo + hi) / 2
        candidate = prune_at(mid)
        if count_macs(candidate, shape) <= budget:
            hi, best = mid, candidate
        else:
            lo = mid
    return best


def ucs_prune(
    model: nn.Module,
    batch: torch.Tensor,
    fraction: float,
    min_channels: int,
    max_layer_ratio: float,
) -> nn.Module:
    """Per-layer uniform pruning by smallest scale: each BN layer loses ``fraction`` of its
    groups (rounded down, at most ``max_layer_ratio``, at least ``min_channels`` kept)."""
    cfg = PruneConfig(
        threshold="ratio",
        ratio=fraction,
        scope="layer",
        round_to=1,  # the grid's protocol: no rounding, the same MACs for every method
        min_channels=min_channels,
        max_layer_ratio=max_layer_ratio,
    )
    return prune_model(model, batch, cfg).model


@dataclass(frozen=True)
class NoPenaltyTerm:
    """What ``TorchPruningSparsity.penalty`` is: Torch-Pruning's ``regularize`` edits the
    gradients itself, so no penalty term is added to the loss, and the epoch log's penalty per
    channel (``pipeline.train.loop``, which counts ``penalty.params``) is left out."""

    params: tuple[nn.Parameter, ...] = ()


class TorchPruningSparsity:
    """Torch-Pruning's sparse training behind the polariser's calls (``pipeline.train.loop``): the
    pruner's ``regularize`` after every backward, ``update_regularizer`` every epoch, and its
    benchmark's optimizer for sparse learning: one learning rate for all, no weight decay.

    It offers every attribute the training loop reads from a
    :class:`~pipeline.train.polarise.Polariser` (``controller``, ``reachable``, ``penalty``, ``finish_``);
    ``tests/test_quality_bench.py`` trains one Torch-Pruning sparse cell so a new one is caught."""

    def __init__(self, pruner, model: nn.Module, steps_per_epoch: int) -> None:
        self.pruner, self.model, self.steps_per_epoch = pruner, model, steps_per_epoch
        self.controller, self.reachable, self.step = None, None, 0
        self.penalty = NoPenaltyTerm()

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": lr, "weight_decay": 0.0}]

    def before_step(self) -> torch.Tensor:
        if self.step % self.steps_per_epoch == 0:
            self.pruner.update_regularizer()
        self.step += 1
        self.pruner.regularize(self.model)
        return torch.zeros(())

    def after_step(self, optimizer) -> None:
        pass

    def finish_(self) -> tuple[int, int]:
        """Torch-Pruning's recipe has no end-of-training step: no shift is zeroed (the grid's
        models have no squeeze-excite gates, so none is needed for an exact cut)."""
        return 0, 0

    def progress(self):
        from pipeline.train.polarise import Progress

        return Progress(self.step, self.pruner.reg, None, 0.0)


def tp_pruner(model: nn.Module, batch: torch.Tensor, method: str, max_layer_ratio: float):
    """The recipe's Torch-Pruning pruner on ``model``: global ranking, 400 iterative steps."""
    import torch_pruning as tp

    kinds = {
        "tp-mag": (tp.pruner.MagnitudePruner, tp.importance.MagnitudeImportance(p=1), {}),
        "tp-slim": (tp.pruner.BNScalePruner, tp.importance.BNScaleImportance(), {"reg": 1e-5}),
        "tp-group": (
            tp.pruner.GroupNormPruner,
            tp.importance.GroupMagnitudeImportance(p=2),
            {"reg": 5e-4, "alpha": 4},
        ),
    }
    cls, importance, extra = kinds[method]
    return cls(
        model,
        batch[:1].to(next(model.parameters()).device),
        importance=importance,
        iterative_steps=400,
        pruning_ratio=1.0,
        global_pruning=True,
        max_pruning_ratio=max_layer_ratio,
        ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear)][-1:],
        **extra,
    )


def tp_progressive(pruner, model: nn.Module, budget: int, shape) -> nn.Module:
    """Torch-Pruning's ``progressive_pruning``: step until the MACs fit (or the steps run out)."""
    model.cpu().eval()
    while count_macs(model, shape) > budget and pruner.current_step < pruner.iterative_steps:
        pruner.step()
    return model
