"""Removal through a squeeze-excite gate and hard-swish: exact, or kept, or approximate only when
asked (``prune.allow_approximate``), with the error measured.

Issue 33 item 1: on MobileNetV3 the channels feeding SE gates were removed by silently zeroing
their shifts ("approximate"), and accuracy straight after the cut fell to chance. A channel
whose constant a gate reads can be removed exactly only when its shift is exactly zero, which
polarised training now leaves (``pipeline.train.gated_shift``); otherwise the prune keeps it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.config import PruneConfig
from pipeline.core.numerics import rel_err
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.prune.plan import make_plan
from pipeline.prune.remove import ApproximateRemovalError, remove_groups
from pipeline.prune.stage import prune_model

EXACT = 1e-6  # relative to the output scale, as the removal check itself


class GatedNet(nn.Module):
    """A MobileNetV3 block: expand (BN, hard-swish), depthwise (BN, hard-swish), an SE gate
    (hard-sigmoid), project (BN), then a residual add and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.dw_bn = nn.BatchNorm2d(16)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.stem_bn(self.stem(x)))
        y = F.hardswish(self.expand_bn(self.expand(x)))
        y = F.hardswish(self.dw_bn(self.dw(y)))
        gate = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        x = x + self.project_bn(self.project(y * gate))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def gated_net(seed: int = 0) -> GatedNet:
    """GatedNet with random BN affines and the BN statistics of its own input, so its output
    depends on the input as a trained net's does."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GatedNet()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
            m.momentum = None
        model.train()(torch.randn(16, 3, 12, 12, generator=gen))
    return model.eval()


def recede_(model: GatedNet, channels: list[int], shift: float) -> GatedNet:
    """Give ``channels`` of the gated block a zero scale in both of its BNs and ``shift``."""
    with torch.no_grad():
        for bn in (model.expand_bn, model.dw_bn):
            bn.weight[channels] = 0.0
            bn.bias[channels] = shift
    return model


def _inputs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(4, 3, 12, 12, generator=gen), torch.randn(2, 3, 20, 20, generator=gen)]


def _worst(a: nn.Module, b: nn.Module) -> float:
    with torch.no_grad():
        return max(rel_err(a(x), b(x)) for x in _inputs())


CUT = PruneConfig(threshold=1e-3, min_channels=2, round_to=1)  # drops exactly the zero-scale
# channels (unrounded: a 16-wide layer would round 13 kept back to 16)


def test_the_model_sees_its_input_and_a_wrong_removal():
    """The checks below can fail: outputs move with the input far beyond EXACT, and zeroing
    the shifts of receded gated channels (what an approximate removal does) moves them too."""
    model = recede_(gated_net(), [0, 3, 7], shift=0.5)
    a, b = _inputs()[0][:2]
    with torch.no_grad():
        assert rel_err(model(a[None]), model(b[None])) > 1e3 * EXACT
    zeroed = recede_(copy.deepcopy(model), [0, 3, 7], shift=0.0)
    assert _worst(zeroed, model) > 1e3 * EXACT


def test_gated_channels_with_zero_shift_are_removed_exactly():
    """What polarised training leaves: scale and shift exactly 0 behind the SE gate."""
    model = recede_(gated_net(), [0, 3, 7], shift=0.0)
    result = prune_model(model, _inputs()[0], CUT)
    summary = result.report()
    assert summary.dropped == 3 and summary.exact == 3
    assert summary.approximate == 0 and summary.held_back == 0
    assert result.model.expand.out_channels == 13 and result.model.dw.groups == 13
    assert _worst(result.model, model) <= EXACT  # two input sizes


def test_gated_channels_with_a_shift_are_kept_without_the_opt_in():
    model = recede_(gated_net(), [0, 3, 7], shift=0.5)
    result = prune_model(model, _inputs()[0], CUT)
    summary = result.report()
    assert summary.held_back == 3 and summary.dropped == 0 and summary.approximate == 0
    assert _worst(result.model, model) <= EXACT


def test_the_opt_in_removes_them_and_reports_the_error_it_measured():
    model = recede_(gated_net(), [0, 3, 7], shift=0.5)
    x = _inputs()[0]
    result = prune_model(
        model, x, PruneConfig(threshold=1e-3, min_channels=2, round_to=1, allow_approximate=True)
    )
    summary = result.report()
    assert summary.dropped == 3 and summary.approximate == 3 and summary.exact == 0
    zeroed = recede_(copy.deepcopy(model), [0, 3, 7], shift=0.0).double()
    with torch.no_grad():
        expected = rel_err(zeroed(x.double()), model.double()(x.double()))
    assert summary.approximate_rel_err == pytest.approx(expected, rel=1e-6)
    assert summary.approximate_rel_err > 1e3 * EXACT


def test_remove_groups_refuses_an_approximate_plan_naming_the_setting():
    model = recede_(gated_net(), [0, 3, 7], shift=0.5)
    x = _inputs()[0]
    graph = build_channel_graph(model, x)
    gated = {g.id for g in graph.groups if ("expand_bn", 3) in g.bn_channels}
    with pytest.raises(ApproximateRemovalError, match="prune.allow_approximate"):
        remove_groups(model, graph, make_plan(graph, gated), x)


def test_a_hard_swish_constant_read_by_a_plain_conv_is_absorbed_exactly():
    """The stem's channels reach readers through hard-swish and a residual add only: their
    constant is absorbed, so a shift there never holds a group back."""
    model = gated_net()
    with torch.no_grad():
        model.stem_bn.weight[[1, 5]] = 0.0
        model.project_bn.weight[[1, 5]] = 0.0  # the residual ties stem and project channels
    result = prune_model(model, _inputs()[0], CUT)
    summary = result.report()
    assert summary.dropped == 2 and summary.exact == 2 and summary.held_back == 0
    assert _worst(result.model, model) <= EXACT


@settings(max_examples=12, deadline=None)
@given(
    st.integers(0, 2**16),
    st.sets(st.integers(0, 15), min_size=1, max_size=8),
    st.sets(st.integers(0, 15), max_size=8),
)
def test_a_default_prune_never_changes_a_gated_model(seed, receded, shifted):
    """For any receded gated channels, some with a shift left: a prune without the opt-in to
    approximate removal removes the zero-shift ones exactly, keeps the others, and the output never moves beyond EXACT."""
    model = recede_(gated_net(seed), sorted(receded), shift=0.0)
    with torch.no_grad():
        model.dw_bn.bias[sorted(receded & shifted)] = 0.3
    cfg = PruneConfig(threshold=1e-3, min_channels=1, round_to=1)  # rounding would restore some
    result = prune_model(model, _inputs()[0], cfg)
    summary = result.report()
    assert summary.approximate == 0
    assert summary.held_back == len(receded & shifted)
    assert summary.exact == summary.dropped == len(receded - shifted)
    assert _worst(result.model, model) <= EXACT


def test_the_calibrated_twin_removes_an_approximate_plan_the_same_way(monkeypatch):
    """An untrained model's insensitive removal check is rerun on its calibrated twin
    (``pipeline.core.checks.on_twin``); with the opt-in, that rerun must remove the plan's gated
    groups the same way, not refuse them (it once raised ApproximateRemovalError)."""
    import pipeline.prune.stage as stage

    rechecks = []

    def always_recheck(check, model, batch, recheck):
        rechecks.append(recheck(copy.deepcopy(model)))
        return check

    monkeypatch.setattr(stage, "on_twin", always_recheck)
    model = recede_(gated_net(), [0, 3, 7], shift=0.5)
    cfg = PruneConfig(threshold=1e-3, min_channels=2, round_to=1, allow_approximate=True)
    result = prune_model(model, _inputs()[0], cfg)
    assert result.report().approximate == 3
    assert len(rechecks) == 1 and rechecks[0].verdict == result.removal.check.verdict == "ok"
