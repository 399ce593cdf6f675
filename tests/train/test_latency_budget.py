"""A latency budget in training: the controller drives a synthetic latency table to its target
(no timing), warns before training when the floors cannot reach it, and refuses what cannot
be a budget."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, PruneConfig, TrainConfig
from pipeline.models.zoo import build_model
from pipeline.train.polarise import Polariser
from tests.latency_fakes import synthetic_latency
from tests.train.test_budget import _Plant


def _vgg_and_latency(width: float = 0.25):
    model = build_model(ModelConfig(name="vgg", width=width), num_classes=10, in_channels=3)
    x = torch.randn(2, 3, 16, 16)
    return model, x, synthetic_latency(model, x)


def _latency_cfg(target_ms: float) -> TrainConfig:
    return TrainConfig(target_cost="latency", target_latency_ms=target_ms, target_ramp=0.6)


@pytest.mark.parametrize("fraction", [0.6, 0.35])
def test_the_controller_drives_the_predicted_latency_to_the_target(fraction):
    model, x, latency = _vgg_and_latency()
    target = fraction * latency.dense_ms
    prune = PruneConfig(min_channels=1, max_layer_ratio=0.95)
    pol = Polariser.prepare(
        model, x, _latency_cfg(target), total_steps=400, prune=prune, latency=latency
    )
    assert pol.target == pytest.approx(1 - target / latency.dense_ms)  # the share to drive
    plant = _Plant(model)
    for _ in range(400):
        chosen = pol.controller.update_(pol.tracker)
        names = pol.tracker.channel_masks(chosen)
        plant.step_([names[n] for n, _ in pol.tracker.modules], pol.controller.strength)
    receded = pol.tracker.group_importance() < 0.01
    predicted = pol.tracker.macs.latency_ms((~receded).double())  # smooth, as it was driven
    assert predicted == pytest.approx(target, rel=0.05)
    for p, useful in zip(plant.params, plant.useful, strict=True):
        assert bool((torch.sigmoid(p)[useful] > 0.3).all())  # what matters stays intact


def test_an_unreachable_latency_warns_before_training_with_both_numbers(caplog):
    model, x, latency = _vgg_and_latency()
    prune = PruneConfig(min_channels=4, max_layer_ratio=0.5)
    target = 0.05 * latency.dense_ms
    with caplog.at_level(logging.WARNING, logger="pipeline.train.latency_budget"):
        pol = Polariser.prepare(
            model, x, _latency_cfg(target), total_steps=10, prune=prune, latency=latency
        )
    floor = latency.dense_ms * (1 - pol.reachable)  # smooth dense equals exact dense
    assert floor > target
    text = caplog.text
    assert "train.target_latency_ms" in text and f"{target:.4g}" in text and f"{floor:.4g}" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.train.latency_budget"):
        Polariser.prepare(
            model, x, _latency_cfg(2 * floor), total_steps=10, prune=prune, latency=latency
        )
    assert "cannot be reached" not in caplog.text  # a reachable target says nothing


def test_a_target_share_beside_a_latency_budget_is_not_used_and_says_so(caplog):
    """The demo's config states train.target 0.5: --set train.target_cost=latency with a
    latency must still run, driving to the latency, and say that the share is not used."""
    model, x, latency = _vgg_and_latency()
    cfg = TrainConfig(target=0.5, target_cost="latency", target_latency_ms=0.4 * latency.dense_ms)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.latency_budget"):
        pol = Polariser.prepare(model, x, cfg, total_steps=10, latency=latency)
    assert pol.target == pytest.approx(0.6) and pol.controller.target == pytest.approx(0.6)
    assert "train.target 0.5 is not used" in caplog.text


def test_a_latency_budget_needs_its_model_and_a_target_below_dense():
    model, x, latency = _vgg_and_latency()
    with pytest.raises(ValueError, match="needs the latency model"):
        Polariser.prepare(model, x, _latency_cfg(0.1), total_steps=10)
    with pytest.raises(ValueError, match="not below the dense"):
        Polariser.prepare(
            model, x, _latency_cfg(2 * latency.dense_ms), total_steps=10, latency=latency
        )


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ({"target_cost": "latency", "target_latency_ms": 0.0}, "train.target_latency_ms must be"),
        ({"target_cost": "latency", "target_latency_ms": -1.0}, "train.target_latency_ms must be"),
        ({"target_cost": "latency"}, "needs train.target_latency_ms"),
        ({"target_latency_ms": 1.0}, "set train.target_cost=latency"),
    ],
)
def test_latency_budget_config_is_checked(keys, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig(**keys)
