"""Budgets in MACs: the exact kept-MACs model, the controller on it, and unreachable targets."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ModelConfig, PruneConfig, TrainConfig
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.graph.costs import KeptMacs, count_macs
from pipeline.layers.bn import convert_to_bounded_bn_
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.models.zoo import build_model
from pipeline.prune.stage import make_plan, remove_groups
from pipeline.train.budget import BudgetController, ReceededShare
from pipeline.train.polarise import Polariser, budget_outcome


def _net(name: str):
    cfg = ModelConfig(name=name, width=0.25) if name == "vgg" else ModelConfig(name=name, width=0.5)
    model = build_model(cfg, num_classes=10, in_channels=1).eval()
    return model, torch.randn(2, 1, 16, 16)


@pytest.mark.parametrize("name", ["vgg", "resnet20"])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), share=st.floats(0.1, 0.9))
def test_kept_macs_equals_the_macs_of_the_pruned_model(name, seed, share):
    """KeptMacs must predict count_macs of the model that remove_groups really builds; a first-
    order sum of per-group costs misses by the overlap (two removed groups meeting in a layer)."""
    model, x = _net(name)
    with torch.no_grad():  # non-zero shifts: removed channels leave constants to absorb, and
        for m in model.modules():  # the convs reading them carry corrections (not per-sample MACs)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(seed))
    graph = build_channel_graph(model, x)
    ids = tuple(g.id for g in graph.removable_groups)
    gen = torch.Generator().manual_seed(seed)
    gone = torch.rand(len(ids), generator=gen) < share
    dropped = {g for g, out in zip(ids, gone.tolist(), strict=True) if out}
    for layer in graph.layers.values():  # keep at least one channel per layer
        if layer.out_groups and set(layer.out_groups) <= dropped:
            dropped.discard(layer.out_groups[0])
    kept = torch.tensor([0.0 if g in dropped else 1.0 for g in ids])
    pruned, _ = remove_groups(model, graph, make_plan(graph, dropped), x)
    predicted = KeptMacs(model, graph, x, ids)
    actual = count_macs(pruned, tuple(x.shape[1:]))
    assert predicted.dense == pytest.approx(count_macs(model, tuple(x.shape[1:])), rel=1e-9)
    assert predicted.macs(kept) == pytest.approx(actual, rel=1e-9)


def test_mac_selection_removes_what_it_says():
    """select(share) in MAC mode takes the fewest weakest groups whose removal reaches the share."""
    model, x = _net("vgg")
    convert_to_bounded_bn_(model)
    graph = build_channel_graph(model, x)
    tracker = ReceededShare(model, graph, macs_example=x)
    imp = torch.rand(len(tracker.group_ids), generator=torch.Generator().manual_seed(1))
    for share in (0.3, 0.7, 0.9):
        chosen = tracker.select(imp, share)
        assert tracker.removed(chosen) >= share
        last = chosen.nonzero().flatten()[int(torch.argmax(imp[chosen]))]  # the last one taken
        one_less = chosen.clone()
        one_less[last] = False
        assert tracker.removed(one_less) < share


def test_unreachable_target_warns_before_training(caplog):
    """target 0.9 with max_layer_ratio 0.5 cannot be reached: say so before the first step."""
    model, x = _net("vgg")
    cfg = TrainConfig(target=0.9)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.polarise"):
        pol = Polariser.prepare(
            model, x, cfg, total_steps=10, prune=PruneConfig(max_layer_ratio=0.5, min_channels=1)
        )
    assert pol.reachable is not None and pol.reachable <= 0.5 + 1e-9
    text = caplog.text
    assert "train.target 0.900 cannot be reached" in text and "max_layer_ratio" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.train.polarise"):
        model, _ = _net("vgg")
        Polariser.prepare(
            model,
            x,
            TrainConfig(target=0.4),
            total_steps=10,
            prune=PruneConfig(max_layer_ratio=0.5),
        )
    assert "cannot be reached" not in caplog.text


def test_budget_outcome_states_target_and_achieved():
    assert budget_outcome(0.5, 0.49).startswith("budget reached")
    missed = budget_outcome(0.5, 0.209)
    assert "MISSED" in missed and "0.209" in missed and "0.500" in missed
    assert "no budget" in budget_outcome(None, None)


def test_controller_resumes_with_the_same_penalised_set():
    """The penalised set is refreshed only every select_every steps; a resume must not recompute
    it at once (the set lives in the state dict)."""
    model, x = _net("vgg")
    convert_to_bounded_bn_(model)
    graph = build_channel_graph(model, x)
    tracker = ReceededShare(model, graph)
    a = BudgetController(0.5, total_steps=2000, strength=1.0, ramp=0.01)  # refresh every 10 steps
    for _ in range(13):
        a.update_(tracker)
    with torch.no_grad():  # the importances move between the refreshes
        for m in model.modules():
            if isinstance(m, BoundedBatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape))
    b = BudgetController(0.5, total_steps=2000, strength=1.0, ramp=0.01)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.update_(tracker), b.update_(tracker))
    fresh = BudgetController(0.5, total_steps=2000, strength=1.0, ramp=0.01)
    fresh.load_state_dict({k: v for k, v in a.state_dict().items() if k != "chosen"})
    assert not torch.equal(a.update_(tracker), fresh.update_(tracker))  # the test can fail
