"""Polarised training inside any training loop: the penalty, the budget controller and the
post-step projection or shrink behind three calls.

recede's own trainer (``pipeline.train.loop``) uses exactly this object, so a user's plain PyTorch or
Lightning loop trains the same way::

    pol = Polariser.prepare(model, example, TrainConfig(target=0.5), total_steps=len(loader) * epochs)
    opt = torch.optim.SGD(pol.param_groups(lr=0.05, weight_decay=5e-4), lr=0.05, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pol.before_step()   # penalty gradient into .grad; the controller sets its strength
        opt.step()
        pol.after_step(opt) # polarization clamp / ISTA shrink
    pol.progress()          # step, strength, wanted and receded share

``prepare`` readies the model for the method: receding and ``none`` train bounded BN (a fresh
``BoundedBatchNorm2d`` per ``nn.BatchNorm2d``, logits from ``train.bn_init``: the constant
``bn_init_logit`` or N(0, 1) as in the reference code); L1, polarization and ISTA train plain BN
with gamma initialised to 0.5 (Network Slimming, polarization and the reference code all do).
Pass ``convert=False`` for a model that is already prepared or pretrained.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import PenaltyConfig, PruneConfig, TrainConfig
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.graph.latency_cost import LatencyModel, latency_share
from pipeline.layers.bn import bn_modules, convert_to_bounded_bn_
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.train.budget import BudgetController, ReceededShare
from pipeline.train.latency_budget import latency_cost, warn_latency_unreachable
from pipeline.train.penalties import Penalty, make_penalty

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where polarisation stands after ``step`` optimizer steps."""

    step: int
    strength: float
    wanted: float | None  # scheduled receded share (None without a target)
    receded: float  # measured receded share (cost-weighted as the target)
    reachable: float | None = None  # the most the layer floors let recede (None without a target)


