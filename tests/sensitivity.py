"""Make untrained verification models respond to their inputs, and measure that they do.

An untrained torchvision mobile net with made-up BN statistics gives nearly the same output for
any input: halving half the stem filters of mobilenet_v2 moved its output by 3e-8 of its scale,
so an exactness test at 1e-4 on it passes whatever the transform does. ``calibrate_bn_`` gives
every BN the running statistics of its actual input on random data, so each BN normalises what
it sees and signals survive to the output. ``channel_sensitivity`` measures, for one channel in
the first, middle and last third of the network, how far a 1% change of that channel moves the
output, relative to the output's scale (the median over a few channels). A test whose tolerance is above that proves nothing.
"""

from __future__ import annotations

import torch
from torch import nn

PERTURBATION = 0.01  # one channel scaled by 1.01
CHANNELS = 5  # channels tried per BN; the median is reported
_BN = nn.modules.batchnorm._BatchNorm


def randomise_affine_(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random BN scale (both signs, |scale| in [0.5, 1.5)) and shift (std 0.2)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN) and m.affine:
                c = m.num_features
                sign = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0)
                m.weight.copy_(sign * (torch.rand(c, generator=gen) + 0.5))
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model


@torch.no_grad()
def calibrate_bn_(model: nn.Module, shape: tuple[int, ...], gen: torch.Generator) -> nn.Module:
    """Set every BN's running statistics to those of its input on one random batch of ``shape``.

    Only the BNs run in training mode (dropout and auxiliary heads stay off); ``momentum=None``
    makes the running statistics exactly the batch's. The model is left in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        model(torch.randn(*shape, generator=gen))
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return model


def _bns_in_order(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """BN layers in the order a forward pass on ``x`` runs them."""
    order: list[tuple[str, nn.Module]] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: order.append((n, m)))
        for n, m in model.named_modules()
        if isinstance(m, _BN)
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


def _scale_channel(output: torch.Tensor, c: int) -> torch.Tensor:
    output = output.clone()
    output[:, c] *= 1.0 + PERTURBATION
    return output


def _effect(model: nn.Module, bn: nn.Module, c: int, x: torch.Tensor, ref: torch.Tensor) -> float:
    hook = bn.register_forward_hook(lambda m, i, o: _scale_channel(o, c))
    try:
        y = model(x)
    finally:
        hook.remove()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@torch.no_grad()
def channel_sensitivity(
    model: nn.Module, x: torch.Tensor, skip: frozenset[tuple[str, int]] = frozenset()
) -> tuple[float, float, float]:
    """Output change from scaling one BN channel by 1 + PERTURBATION at 1/6, 1/2, 5/6 of the net.

    Each entry is the median of ``max |y' - y| / max |y|`` over the live channels among
    ``2 * CHANNELS`` channels of that BN spread evenly over those not in ``skip`` (pass the
    removed channels, which cannot matter). The median, not the best channel: a typical channel
    must be visible. *Live*: changing it changes the output on ``x`` at all. A channel that an
    activation switches off on ``x``, or that a later slice or gate drops, is invisible to any
    check on ``x`` and says nothing about the check (in untrained timm nets up to half of a
    BN's channels were dead on ``x``, which made the plain median 0). No live channel: 0.
    """
    bns = _bns_in_order(model, x)
    ref = model(x)
    out = []
    for name, bn in (bns[len(bns) // 6], bns[len(bns) // 2], bns[5 * len(bns) // 6]):
        kept = [c for c in range(bn.num_features) if (name, c) not in skip]
        picks = kept[:: max(1, len(kept) // (2 * CHANNELS))][: 2 * CHANNELS]
        effects = [e for e in (_effect(model, bn, c, x, ref) for c in picks) if e > 0]
        out.append(float(torch.tensor(effects).median()) if effects else 0.0)
    return tuple(out)
