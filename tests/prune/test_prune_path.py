"""The seams of the one-way prune path: plan <- remove <- prune, and the shared BN,
corrected-conv, relative-error and rescale helpers they stand on."""

from __future__ import annotations

import pytest
import torch
from test_import_graph import import_graph
from torch import nn

from pipeline.core.numerics import rel_err
from pipeline.layers.bn import (
    bn_scale,
    channel_importance,
    convert_to_bounded_bn_,
    is_bn,
    zero_scale_,
)
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.layers.corrected_conv import (
    CorrectedConv2d,
    corrections,
    drop_kernel_,
    make_corrected_,
    scale_corrections_,
)

# stage -> the stages it must never import (directly or through another module)
LATER = {
    "pipeline.prune.plan": {"pipeline.prune.remove", "pipeline.prune.absorb", "pipeline.prune.stage", "pipeline.run.pipeline"},
    "pipeline.prune.absorb": {"pipeline.prune.remove", "pipeline.prune.stage", "pipeline.run.pipeline"},
    "pipeline.prune.remove": {"pipeline.prune.stage", "pipeline.run.pipeline", "pipeline.cli.main"},
    "pipeline.prune.stage": {"pipeline.run.pipeline", "pipeline.cli.main"},
    "pipeline.layers.bounded_bn": {"pipeline.layers.bn", "pipeline.layers.bn_act"},
    "pipeline.layers.corrected_conv": {"pipeline.prune.absorb", "pipeline.prune.remove", "pipeline.fold.batchnorm"},
}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


@pytest.mark.parametrize("module", sorted(LATER))
def test_each_stage_imports_only_earlier_ones(module):
    reached = _reachable(import_graph(), module)
    assert not reached & LATER[module], f"{module} reaches {sorted(reached & LATER[module])}"


def test_the_reachability_check_can_fail():
    graph = {"pipeline.prune.plan": {"pipeline.layers.bn"}, "pipeline.layers.bn": {"pipeline.prune.remove"}}
    assert "pipeline.prune.remove" in _reachable(graph, "pipeline.prune.plan")


def test_bn_scale_and_zeroing_agree_for_plain_and_bounded():
    plain, bounded = nn.BatchNorm2d(3), BoundedBatchNorm2d(3)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([-2.0, 0.5, 1.0]))
        bounded.weight.copy_(torch.tensor([-1.0, 0.0, 2.0]))
    assert torch.equal(bn_scale(plain), plain.weight)
    assert torch.equal(bn_scale(bounded), torch.sigmoid(bounded.weight))
    assert torch.equal(channel_importance(plain), torch.tensor([2.0, 0.5, 1.0]))
    for bn in (plain, bounded):
        assert is_bn(bn)
        with torch.no_grad():
            zero_scale_(bn, 1)
        assert float(channel_importance(bn)[1]) == 0.0 and float(channel_importance(bn)[0]) != 0.0
    assert not is_bn(nn.Conv2d(3, 3, 1)) and not is_bn(nn.LayerNorm(3))


def test_bounded_conversion_lives_in_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert convert_to_bounded_bn_(model) == 1 and isinstance(model[1], BoundedBatchNorm2d)


def test_corrected_conv_accessors_round_trip():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 5, 5)
    plain = conv(x)
    make_corrected_(conv, kernel=torch.randn(3, 1, 3, 3))
    assert isinstance(conv, CorrectedConv2d) and set(corrections(conv)) == {"const_kernel"}
    before = conv(x) - plain
    scale_corrections_(conv, torch.tensor([1.0, 2.0, 0.0]))
    after = conv(x) - plain
    assert torch.allclose(after[:, 1], 2 * before[:, 1]) and float(after[:, 2].abs().max()) == 0
    drop_kernel_(conv)
    assert type(conv) is nn.Conv2d and corrections(conv) == {}
    assert torch.equal(conv(x), plain)


def test_rel_err_is_relative_to_the_reference_scale():
    want = torch.tensor([10.0, -20.0])
    assert rel_err(want + torch.tensor([0.0, 2.0]), want) == pytest.approx(0.1)
    assert rel_err(want, want) == 0.0
    assert rel_err(torch.ones(2), torch.zeros(2)) == pytest.approx(1e12)  # the floor
