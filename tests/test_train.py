import torch

from pipeline.bn import convert_to_bounded_bn_
from pipeline.bounded_bn import BoundedBatchNorm2d
from pipeline.config import PenaltyConfig, TrainConfig
from pipeline.penalties import make_penalty
from pipeline.train import make_optimizer


def test_bn_parameters_get_lr_multiplier_and_no_decay(tiny_net):
    cfg = TrainConfig(lr=0.1, bn_lr_mult=10.0, weight_decay=5e-4)
    opt = make_optimizer(tiny_net, cfg, 0.1)
    rest, bn = opt.param_groups
    assert bn["lr"] == 1.0 and bn["weight_decay"] == 0.0
    assert rest["lr"] == 0.1 and rest["weight_decay"] == 5e-4
    bn_ids = {id(p) for p in bn["params"]}
    assert all(
        id(m.weight) in bn_ids for m in tiny_net.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )


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
