"""Pruning an already pruned model, and training on after zeroing, stay exact and finite.

A first removal turns readers of constant channels into ``CorrectedConv2d``; a second removal
must slice their constant corrections with their outputs (it used to crash on a shape mismatch).
A zeroed bounded-BN scale must be a finite logit, or the receding penalty turns it into NaN.
"""

import copy

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig, PenaltyConfig
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.layers.bn import convert_to_bounded_bn_
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.layers.corrected_conv import CorrectedConv2d
from pipeline.models.checkpoint import load_pruned, save_pruned
from pipeline.models.zoo import build_model
from pipeline.prune.stage import apply_plan_, make_plan, remove_groups, zero_groups_
from pipeline.train.convert import convert_trained_to_bounded_
from pipeline.train.penalties import make_penalty

REL = 1e-5  # of the output scale


class Stack(nn.Module):
    """Three conv-BN-ReLU stages with zero-padded 3x3 readers and a linear head."""

    def __init__(self, bn=nn.BatchNorm2d):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 12, 3, padding=1), bn(12)
        self.c2, self.b2 = nn.Conv2d(12, 12, 3, padding=1), bn(12)
        self.c3, self.b3 = nn.Conv2d(12, 8, 3, padding=1), bn(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def _shifted(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, BoundedBatchNorm2d)):
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.8 + 0.2)  # act(beta) != 0
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _groups_of(graph, bn):
    return [g.id for g in graph.removable_groups if any(n == bn for n, _ in g.bn_channels)]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().detach())


def _first_removal(model, x):
    graph = build_channel_graph(model, x)
    pruned, _ = remove_groups(model, graph, make_plan(graph, set(_groups_of(graph, "b1")[::3])), x)
    assert isinstance(pruned.c2, CorrectedConv2d) and pruned.c2.const_kernel is not None
    return pruned


def test_pruning_a_corrected_conv_equals_masking_it():
    x = torch.randn(2, 3, 10, 10)
    pruned = _first_removal(_shifted(Stack()), x)
    graph = build_channel_graph(pruned, x)
    dropped = set(_groups_of(graph, "b2")[::2])  # outputs of the corrected c2
    assert all(g.prunable for g in graph.groups if g.id in dropped)
    masked = zero_groups_(copy.deepcopy(pruned), graph, dropped, shifts=dropped)
    again = apply_plan_(copy.deepcopy(pruned), make_plan(graph, dropped))
    assert again.c2.const_kernel.shape[0] == again.c2.out_channels == 12 - len(dropped)
    for size in (10, 7):  # the sliced kernel correction is exact at other sizes too
        y = torch.randn(2, 3, size, size)
        assert _rel(again(y), masked(y)) <= REL


def test_removing_again_absorbs_into_the_corrected_conv():
    x = torch.randn(2, 3, 10, 10)
    pruned = _first_removal(_shifted(Stack()), x)
    graph = build_channel_graph(pruned, x)
    dropped = set(_groups_of(graph, "b1")[::2]) | set(_groups_of(graph, "b2")[1::3])
    twice, report = remove_groups(pruned, graph, make_plan(graph, dropped), x)
    assert report.max_rel_err <= REL
    reference = copy.deepcopy(pruned)
    zero_groups_(reference, graph, dropped)
    assert _rel(twice(x), reference(x)) <= REL


def test_a_saved_pruned_model_can_be_pruned_again(tmp_path):
    """``recede prune --from`` a pruned folder: load the manifest, then prune once more."""
    spec = {"model": {"name": "resnet20", "width": 0.5, "depth": 11}, "num_classes": 10}
    spec |= {"in_channels": 3, "bounded_bn": False, "input_shape": [3, 12, 12]}
    model = _shifted(build_model(ModelConfig(name="resnet20", width=0.5), **_io(spec)), seed=1)
    x = torch.randn(2, 3, 12, 12)
    graph = build_channel_graph(model, x)
    first, _ = remove_groups(
        model, graph, make_plan(graph, {g.id for g in graph.removable_groups[::3]}), x
    )
    assert any(isinstance(m, CorrectedConv2d) for m in first.modules())
    save_pruned(first, tmp_path, spec=spec)
    loaded, _ = load_pruned(tmp_path)
    graph = build_channel_graph(loaded, x)
    second, report = remove_groups(
        loaded, graph, make_plan(graph, {g.id for g in graph.removable_groups[::2]}), x
    )
    assert report.max_rel_err <= REL
    assert sum(p.numel() for p in second.parameters()) < sum(p.numel() for p in first.parameters())


def _io(spec):
    return {"num_classes": spec["num_classes"], "in_channels": spec["in_channels"]}


def _penalty_step_(model, x):
    """One SGD step on a task loss plus the receding penalty; returns the penalty value."""
    model.train()
    penalty = make_penalty(PenaltyConfig(method="receding", strength=1e-2, bias=3.0), model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).square().mean().backward()
    value = penalty.apply_()
    opt.step()
    return value


def _all_finite(model):
    return all(
        bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()
    )


@pytest.mark.parametrize("zero", ["convert", "scales", "scales_and_shifts"])
def test_a_penalty_step_after_zeroing_stays_finite(zero):
    x = torch.randn(4, 3, 8, 8)
    if zero == "convert":
        model = _shifted(Stack())
        with torch.no_grad():
            model.b1.weight[:3] = 0.0  # a trained gamma of exactly 0
        convert_trained_to_bounded_(model, x)
    else:
        model = Stack()
        convert_to_bounded_bn_(model, shift=True)
        model = _shifted(model)
        graph = build_channel_graph(model, x)
        dropped = set(_groups_of(graph, "b1")[:3])
        zero_groups_(model, graph, dropped, shifts=dropped if zero == "scales_and_shifts" else ())
    assert float(torch.sigmoid(model.b1.weight).min()) == 0.0  # removal stays exact
    assert bool(torch.isfinite(model.b1.weight).all())
    value = _penalty_step_(model, x)
    assert torch.isfinite(value)
    assert _all_finite(model)
    assert float(torch.sigmoid(model.b1.weight).min()) == 0.0  # and the channel stays off
