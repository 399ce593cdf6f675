"""Polariser: frozen BN layers stay frozen, and ISTA's gammas keep momentum 0."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig, PenaltyConfig, TrainConfig
from pipeline.layers.bn import bn_modules
from pipeline.models.zoo import build_model
from pipeline.train.loop import make_optimizer
from pipeline.train.polarise import Polariser


def _train(method: str, *, frozen: bool, steps: int = 20, target: float | None = 0.5):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="vgg", width=0.25), num_classes=10, in_channels=1)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    cfg = TrainConfig(target=target, penalty=PenaltyConfig(method=method, strength=1.0))
    pol = Polariser.prepare(model, x[:2], cfg, total_steps=steps)
    stem_name, stem = next(iter(bn_modules(model).items()))
    if frozen:
        stem.weight.requires_grad_(False)
        pol = Polariser.prepare(model, x[:2], cfg, total_steps=steps, convert=False)
    before = stem.weight.detach().clone()
    opt = torch.optim.SGD(pol.param_groups(0.5, 5e-4), lr=0.5, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pol.before_step()
        opt.step()
        pol.after_step(opt)
    return before, stem.weight.detach(), pol, stem_name


@pytest.mark.parametrize("method", ["receding", "l1", "polarization", "ista"])
def test_a_frozen_bn_is_neither_penalised_nor_projected(method):
    before, after, pol, stem = _train(method, frozen=True)
    assert torch.equal(before, after), f"{method} moved the frozen {stem}"
    masks = pol.tracker.channel_masks(pol.tracker.select(pol.tracker.group_importance(), 1.0))
    assert not bool(masks[stem].any())  # never in the penalised set either


@pytest.mark.parametrize("method", ["receding", "ista"])
def test_the_same_bn_moves_when_not_frozen(method):
    """The check above can fail: unfrozen, the stem's scales do change under the penalty."""
    before, after, _, _ = _train(method, frozen=False)
    assert not torch.equal(before, after)


def test_make_optimizer_gives_ista_gammas_momentum_0_without_a_polariser():
    model = build_model(ModelConfig(name="vgg", width=0.25), num_classes=10, in_channels=1)
    cfg = TrainConfig(penalty=PenaltyConfig(method="ista"))
    opt = make_optimizer(model, cfg, 0.1)
    gammas = {id(m.weight) for m in bn_modules(model).values()}
    for group in opt.param_groups:
        if any(id(p) in gammas for p in group["params"]):
            assert group["momentum"] == 0.0


def test_a_user_optimizer_with_momentum_on_ista_gammas_is_warned(caplog):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="vgg", width=0.25), num_classes=10, in_channels=1)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    pol = Polariser.prepare(
        model, x[:2], TrainConfig(penalty=PenaltyConfig(method="ista")), total_steps=2
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # not from param_groups
    with caplog.at_level(logging.WARNING, logger="pipeline.train.polarise"):
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pol.before_step()
            opt.step()
            pol.after_step(opt)
    assert caplog.text.count("momentum 0.9") == 1  # once, not every step
    caplog.clear()
    pol2 = Polariser.prepare(
        model,
        x[:2],
        TrainConfig(penalty=PenaltyConfig(method="ista")),
        total_steps=1,
        convert=False,
    )
    good = torch.optim.SGD(pol2.param_groups(0.1, 0.0), lr=0.1, momentum=0.9)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.polarise"):
        pol2.before_step()
        good.step()
        pol2.after_step(good)
    assert "momentum" not in caplog.text
