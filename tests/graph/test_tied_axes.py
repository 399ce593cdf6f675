"""Ops that combine entries along a split-off axis (the paths of a selective kernel, the radix
of a split attention) tie those entries into one group; combining over the channel axis itself
stays a barrier."""

from __future__ import annotations

import copy

import pytest
import torch
from sensitivity import randomise_affine_
from torch import nn

from pipeline.core.numerics import rel_err
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.prune.stage import apply_plan_, make_plan, zero_groups_

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _cbr(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


class SelectiveKernel(nn.Module):
    """timm's ``SelectiveKernel``: two paths stacked on dim 1, a softmax over the paths."""

    def __init__(self, c: int = 6, paths: int = 2, log: bool = False) -> None:
        super().__init__()
        self.stem = _cbr(3, c, 3)
        self.paths = nn.ModuleList(_cbr(c, c, 1 + 2 * p) for p in range(paths))
        self.reduce, self.select = _cbr(c, 4, 1), nn.Conv2d(4, c * paths, 1)
        self.head = nn.Sequential(_cbr(c, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.n, self.log = paths, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.stack([p(x) for p in self.paths], dim=1)  # (B, paths, C, H, W)
        a = self.select(self.reduce(x.sum(1).mean((2, 3), keepdim=True)))
        b, c, h, w = a.shape
        a = a.view(b, self.n, c // self.n, h, w)
        a = torch.log_softmax(a, dim=1).exp() if self.log else torch.softmax(a, dim=1)
        return self.head((x * a).sum(dim=1))


class ChannelMean(nn.Module):
    """CBAM-style spatial attention: a mean over the channel axis itself."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _cbr(3, 6, 3), _cbr(6, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        return self.b(x * torch.sigmoid(x.mean(1, keepdim=True)))


def _randomised(model: nn.Module) -> nn.Module:
    return randomise_affine_(model, torch.Generator().manual_seed(1)).eval()


@pytest.mark.parametrize("log", [False, True])
def test_selective_kernel_paths_prune_as_one_channel(log: bool) -> None:
    model = _randomised(SelectiveKernel(log=log))
    graph = build_channel_graph(model, X)
    assert not graph.barriers
    # channel c of every path is one group with the paths' BNs: removed together or not at all
    tied = [g for g in graph.prunable_groups if {n for n, _ in g.bn_channels} >= {"paths.0.1"}]
    assert len(tied) == 6
    assert all({n for n, _ in g.bn_channels} == {"paths.0.1", "paths.1.1"} for g in tied)
    dropped = [g.id for g in tied[::2]]
    masked = zero_groups_(copy.deepcopy(model), graph, dropped, shifts=dropped)
    pruned = apply_plan_(copy.deepcopy(model), make_plan(graph, dropped))
    assert pruned.paths[0][0].out_channels == 3 and pruned.select.out_channels == 6
    with torch.no_grad():
        want = masked(X)
        assert rel_err(pruned(X), want) <= 1e-5
        assert rel_err(model(X), want) > 1e-3  # the dropped channels mattered


def test_a_mean_over_the_channel_axis_stays_a_barrier() -> None:
    graph = build_channel_graph(_randomised(ChannelMean()), X)
    assert [b.op for b in graph.barriers] == ["mean (reduces over the channel axis)"]
