import torch

from pipeline.config import TrainConfig
from pipeline.train.loop import make_optimizer


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
