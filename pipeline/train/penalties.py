"""Sparsity penalties on BN scales, all behind one interface so training never branches.

A penalty is applied after ``loss.backward()``: its gradient is added straight into ``.grad``
(like decoupled weight decay) by a fused kernel from ``kernels/`` and no autograd graph is built.
``after_step_`` runs after ``optimizer.step()`` for methods that constrain the weights
(polarization clamps gamma to [0, 1]). Both take the current ``strength`` when a controller
(``pipeline.train.budget``) drives it; ``None`` means the configured ``strength``.

- ``receding``: strength * sum s(1 - log s), s = sigmoid(w + bias), on bounded-BN logits w.
- ``l1``: strength * sum |gamma| on plain BN (Network Slimming).
- ``polarization``: strength * (t * sum|gamma| - sum|gamma - mean gamma|) on plain BN.
- ``ista``: no gradient; ``after_step_`` applies the proximal shrink
  gamma <- sign(gamma) max(|gamma| - lr rho lambda_l, 0) with per-layer cost weights lambda_l
  (``pipeline.graph.costs.layer_costs``), producing exact zeros.
- ``none``: nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import PenaltyConfig
from pipeline.graph.channel_graph import ChannelGraph
from pipeline.layers.bn import is_bn
from pipeline.layers.bounded_bn import BoundedBatchNorm2d


@dataclass(frozen=True)
class Penalty:
    """A configured penalty bound to the BN scale parameters of one model."""

    config: PenaltyConfig
    params: tuple[nn.Parameter, ...]
    backend: str = "auto"
    lambdas: tuple[float, ...] = ()  # ISTA per-layer cost weights, aligned with params

    def live(self) -> tuple[nn.Parameter, ...]:
        """The bound scales not frozen now: a scale frozen (``requires_grad=False``) after the
        penalty was made is skipped from then on, never penalised, clamped or shrunk."""
        return tuple(p for p in self.params if p.requires_grad)

    def apply_(self, strength: float | None = None) -> torch.Tensor:
        """Add the penalty gradient into ``.grad`` of the live scales; return the penalty value
        (detached)."""
        cfg = self.config
        strength = cfg.strength if strength is None else strength
        params = self.live()
        if cfg.method in ("none", "ista") or strength == 0 or not params:
            return torch.zeros(())
        if cfg.method == "receding":
            from kernels.receding_penalty import receding_penalty_

            return receding_penalty_(params, strength=strength, bias=cfg.bias, backend=self.backend)
        if cfg.method == "l1":
            from kernels.l1_penalty import l1_penalty_

            return l1_penalty_(params, strength=strength, backend=self.backend)
        from kernels.polarization_penalty import polarization_penalty_

        return polarization_penalty_(params, strength=strength, t=cfg.t, backend=self.backend)

    @torch.no_grad()
    def after_step_(self, lr: float, strength: float | None = None) -> None:
        """Project or shrink weights after the optimizer step (``lr``: the BN scales' rate)."""
        live = [i for i, p in enumerate(self.params) if p.requires_grad]
        if self.config.method == "polarization":
            for i in live:
                self.params[i].clamp_(0.0, 1.0)
        elif self.config.method == "ista" and live:
            from kernels.ista_shrink import ista_shrink_

            ista_shrink_(
                [self.params[i] for i in live],
                lrs=[lr] * len(live),
                lambdas=[self.lambdas[i] for i in live],
                rho=self.config.strength if strength is None else strength,
                backend=self.backend,
            )


def scale_parameters(model: nn.Module, *, bounded: bool) -> tuple[nn.Parameter, ...]:
    """The per-channel scale parameters of every bounded (or plain affine) BN in ``model``.

    A scale the user froze (``requires_grad=False``) is left out: no penalty gradient is
    written into it, and no clamp or shrink touches it.
    """
    if bounded:
        scales = (m.weight for m in model.modules() if isinstance(m, BoundedBatchNorm2d))
    else:
        scales = (
            m.weight
            for m in model.modules()
            if is_bn(m) and not isinstance(m, BoundedBatchNorm2d) and m.weight is not None
        )
    return tuple(w for w in scales if w.requires_grad)


def make_penalty(
    config: PenaltyConfig,
    model: nn.Module,
    *,
    example: torch.Tensor | None = None,
    backend: str = "auto",
    graph: ChannelGraph | None = None,
) -> Penalty:
    """Bind ``config`` to ``model``'s BN scales (ISTA also needs an ``example`` input for its costs)."""
    if config.method != "ista":
        return Penalty(config, scale_parameters(model, bounded=config.bounded), backend)
    if example is None:
        raise ValueError("the ista penalty needs an example input to weigh layers by cost")
    from pipeline.graph.channel_graph import build_channel_graph
    from pipeline.graph.costs import layer_costs

    graph = graph if graph is not None else build_channel_graph(model, example)
    costs = layer_costs(model, graph, example, config.cost)
    modules = dict(model.named_modules())
    trained = [n for n in costs if modules[n].weight.requires_grad]  # frozen: left alone
    return Penalty(
        config, tuple(modules[n].weight for n in trained), backend, tuple(costs[n] for n in trained)
    )
