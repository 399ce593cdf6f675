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
        pol.after_step(opt) # polarization clamp / ISTA shrink; gated shifts follow scales
    pol.finish_()           # after the last step: receded gated channels' shifts exactly 0
    pol.progress()          # step, strength, wanted and receded share

``prepare`` readies the model for the method: receding and ``none`` train bounded BN (a fresh
``BoundedBatchNorm2d`` per ``nn.BatchNorm2d``, logits from ``train.bn_init``: the constant
``bn_init_logit`` or N(0, 1) as in the reference code); L1, polarization and ISTA train plain BN
with gamma initialised to 0.5 (Network Slimming, polarization and the reference code all do).
Pass ``convert=False`` for a model that is already prepared or pretrained.

A *gated* channel (its constant feeds a squeeze-excite gate or another reader that cannot take
it as a bias) has its shift bounded by its scale wherever the penalty acts, and ``finish_``
zeroes the shifts of the receded ones, so the prune removes them exactly
(``pipeline.train.gated_shift``).
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
from pipeline.train.budget_outcome import (  # re-exported: callers import them from here
    BUDGET_TOLERANCE,
    budget_outcome,
    budget_reached,
    warn_unreachable,
)
from pipeline.train.gated_shift import GatedShifts
from pipeline.train.latency_budget import latency_cost, warn_latency_unreachable
from pipeline.train.penalties import Penalty, make_penalty

__all__ = [
    "BUDGET_TOLERANCE",
    "Polariser",
    "Progress",
    "bn_param_groups",
    "budget_outcome",
    "budget_reached",
    "init_bn_",
    "warn_unreachable",
]

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
    """Initialise BN scales as ``cfg.bn_init`` says (see module docstring); frozen ones stay."""
    gen = torch.Generator().manual_seed(cfg.seed)
    for m in bn_modules(model).values():
        if not m.weight.requires_grad:  # frozen: its values are the user's, left as they are
            continue
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
    """A penalty bound to one model, with an optional budget controller; see module docstring.

    A BN whose scale is frozen (``requires_grad=False``), before ``prepare`` or at any step
    after it, is never penalised, clamped or shrunk, never counted toward the budget and never
    replaced by a trainable one; the module logger warns once per newly frozen set.
    """

    def __init__(
        self,
        model: nn.Module,
        penalty: Penalty,
        tracker: ReceededShare,
        cfg: TrainConfig,
        total_steps: int,
        shifts: GatedShifts | None = None,
        target: float | None = None,
    ) -> None:
        self.model, self.penalty, self.tracker, self.cfg = model, penalty, tracker, cfg
        self.shifts = shifts if shifts is not None else GatedShifts({})
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
        self.prune: PruneConfig | None = None  # the floors prepare trained against
        self._momentum_checked = False
        self._warned_frozen: set[str] = set()
        self._masks: dict[int, torch.Tensor] = {}  # id(scale) -> channels the penalty acts on
        self._acting: dict[str, torch.Tensor] | None = None  # BN name -> the same, for shifts
        self._signs: dict[int, torch.Tensor] = {}

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
        A frozen BN is neither converted nor re-initialised.
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
                "none (a frozen BN is never converted); pass convert=True, convert with "
                "pipeline.train.convert first, or unfreeze a BN"
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
        shifts = GatedShifts.of(model, graph) if penalty.config.method != "none" else None
        polariser = cls(model, penalty, tracker, cfg, total_steps, shifts, target=target)
        polariser.prune = prune
        polariser._warn_frozen()
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
        self._warn_frozen()
        if self.controller is None:
            return self.penalty.apply_(self.strength)
        self._set_masks(self.controller.update_(self.tracker))
        live = self.penalty.live()
        saved = [_grad_of(p).clone() for p in live]
        if self.penalty.config.method == "l1":  # after_step truncates at zero against these
            self._signs = {id(p): torch.sign(p.detach()) for p in live}
        value = self.penalty.apply_(self.strength)
        with torch.no_grad():
            for p, before in zip(live, saved, strict=True):
                p.grad.copy_(torch.where(self._chosen(p), p.grad, before))
        return value

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``optimizer.step()``: clamp (polarization) or shrink (ISTA) the BN scales, and
        bound the shifts of gated channels by their scales (``pipeline.train.gated_shift``).

        Under a budget, ISTA shrinks only the chosen channels, and L1 truncates its step at zero
        (a chosen gamma that changed sign becomes 0, Langford et al.'s truncated gradient): a
        controlled strength can make the subgradient step larger than the receded level, and
        plain subgradient L1 would then hop around zero above it for ever.
        """
        live = self.penalty.live()
        if not live:
            return
        method = self.penalty.config.method
        budget = self.controller is not None
        saved = [p.detach().clone() for p in live] if budget and method == "ista" else []
        if method == "ista" and not self._momentum_checked:
            _warn_ista_momentum(optimizer, live)
            self._momentum_checked = True
        self.penalty.after_step_(_lr_of(optimizer, live[0]), self.strength)
        with torch.no_grad():
            for p, before in zip(live, saved, strict=False):
                p.copy_(torch.where(self._chosen(p), p, before))
            if budget and method == "l1":
                for p in live:
                    sign = self._signs.get(id(p), torch.sign(p))
                    p.masked_fill_(self._chosen(p) & (torch.sign(p) != sign), 0.0)
        if not budget:  # the penalty acts on every channel, so does the shifts' bound
            self.shifts.project_(None)
        elif self._acting is not None:  # under a budget: on the chosen channels only
            self.shifts.project_(self._acting)

    def finish_(self) -> tuple[int, int]:
        """After the last step: set exactly 0 the shifts of receded gated channels, so that the
        prune removes them exactly (see ``GatedShifts.zero_receded_``).

        Returns:
            (shifts zeroed, receded gated channels whose shift stays, which the prune keeps
            unless ``prune.allow_approximate``).
        """
        imp = self.tracker.group_importance()
        receded = (imp < self.cfg.receded_below) & ~self.tracker.frozen()
        return self.shifts.zero_receded_(self.tracker.channel_masks(receded))

    def _chosen(self, p: torch.Tensor) -> torch.Tensor:
        """The channels of scale ``p`` the penalty acts on this step (none before a first step)."""
        return self._masks.get(id(p), torch.zeros_like(p, dtype=torch.bool))

    def _set_masks(self, chosen: torch.Tensor) -> None:
        if self.cfg.penalise == "all":  # the paper's form: every channel, the controller's lambda
            chosen = torch.ones_like(chosen)
        by_name = self.tracker.channel_masks(chosen)
        by_param = {id(m.weight): by_name[n] for n, m in self.tracker.modules}
        every = self.cfg.penalise == "all"
        self._masks = {
            id(p): torch.ones_like(p, dtype=torch.bool) if every else by_param[id(p)].to(p.device)
            for p in self.penalty.params
        }
        self._acting = by_name

    def _warn_frozen(self) -> None:
        """Warn once for every set of BNs found frozen that was not warned about before."""
        frozen = self.tracker.frozen_bns()
        new = [n for n in frozen if n not in self._warned_frozen]
        if not new:
            return
        self._warned_frozen.update(new)
        logger.warning(
            "%d BN layer(s) have a frozen scale (requires_grad=False): %s; recede never "
            "penalises, converts or re-initialises them and does not count them toward "
            "train.target (unfreeze them to let them recede)",
            len(new),
            ", ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else ""),
        )

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
