"""The latency cut: the cheapest importance cut the latency model predicts under the target, and
the loop that measures it and moves up the ranking while the measurement is over (fake clock)."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.config import ModelConfig, PruneConfig
from pipeline.graph.latency_cost import layer_widths
from pipeline.layers.bn import bn_modules
from pipeline.models.zoo import build_model
from pipeline.prune.latency_cut import (
    MAX_REMEASURES,
    Cutter,
    LatencyCut,
    fit_to_latency,
)
from pipeline.prune.plan import ROUND_MIN_BLOCKS
from pipeline.prune.stage import prune_model
from tests.latency_fakes import synthetic_latency


def _trained_vgg(seed: int = 0):
    """A VGG whose BN scales are spread over decades, as a polarised model's are."""
    model = build_model(ModelConfig(name="vgg", width=0.25), num_classes=10, in_channels=3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in bn_modules(model).values():
            bn.weight.copy_(10 ** (-3 * torch.rand(bn.weight.shape, generator=gen)))
    x = torch.randn(2, 3, 16, 16)
    return model.eval(), x, synthetic_latency(model, x)


@pytest.mark.parametrize("fraction", [0.7, 0.45, 0.3])
def test_the_cut_is_the_cheapest_that_fits_the_prediction(fraction):
    model, x, latency = _trained_vgg()
    cutter = Cutter(model, x, PruneConfig(min_channels=1, max_layer_ratio=0.95), latency)
    aim = fraction * latency.dense_ms
    cut = cutter.best(aim)
    assert cut.predicted_ms <= aim
    before = cutter.at(cut.index - 1, cut.round_to)
    assert before.predicted_ms > aim  # one step less would not fit: nothing cut needlessly
    pruned = prune_model(model, x, cut.prune).model  # the settings reproduce the cut exactly
    assert latency.predict_ms(layer_widths(pruned)) == pytest.approx(cut.predicted_ms)


def test_widths_round_up_to_the_block_when_that_keeps_more():
    model, x, latency = _trained_vgg()
    prune = PruneConfig(min_channels=1, max_layer_ratio=0.95, round_to=1)  # not the default 8
    cutter = Cutter(model, x, prune, latency)
    assert cutter.roundings == [1, 16]
    aim = 0.5 * latency.dense_ms
    raw, aligned = cutter.fitting(aim, 1), cutter.fitting(aim, 16)
    assert len(aligned.dropped) < len(raw.dropped)  # unaligned widths run the slow path
    assert cutter.best(aim) == aligned
    widths = layer_widths(prune_model(model, x, aligned.prune).model)
    dense = layer_widths(model)
    rounded = [n for n, (cin, _) in dense.items() if cin >= ROUND_MIN_BLOCKS * 16]  # plan.py
    assert rounded and all(widths[n][0] % 16 == 0 for n in rounded)


def _cuts(n: int = 50, step: float = 0.15):
    """Cuts 0..n-1 whose predictions fall from 10 ms by ``step`` ms a step."""
    cuts = [LatencyCut(i, PruneConfig(), frozenset(range(i)), 10.0 - step * i) for i in range(n)]

    def cut_at(aim: float, start: int) -> LatencyCut:
        return next((c for c in cuts[start:] if c.predicted_ms <= aim), cuts[-1])

    return cuts, cut_at


def test_a_cut_measured_within_5_percent_is_kept():
    _, cut_at = _cuts()
    measured = []
    fit = fit_to_latency(cut_at, lambda c: measured.append(c) or c.predicted_ms * 1.04, 7.0)
    assert fit.reached and fit.remeasures == 0 and len(measured) == 1
    assert fit.cut.predicted_ms <= 7.0


def test_a_cut_measured_over_moves_up_the_ranking_until_it_fits():
    _, cut_at = _cuts()
    # the backend runs 20% slower than predicted, then a load change: 12%
    slowdown = iter([1.2, 1.12, 1.12, 1.12])
    fit = fit_to_latency(cut_at, lambda c: c.predicted_ms * next(slowdown), 7.0)
    assert fit.reached and fit.measured_ms <= 7.0 * 1.05
    assert fit.remeasures >= 1
    indices = [p for p, _ in fit.history]
    assert indices == sorted(indices, reverse=True)  # every move goes up (predictions fall)


def test_the_moves_are_bounded():
    cuts, cut_at = _cuts(200, 0.04)
    calls = []  # 5 ms the prediction never sees: every cut measures over the target
    fit = fit_to_latency(cut_at, lambda c: calls.append(c) or c.predicted_ms + 5.0, 7.0)
    assert not fit.reached
    assert len(calls) == MAX_REMEASURES + 1 and fit.cut != cuts[-1]  # the bound stopped it
    assert fit.remeasures == MAX_REMEASURES


def test_the_loop_stops_where_nothing_more_can_go():
    cuts, cut_at = _cuts(3)
    fit = fit_to_latency(cut_at, lambda c: 50.0, 7.0)
    assert not fit.reached and fit.cut == cuts[-1] and fit.remeasures < MAX_REMEASURES


def test_random_plants_always_end_within_the_tolerance_or_at_the_bound():
    """Any systematic error of the prediction up to 30% and any noise up to 3%: the loop either
    reaches the target within 5% or has used every move, and never moves down."""
    rng = random.Random(0)
    for _ in range(200):
        bias = rng.uniform(0.9, 1.3)
        _, cut_at = _cuts(60)
        fit = fit_to_latency(
            cut_at, lambda c, b=bias: c.predicted_ms * b * rng.uniform(0.97, 1.03), 5.0
        )
        assert fit.reached or fit.remeasures == MAX_REMEASURES or fit.cut.index == 59
        predicted = [p for p, _ in fit.history]
        assert all(b < a for a, b in zip(predicted, predicted[1:], strict=False))
