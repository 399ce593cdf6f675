"""Shifts that follow their scale to zero where a receded channel's constant cannot be absorbed.

A channel whose BN scale is zero still emits ``act(beta)``. Where every reader sees that as a
constant, pruning adds it back exactly (``pipeline.prune.absorb``). Where a reader does not (a
squeeze-excite gate multiplies it by an input-dependent gate, so the channel graph marks its
group *prunable* but not *absorbable*), only ``beta = 0`` makes removing the channel exact; a
trained ``beta`` is whatever the loss found useful, and zeroing it at the cut took MobileNetV3's
accuracy from 97.2% to chance (issue 33).

So polarised training leaves nothing to absorb there. Wherever the penalty acts on such a
*gated* channel (the controller's chosen groups under a budget, every channel without one), the
shift is projected after each optimizer step onto ``|beta| <= SHIFT_PER_SCALE * scale``, with
scale the channel's importance (``sigmoid(w)`` or ``|gamma|``): as the scale recedes the shift
follows it down, and the rest of training adapts to the smaller constant. ISTA's exact zero
scales then have exact zero shifts. :meth:`GatedShifts.zero_receded_`, at the end of
training, sets the shift of every gated channel of a receded group exactly to 0 where the
projection holds (``|beta| <= scale``, below ``train.receded_below``: the same order as the
scale the prune zeroes anyway), so the prune removes it exactly. A receded gated channel whose
shift the projection never bounded is left alone and counted: the prune keeps it unless
``prune.allow_approximate`` is set.

Decision: a projection, not a penalty on beta. It needs no strength of its own (the scale's
controller already sets the pace), works the same for every method, and makes ISTA's zeros
exact zeros of the whole channel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.graph.channel_graph import ChannelGraph
from pipeline.layers.bn import bn_modules, channel_importance

logger = logging.getLogger(__name__)

SHIFT_PER_SCALE = 1.0
"""The projection's bound: ``|beta| <= SHIFT_PER_SCALE * scale`` on a penalised gated channel.
One: the constant is at most one standard deviation of the scaled channel, so zeroing both
costs at most twice what zeroing the scale alone costs."""


def gated_channels(model: nn.Module, graph: ChannelGraph) -> dict[str, torch.Tensor]:
    """BN name -> bool mask of its channels in a gated group (prunable, not absorbable), for
    every BN with a shift; BNs without a gated channel are left out."""
    modules = bn_modules(model)
    masks: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        if g.weight_gated or not g.prunable or g.absorbable:
            continue
        for name, c in g.bn_channels:
            bn = modules.get(name)
            if bn is None or getattr(bn, "bias", None) is None:
                continue
            masks.setdefault(name, torch.zeros(bn.bias.numel(), dtype=torch.bool))[c] = True
    return masks


@dataclass(frozen=True)
class GatedShifts:
    """The gated channels of one model (see module docstring): BN name -> the module and the
    bool mask of its gated channels."""

    masks: dict[str, tuple[nn.Module, torch.Tensor]]

    @classmethod
    def of(cls, model: nn.Module, graph: ChannelGraph) -> GatedShifts:
        modules = bn_modules(model)
        return cls({n: (modules[n], m) for n, m in gated_channels(model, graph).items()})

    @property
    def channels(self) -> int:
        """Gated channels with a shift."""
        return sum(int(m.sum()) for _, m in self.masks.values())

    def _live(self) -> list[tuple[str, nn.Module, torch.Tensor]]:
        """(name, BN, mask) for BNs whose scale and shift may move: a frozen BN is left alone."""
        return [
            (n, bn, mask)
            for n, (bn, mask) in self.masks.items()
            if bn.weight.requires_grad and bn.bias.requires_grad
        ]

    @torch.no_grad()
    def project_(self, where: dict[str, torch.Tensor] | None = None) -> None:
        """``|beta| <= SHIFT_PER_SCALE * scale`` on the gated channels in ``where`` (BN name ->
        bool mask of the channels the penalty acts on; None: every gated channel)."""
        for name, bn, mask in self._live():
            if where is not None:
                mask = mask & where[name].cpu()
            if not bool(mask.any()):
                continue
            bound = SHIFT_PER_SCALE * channel_importance(bn).to(bn.bias.dtype)
            projected = torch.maximum(torch.minimum(bn.bias, bound), -bound)
            bn.bias.copy_(torch.where(mask.to(bn.bias.device), projected, bn.bias))

    @torch.no_grad()
    def zero_receded_(self, receded: dict[str, torch.Tensor]) -> tuple[int, int]:
        """Set exactly 0 the shift of gated channels in ``receded`` (BN name -> bool mask of the
        channels of receded groups) whose shift the projection bounds by their scale.

        Returns:
            (channels zeroed, receded gated channels left with a larger shift).
        """
        zeroed = left = 0
        largest = 0.0
        for name, bn, mask in self._live():
            mask = (mask & receded[name].cpu()).to(bn.bias.device)
            bound = SHIFT_PER_SCALE * channel_importance(bn).to(bn.bias.dtype)
            small = mask & (bn.bias.abs() <= bound)
            if bool(small.any()):
                largest = max(largest, float(bn.bias[small].abs().max()))
            zeroed += int((small & (bn.bias != 0)).sum())
            left += int((mask & ~small).sum())
            bn.bias.masked_fill_(small, 0.0)
        if zeroed or left:
            logger.info(
                "gated channels (their constant feeds a gate): zeroed the shift of %d receded "
                "channels (largest |shift| %.2e, bounded by their scale); %d receded channels "
                "keep a larger shift, and the prune keeps their groups unless "
                "prune.allow_approximate=true",
                zeroed,
                largest,
                left,
            )
        return zeroed, left
