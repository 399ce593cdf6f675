"""Polarised training leaves nothing to absorb behind a gate: the shift of a penalised gated
channel stays within its scale, the receded ones end exactly at 0, and the prune then removes
them exactly (issue 33 item 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import PenaltyConfig, PruneConfig, TrainConfig
from pipeline.layers.bn import channel_importance
from pipeline.prune.stage import prune_model
from pipeline.train.gated_shift import SHIFT_PER_SCALE
from pipeline.train.polarise import Polariser
from tests.prune.test_remove_gated import EXACT, GatedNet, _worst

GATED = ("expand_bn", "dw_bn")  # the block whose channels an SE gate multiplies
PLAIN = ("stem_bn", "project_bn")  # their constants are absorbed: shifts stay free


def _prepared(cfg: TrainConfig, steps: int) -> tuple[GatedNet, Polariser, torch.Tensor]:
    torch.manual_seed(0)
    model = GatedNet()
    x = torch.randn(8, 3, 8, 8)
    pol = Polariser.prepare(model, x[:2], cfg, total_steps=steps)
    with torch.no_grad():  # shifts far outside the scales: a missing bound would show
        for name in GATED + PLAIN:
            model.get_submodule(name).bias.fill_(2.0)
    return model, pol, x


def _train(model, pol, x, steps: int) -> list[float]:
    """``steps`` steps; after each, the largest |shift| - scale over the gated channels."""
    y = torch.randint(0, 5, (len(x),))
    opt = torch.optim.SGD(pol.param_groups(0.1, 5e-4), lr=0.1, momentum=0.9)
    excess = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pol.before_step()
        opt.step()
        pol.after_step(opt)
        excess.append(max(_excess(model, name) for name in GATED))
    return excess


def _excess(model, name: str) -> float:
    bn = model.get_submodule(name)
    bound = SHIFT_PER_SCALE * channel_importance(bn)
    return float((bn.bias.detach().abs() - bound).max())


def _cfg(method: str = "receding", **kw) -> TrainConfig:
    return TrainConfig(bn_shift=True, penalty=PenaltyConfig(method, strength=1e-3), **kw)


def test_without_a_budget_every_gated_shift_stays_within_its_scale():
    for method in ("receding", "l1", "ista"):
        model, pol, x = _prepared(_cfg(method), 3)
        assert max(_train(model, pol, x, 3)) <= 1e-6, method
        assert all(_excess(model, name) > 0.5 for name in PLAIN), "absorbable shifts are free"


def test_under_a_budget_only_the_chosen_gated_channels_are_bounded():
    """While the controller has chosen nothing (its delay), the shifts are free; once it has
    (penalise: all chooses every group), each gated shift is within its scale."""
    model, pol, x = _prepared(_cfg(target=0.5, target_delay=0.9, target_ramp=0.1), 20)
    assert min(_train(model, pol, x, 3)) > 0.5  # nothing chosen yet: nothing bounded
    model, pol, x = _prepared(_cfg(target=0.5, penalise="all"), 20)
    assert max(_train(model, pol, x, 3)) <= 1e-6


def test_finish_zeroes_the_receded_gated_shifts_and_the_prune_is_then_exact():
    model, pol, x = _prepared(_cfg(), 2)
    _train(model, pol, x, 2)
    receded, strong = [1, 4, 9], [0, 2]
    with torch.no_grad():
        for name in GATED:
            bn = model.get_submodule(name)
            bn.weight[receded] = -12.0  # importance 6e-6, below train.receded_below
            bn.bias[receded] = 3e-6  # within the scale: the projection's invariant
        for name in GATED:  # channel 13: a shift the projection never bounded, receded
            model.get_submodule(name).bias[13] = 0.5
            model.get_submodule(name).weight[13] = -12.0
        strong_before = model.dw_bn.bias[strong].clone()
    assert pol.finish_() == (2 * len(receded), 2)  # channels: both BNs of each group
    for name in GATED:
        assert torch.equal(model.get_submodule(name).bias[receded], torch.zeros(3))
    assert float(model.dw_bn.bias.detach()[13]) == 0.5  # never zeroed silently: the prune keeps it
    assert torch.equal(model.dw_bn.bias[strong], strong_before)
    result = prune_model(model.eval(), x, PruneConfig(threshold=1e-3, min_channels=2, round_to=1))
    summary = result.report()
    assert summary.dropped == len(receded) and summary.exact == len(receded)
    assert summary.approximate == 0 and summary.held_back == 1
    scales_zeroed = model  # the receded scales are 6e-6: compare with them zeroed
    with torch.no_grad():
        for name in GATED:
            model.get_submodule(name).weight[receded] = -1000.0
    assert _worst(result.model, scales_zeroed) <= EXACT
