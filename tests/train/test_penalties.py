"""The sparsity penalties on BN scales (``pipeline.train.penalties``): which channels they push, and
the projections they apply after a step."""

import torch

from pipeline.config import PenaltyConfig
from pipeline.layers.bn import convert_to_bounded_bn_
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.train.penalties import make_penalty


def test_receding_penalty_pushes_weak_channels_hardest(tiny_net):
    assert convert_to_bounded_bn_(tiny_net) == 5
    bns = [m for m in tiny_net.modules() if isinstance(m, BoundedBatchNorm2d)]
    with torch.no_grad():
        bns[0].weight.copy_(torch.linspace(-6, 4, bns[0].num_features))
    penalty = make_penalty(
        PenaltyConfig(method="receding", strength=1.0, bias=3.0), tiny_net, backend="torch"
    )
    value = penalty.apply_()
    grad = bns[0].weight.grad
    assert value > 0
    assert (grad > 0).all()  # every logit is pushed down ...
    assert grad[0] > 10 * grad[-1]  # ... weak ones far harder than strong ones


def test_polarization_clamps_gamma(tiny_net):
    penalty = make_penalty(
        PenaltyConfig(method="polarization", strength=1e-3), tiny_net, backend="torch"
    )
    with torch.no_grad():
        penalty.params[0].fill_(2.0)
    penalty.after_step_(0.1)
    assert penalty.params[0].max() == 1.0
