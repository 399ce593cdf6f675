"""Cuts and selections along the channel axis: tied when computed from the count, refused when
literal. Each case once gave silently wrong pruned outputs or a crash."""

import copy

import pytest
import torch
from torch import nn

from pipeline.graph.channel_graph import build_channel_graph
from pipeline.prune.stage import apply_plan_, make_plan, zero_groups_


class Cut(nn.Module):
    def __init__(self, cut):
        super().__init__()
        self.cut = cut
        self.c1, self.b1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.b1(self.c1(x))
        n, c, h, w = y.shape
        if self.cut == "literal_split":
            a, b = y.split(4, dim=1)
            y = torch.cat([b, a], 1)
        elif self.cut == "traced_split":
            a, b = y.split(y.shape[1] // 2, dim=1)
            y = torch.cat([b, a], 1)
        elif self.cut == "inner_literal_view":  # inverse shuffle: (c // 2, 2)
            y = y.view(n, c // 2, 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        elif self.cut == "narrow":
            y = torch.cat([y.narrow(1, 0, 4), y.narrow(1, 0, 4)], 1)
        elif self.cut == "unbind":
            y = torch.stack(y.unbind(1)[::-1], 1)
        return self.b2(self.c2(torch.relu(y)))


def _randomised(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize(
    "cut", ["literal_split", "traced_split", "inner_literal_view", "narrow", "unbind"]
)
def test_every_dropped_group_prunes_exactly(cut):
    # Seeded: with some draws a dropped pair is dead after the ReLU and the drop changes nothing.
    torch.manual_seed(0)
    model, x = _randomised(Cut(cut)), torch.randn(2, 3, 5, 5)
    graph = build_channel_graph(model, x)
    first = [g for g in graph.prunable_groups if any(n == "b1" for n, _ in g.bn_channels)]
    if cut in ("literal_split", "narrow", "unbind"):
        assert not first and graph.barriers  # refused, and said so
        return
    assert first
    for group in first:
        masked = zero_groups_(copy.deepcopy(model), graph, [group.id], shifts=[group.id])
        pruned = apply_plan_(copy.deepcopy(model), make_plan(graph, [group.id]))
        ref = masked(x)
        assert (pruned(x) - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
        assert not torch.allclose(ref, model(x))  # the drop mattered
