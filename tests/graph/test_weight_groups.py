"""Channels no BN gates (a timm ``conv_head``) are removed exactly by zeroing their writers, and
``scope="layer"`` drops the same fraction from every layer set."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, PruneConfig
from pipeline.core.numerics import rel_err
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.prune.plan import PruneError, SelectionRules, select_groups
from pipeline.prune.stage import make_plan, prune_model, remove_groups, zero_groups_

TOL = 1e-5  # float32, relative to max |output|


class _HeadNet(nn.Module):
    """conv-BN-ReLU trunk, then a BN-less ``conv_head`` with bias and Hardswish, like timm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.conv_head = nn.Conv2d(12, 16, 1)  # bias, no BN
        self.act = nn.Hardswish()
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x)).mean((2, 3), keepdim=True)
        return self.classifier(self.act(self.conv_head(x)).flatten(1))


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _HeadNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        model.conv_head.bias.normal_(0, 1.0)  # act(bias) must be absorbed, not dropped
    return model, torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))


def _head_groups(graph) -> set[int]:
    return set(graph.layers["conv_head"].out_groups)


def test_conv_head_channels_are_weight_gated_and_kept_out_of_bn_groups() -> None:
    model, x = _model()
    graph = build_channel_graph(model, x)
    weight = {g.id for g in graph.weight_groups}
    assert weight == _head_groups(graph)
    assert not weight & {g.id for g in graph.removable_groups}  # training never sees them
    assert {w for g in weight for w, _ in graph.writers(g)} == {"conv_head"}


def test_removing_weight_gated_channels_absorbs_act_bias_exactly() -> None:
    model, x = _model()
    graph = build_channel_graph(model, x)
    dropped = sorted(_head_groups(graph))[::2]
    plan = make_plan(graph, dropped)
    pruned, report = remove_groups(model, graph, plan, x)
    assert pruned.conv_head.out_channels == 8 and pruned.classifier.in_features == 8
    assert report.corrections == (("classifier", "bias"),)  # Hardswish(bias) went into the head
    reference = zero_groups_(copy.deepcopy(model), graph, dropped)  # rows zeroed, biases kept
    with torch.no_grad():
        want, got = reference(x), pruned(x)
        assert rel_err(got, want) <= TOL
        # the check sees an error of the size a wrong row would make
        pruned.conv_head.weight[0] *= 1.01
        assert rel_err(pruned(x), want) > 10 * TOL
        # and dropping the constants instead of absorbing them would be caught
        naive = zero_groups_(copy.deepcopy(model), graph, dropped, shifts=dropped)
        assert rel_err(naive(x), want) > 10 * TOL


def test_global_scope_never_ranks_weight_gated_groups() -> None:
    model, x = _model()
    pruned = prune_model(model, x, PruneConfig(threshold="ratio", ratio=0.5, min_channels=1))
    assert pruned.model.conv_head.out_channels == 16
    layered = prune_model(
        model, x, PruneConfig(threshold="ratio", ratio=0.5, scope="layer", min_channels=1)
    )
    assert layered.model.conv_head.out_channels == 8


def test_layer_scope_drops_the_ratio_from_every_layer_set() -> None:
    model, x = _model()
    graph = build_channel_graph(model, x)
    gen = torch.Generator().manual_seed(3)
    # skewed importances: a global ranking empties the stem (down to min_channels=1) and
    # spares the block
    importance = {
        g: float(torch.rand((), generator=gen)) for g in graph.layers["stem.0"].out_groups
    }
    importance |= {
        g: 10 + float(torch.rand((), generator=gen)) for g in graph.layers["block.0"].out_groups
    }
    rules = SelectionRules(min_channels=1, max_layer_ratio=1.0)
    glob = select_groups(importance, graph, ratio=0.5, rules=rules)
    layer = select_groups(importance, graph, ratio=0.5, rules=rules, scope="layer")
    stem, block = set(graph.layers["stem.0"].out_groups), set(graph.layers["block.0"].out_groups)
    assert (len(glob & stem), len(glob & block)) == (7, 3)
    assert (len(layer & stem), len(layer & block)) == (4, 6)
    # within a layer set the least important go
    ranked = sorted(stem, key=importance.get)
    assert layer & stem == set(ranked[:4])


def test_layer_scope_needs_a_ratio() -> None:
    model, x = _model()
    graph = build_channel_graph(model, x)
    with pytest.raises(PruneError, match="scope"):
        select_groups({}, graph, threshold=0.1, scope="layer")
    with pytest.raises(ConfigError, match="prune.scope"):
        PruneConfig(threshold="auto", scope="layer")
    with pytest.raises(ConfigError, match="prune.scope"):
        PruneConfig(threshold="ratio", scope="per-layer")


class _PaddedReader(nn.Module):
    """A BN-less 3x3 conv that reads a BN trunk: pruning the trunk gives it a kernel correction."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.mid = nn.Conv2d(6, 8, 3, padding=1)  # bias, no BN
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.trunk(x))).mean((2, 3)))


def test_a_corrected_writer_keeps_its_channels() -> None:
    """After a first prune the writer carries a kernel correction: its zeroed rows leave a value
    that varies with position and input size, which no bias can absorb at every size."""
    torch.manual_seed(0)
    model = _PaddedReader().eval()
    with torch.no_grad():
        model.trunk[1].bias.uniform_(0.5, 1.0)  # act(beta) > 0: the reader gets a correction
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    graph = build_channel_graph(model, x)
    assert set(graph.layers["mid"].out_groups) <= {g.id for g in graph.weight_groups}
    trunk = sorted(graph.layers["trunk.0"].out_groups)[:3]
    first, report = remove_groups(model, graph, make_plan(graph, trunk), x)
    assert ("mid", "kernel") in report.corrections
    graph = build_channel_graph(first, x)
    mid = set(graph.layers["mid"].out_groups)
    assert not mid & {g.id for g in graph.weight_groups}
    with pytest.raises(PruneError, match="not removable"):
        make_plan(graph, sorted(mid)[:2])