@torch.no_grad()
def init_bn_(model: nn.Module, cfg: TrainConfig, *, bounded: bool) -> None:
    """Initialise BN scales as ``cfg.bn_init`` says (see module docstring)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    for m in bn_modules(model).values():
        if bounded and cfg.bn_init == "normal":
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
        elif not bounded:  # a constant bounded logit was set by convert_to_bounded_bn_
            m.weight.fill_(0.5)


def _budget_penalty(cfg: TrainConfig) -> PenaltyConfig:
    """The penalty as configured, except polarization's t under a budget.

    Polarization's exact gradient at a full-scale channel is ``lambda (t - 2p)`` when a share
    ``p`` of the scales sits below their mean: once ``p`` passes ``t / 2`` it pushes the rest up,
    so t itself caps what can recede (60% at the paper's 1.2). Under a budget, t is raised to
    ``2 * target + 0.1`` when lower, and the module logger says so.
    """
    pen = cfg.penalty
    if pen.method != "polarization" or cfg.target is None or pen.t >= 2 * cfg.target + 0.1:
        return pen
    t = 2 * cfg.target + 0.1
    logger.info(
        "polarization t raised from %g to %g so that %.0f%% can recede", pen.t, t, 100 * cfg.target
    )
    return dataclasses.replace(pen, t=t)


def bn_param_groups(
    model: nn.Module, lr: float, weight_decay: float, bn_lr_mult: float, plain_sgd: tuple = ()
) -> list[dict]:
    """Conv/linear weights; BN parameters at ``bn_lr_mult`` x lr without weight decay; and
    ``plain_sgd`` parameters (ISTA's gammas) in a BN-rate group with momentum 0."""
    bn_ids = {id(p) for m in bn_modules(model).values() for p in m.parameters()}
    plain_ids = {id(p) for p in plain_sgd}
    params = list(model.parameters())
    groups = [
        {
            "params": [p for p in params if id(p) not in bn_ids],
            "weight_decay": weight_decay,
            "lr": lr,
        },
        {
            "params": [p for p in params if id(p) in bn_ids and id(p) not in plain_ids],
            "weight_decay": 0.0,
            "lr": lr * bn_lr_mult,
        },
    ]
    if plain_ids:
        groups.append(
            {"params": list(plain_sgd), "weight_decay": 0.0, "lr": lr * bn_lr_mult, "momentum": 0.0}
        )
    return groups


class Polariser:
    """A penalty bound to one model, with an optional budget controller; see module docstring."""

    def __init__(
        self,
        model: nn.Module,
        penalty: Penalty,
        tracker: ReceededShare,
        cfg: TrainConfig,
        total_steps: int,
        target: float | None = None,
    ) -> None:
        self.model, self.penalty, self.tracker, self.cfg = model, penalty, tracker, cfg
        self.controller = None
        self.target = cfg.target if target is None else target  # a latency budget's share
        if self.target is not None:
            self.controller = BudgetController(
                self.target,
                total_steps,
                penalty.config.strength,
                level=cfg.receded_below,
                ramp=cfg.target_ramp,
                rate=cfg.strength_rate,
                delay=cfg.target_delay,
            )
        self.step = 0
        self.reachable: float | None = None  # set by prepare under a target
        self._momentum_checked = False
        self._masks: list[torch.Tensor] = []
        self._signs: list[torch.Tensor] = []

    @classmethod
    def prepare(
        cls,
        model: nn.Module,
        example: torch.Tensor,
        cfg: TrainConfig,
        *,
        total_steps: int,
        convert: bool = True,
        backend: str = "auto",
        prune: PruneConfig | None = None,
        latency: LatencyModel | None = None,
    ) -> Polariser:
        """Ready ``model`` in place for ``cfg.penalty`` and bind the penalty and controller.

        ``prune`` is the pruning to come (default ``PruneConfig()``): the budget never asks a
        layer to recede channels that its ``min_channels`` and ``max_layer_ratio`` would keep.
        ``latency`` is the measured latency model a ``train.target_cost: latency`` budget
        drives to (``pipeline.train.latency_budget``).
        """
        bounded = cfg.penalty.bounded
        if convert and bounded:
            convert_to_bounded_bn_(model, shift=cfg.bn_shift, init_logit=cfg.bn_init_logit)
        if convert:
            init_bn_(model, cfg, bounded=bounded)
        if bounded and not any(isinstance(m, BoundedBatchNorm2d) for m in model.modules()):
            raise ValueError(
                f"train.penalty.method={cfg.penalty.method} trains bounded BN, but the model has "
                "none; pass convert=True or convert with pipeline.train.convert first"
            )
        example = example.to(next(model.parameters()).device)
        graph = build_channel_graph(model, example)
        penalty = make_penalty(
            _budget_penalty(cfg), model, example=example, backend=backend, graph=graph
        )
        prune = prune or PruneConfig()
        floors = (prune.min_channels, prune.max_layer_ratio)
        macs = example if cfg.target_cost == "macs" else None  # exact MAC shares
        kept = latency_cost(graph, cfg, latency)  # None unless target_cost is latency
        tracker = ReceededShare(model, graph, None, floors, macs_example=macs, kept_cost=kept)
        target = None if kept is None else latency_share(kept, cfg.target_latency_ms)
        polariser = cls(model, penalty, tracker, cfg, total_steps, target=target)
        if polariser.target is not None:
            polariser.reachable = tracker.reachable()
            if kept is None:
                warn_unreachable(cfg, prune, polariser.reachable)
            else:
                warn_latency_unreachable(cfg, prune, kept, polariser.reachable)
        return polariser

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer param groups for the model (see ``bn_param_groups``)."""
        plain = self.penalty.params if self.penalty.config.method == "ista" else ()
        return bn_param_groups(self.model, lr, weight_decay, self.cfg.bn_lr_mult, plain)

    @property
    def strength(self) -> float:
        """The penalty strength in force (the controller's, or the configured one)."""
        return self.controller.strength if self.controller else self.penalty.config.strength

    def before_step(self) -> torch.Tensor:
        """After ``backward()``: update the controller and add the penalty gradient.

        With a target, only the channels of the groups the controller chose get the gradient.
        """
        self.step += 1
        if self.controller is None:
            return self.penalty.apply_(self.strength)
        self._masks = self._param_masks(self.controller.update_(self.tracker))
        saved = [_grad_of(p).clone() for p in self.penalty.params]
        if self.penalty.config.method == "l1":  # after_step truncates at zero against these
            self._signs = [torch.sign(p.detach()) for p in self.penalty.params]
        value = self.penalty.apply_(self.strength)
        with torch.no_grad():
            for p, before, mask in zip(self.penalty.params, saved, self._masks, strict=True):
                p.grad.copy_(torch.where(mask, p.grad, before))
        return value

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``optimizer.step()``: clamp (polarization) or shrink (ISTA) the BN scales.

        Under a budget, ISTA shrinks only the chosen channels, and L1 truncates its step at zero
        (a chosen gamma that changed sign becomes 0, Langford et al.'s truncated gradient): a
        controlled strength can make the subgradient step larger than the receded level, and
        plain subgradient L1 would then hop around zero above it for ever.
        """
        if not self.penalty.params:
            return
        method = self.penalty.config.method
        budget = self.controller is not None
        saved = (
            [p.detach().clone() for p in self.penalty.params] if budget and method == "ista" else []
        )
        if method == "ista" and not self._momentum_checked:
            _warn_ista_momentum(optimizer, self.penalty.params)
            self._momentum_checked = True
        self.penalty.after_step_(_lr_of(optimizer, self.penalty.params[0]), self.strength)
        with torch.no_grad():
            for p, before, mask in zip(self.penalty.params, saved, self._masks, strict=False):
                p.copy_(torch.where(mask, p, before))
            if budget and method == "l1":
                for p, sign, mask in zip(
                    self.penalty.params, self._signs, self._masks, strict=True
                ):
                    p.masked_fill_(mask & (torch.sign(p) != sign), 0.0)

    def _param_masks(self, chosen: torch.Tensor) -> list[torch.Tensor]:
        if self.cfg.penalise == "all":  # the paper's form: every channel, the controller's lambda
            return [torch.ones_like(p, dtype=torch.bool) for p in self.penalty.params]
        by_name = self.tracker.channel_masks(chosen)
        by_param = {id(m.weight): by_name[n] for n, m in self.tracker.modules}
        return [by_param[id(p)].to(p.device) for p in self.penalty.params]

    def progress(self) -> Progress:
        """Step, strength, wanted and measured receded share."""
        wanted = self.controller.scheduled() if self.controller else None
        return Progress(
            self.step,
            self.strength,
            wanted,
            self.tracker.share(self.cfg.receded_below),
            self.reachable,
        )

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "controller": self.controller.state_dict() if self.controller else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if self.controller is not None and state.get("controller"):
            self.controller.load_state_dict(state["controller"])


def warn_unreachable(cfg: TrainConfig, prune: PruneConfig, reachable: float) -> bool:
    """Log a warning, before any training, when the layer floors cap the receded share below
    ``cfg.target``; return whether they do."""
    if cfg.target is None or reachable >= cfg.target - 1e-9:
        return False
    logger.warning(
        "train.target %.3f cannot be reached: prune.min_channels %d and prune.max_layer_ratio "
        "%.2f let at most %.3f of the %s recede, and the strength would climb to its cap "
        "chasing the rest; raise prune.max_layer_ratio or lower train.target to <= %.3f",
        cfg.target,
        prune.min_channels,
        prune.max_layer_ratio,
        reachable,
        "MACs" if cfg.target_cost == "macs" else "prunable groups",
        reachable,
    )
    return True


BUDGET_TOLERANCE = 0.02  # a receded share this far under the target still counts as reached


def budget_reached(target: float | None, receded: float | None) -> bool | None:
    """Whether training reached ``target`` (None without a budget)."""
    if target is None or receded is None:
        return None
    return receded >= target - BUDGET_TOLERANCE


def budget_outcome(
    target: float | None, receded: float | None, reachable: float | None = None
) -> str:
    """One line: whether training reached its budget, and what to change when it did not.

    ``reachable`` (the most the layer floors let recede, known before training) picks the
    advice: a target above it needs looser floors or a lower target, as training longer cannot
    help; otherwise training ran out of time (more epochs) or the target is too ambitious.
    """
    reached = budget_reached(target, receded)
    if reached is None:
        return "no budget (train.target is null): fixed penalty strength"
    if reached:
        return f"budget reached: receded {receded:.3f} of target {target:.3f}"
    if reachable is not None and reachable < target - BUDGET_TOLERANCE:
        fix = (
            f"the layer floors let at most {reachable:.3f} recede: raise prune.max_layer_ratio "
            f"or lower prune.min_channels, or lower train.target to <= {reachable:.3f}"
        )
    else:
        fix = "train longer (train.epochs), raise prune.max_layer_ratio, or lower train.target"
    return f"budget MISSED: receded {receded:.3f}, target {target:.3f}; {fix}"


def _grad_of(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _warn_ista_momentum(optimizer: torch.optim.Optimizer, params: tuple) -> None:
    """ISTA needs plain SGD on gamma: momentum carries a shrunk gamma through zero again."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        if group.get("momentum", 0.0) and any(id(p) in ids for p in group["params"]):
            logger.warning(
                "ISTA's BN gammas are in an optimizer group with momentum %g: momentum carries "
                "a shrunk gamma through zero, so the exact zeros do not stay; build the "
                "optimizer from Polariser.param_groups(...), which gives them momentum 0",
                group["momentum"],
            )
            return


def _lr_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> float:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return float(group["lr"])
    raise ValueError(
        "the optimizer does not hold the BN scale parameters the penalty acts on; build it "
        "from Polariser.param_groups(...) or include the model's BN parameters"
    )
