"""The budget: receded-share measurement, layer floors, the controller and per-group costs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.graph.costs import group_costs
from pipeline.layers.bn import convert_to_bounded_bn_
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.models.zoo import build_model
from pipeline.train.budget import BudgetController, ReceededShare, budget_weights


def _bounded_vgg(width: float = 0.125) -> tuple[nn.Module, torch.Tensor]:
    model = build_model(ModelConfig(name="vgg", width=width), num_classes=10, in_channels=3)
    convert_to_bounded_bn_(model)
    return model.eval(), torch.randn(2, 3, 32, 32)


def test_share_counts_groups_below_the_level_by_their_strongest_channel(tiny_bounded_net):
    x = torch.randn(2, 3, 16, 16)
    graph = build_channel_graph(tiny_bounded_net, x)
    with torch.no_grad():
        for m in tiny_bounded_net.modules():
            if isinstance(m, BoundedBatchNorm2d):
                m.weight.fill_(-10.0)  # every channel far below 0.01
    tracker = ReceededShare(tiny_bounded_net, graph)
    assert tracker.share(0.01) == pytest.approx(1.0)
    stem = tiny_bounded_net.stem[1]
    with torch.no_grad():
        stem.weight[0] = 5.0  # the residual group of stem channel 0 is alive again
    imp = tracker.group_importance()
    alive = [j for j, v in enumerate(imp.tolist()) if v > 0.5]
    assert len(alive) == 1
    assert tracker.share(0.01) == pytest.approx(1 - 1 / len(tracker.group_ids))


def test_selection_never_takes_what_the_layer_floor_keeps():
    model, x = _bounded_vgg()
    graph = build_channel_graph(model, x)
    tracker = ReceededShare(model, graph, floors=(4, 0.5))
    chosen = tracker.select(torch.rand(len(tracker.group_ids)), 0.9)
    masks = tracker.channel_masks(chosen)
    for name, mask in masks.items():
        n = mask.numel()
        assert int(mask.sum()) <= n - max(4, math.ceil(0.5 * n)), name
    assert float(tracker.weights[chosen].sum()) < 0.9  # the floors bind before 90%


def test_macs_weights_follow_the_cost_of_each_layer():
    model, x = _bounded_vgg()
    graph = build_channel_graph(model, x)
    weights = budget_weights(model, graph, x, "macs")
    first = graph.layers["features.1"].out_groups[0]  # 32x32 map
    last = graph.layers["features.26"].out_groups[0]  # 2x2 map
    assert weights[first] > weights[last]
    assert budget_weights(model, graph, x, "groups") is None


class _Plant:
    """Logits that the receding push moves down and a 'loss' holds up where channels matter.

    A fixed 30% of channels are useful: the loss pulls them back up with a force the penalty
    cannot beat at moderate strength. A budget of 50% must recede exactly from the rest.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [m.weight for m in model.modules() if isinstance(m, BoundedBatchNorm2d)]
        gen = torch.Generator().manual_seed(0)
        self.useful = [torch.rand(p.shape, generator=gen) < 0.3 for p in self.params]

    def step_(self, masks: list[torch.Tensor], strength: float, lr: float = 0.5) -> None:
        from kernels.receding_penalty import receding_penalty_ref

        with torch.no_grad():
            for p, useful, mask in zip(self.params, self.useful, masks, strict=True):
                _, grad = receding_penalty_ref(p, strength=strength, bias=3.0)
                pull = torch.where(useful, -(1 - torch.sigmoid(p)) * 2.0, torch.zeros_like(p))
                p -= lr * (torch.where(mask, grad, torch.zeros_like(grad)) + pull)


@pytest.mark.parametrize("start", [1e-4, 1e-2, 1e-1])
def test_controller_reaches_the_target_from_any_starting_strength(start):
    model, x = _bounded_vgg()
    graph = build_channel_graph(model, x)
    tracker, plant = ReceededShare(model, graph), _Plant(model)
    controller = BudgetController(0.5, total_steps=400, strength=start, level=0.01, ramp=0.6)
    for _ in range(400):
        chosen = controller.update_(tracker)
        names = tracker.channel_masks(chosen)
        masks = [names[n] for n, m in tracker.modules]
        plant.step_(masks, controller.strength)
    assert abs(tracker.share(0.01) - 0.5) <= 0.02
    for p, useful in zip(plant.params, plant.useful, strict=True):
        assert bool((torch.sigmoid(p)[useful] > 0.3).all())  # what matters stays intact


def test_schedule_ramps_then_holds():
    c = BudgetController(0.6, total_steps=100, strength=1.0, ramp=0.5)
    assert c.scheduled(0) == 0.0
    assert 0 < c.scheduled(25) < 0.6
    assert c.scheduled(50) == pytest.approx(0.6) and c.scheduled(99) == pytest.approx(0.6)


def test_controller_state_round_trips():
    c = BudgetController(0.5, total_steps=10, strength=0.3)
    c.step, c.strength = 7, 12.5
    d = BudgetController(0.5, total_steps=10, strength=1.0)
    d.load_state_dict(c.state_dict())
    assert (d.step, d.strength) == (7, 12.5)


@pytest.mark.parametrize(
    "bad", [{"target": 0.0}, {"target": 1.0}, {"total_steps": 0}, {"strength": 0.0}]
)
def test_controller_rejects_bad_arguments(bad):
    args = {"target": 0.5, "total_steps": 10, "strength": 1.0, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        BudgetController(**args)


class _Readers(nn.Module):
    """A grouped reader, a depthwise reader and a flatten->Linear head, all on one BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 4, 3, padding=1, groups=2, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4 + 4 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        a = self.grouped(y).flatten(1)
        b = torch.relu(self.bn_dw(self.dw(y))).flatten(1)
        return self.head(torch.cat([b, a], 1))


def test_costs_count_grouped_depthwise_and_flattened_readers():
    model, x = _Readers().eval(), torch.randn(2, 3, 4, 4)
    graph = build_channel_graph(model, x)
    group = graph.layers["bn"].out_groups[0]
    tied = graph.layers["bn"].out_groups.count(group)  # the grouped reader ties channel c and c+4
    assert tied == 2
    area = 16
    # producer 3*9; grouped reader: 9 * 4 out / 2 groups; depthwise: one 3x3 filter, and the
    # depthwise output channel is the same group, so bn_dw's map and the head's 16 positions x 5
    weights = 3 * 9 + 9 * 4 // 2 + 9 + 16 * 5
    maps = 2 * area  # bn and bn_dw
    memory = group_costs(model, graph, x, "memory")[group]
    assert memory == pytest.approx(tied * (weights + maps) / area)
    macs = 3 * 9 * area + 9 * 2 * area + 9 * area + 16 * 5
    assert group_costs(model, graph, x, "macs")[group] == pytest.approx(tied * macs)


def test_polarization_t_leaves_room_for_the_budget():
    from pipeline.config import PenaltyConfig, TrainConfig
    from pipeline.train.polarise import Polariser

    model = build_model(ModelConfig(name="vgg", width=0.125), num_classes=10, in_channels=3)
    x = torch.randn(2, 3, 32, 32)
    pen = PenaltyConfig(method="polarization", strength=1e-3, t=1.2)
    budget = Polariser.prepare(model, x, TrainConfig(target=0.9, penalty=pen), total_steps=10)
    assert budget.penalty.config.t == pytest.approx(1.9)  # t / 2 caps the share below the mean
    fixed = Polariser.prepare(model, x, TrainConfig(penalty=pen), total_steps=10, convert=False)
    assert fixed.penalty.config.t == 1.2


def test_long_runs_refresh_the_penalised_set_every_few_steps():
    model, x = _bounded_vgg()
    tracker = ReceededShare(model, build_channel_graph(model, x))
    controller = BudgetController(0.5, total_steps=1000, strength=1.0)
    assert controller.select_every == 5
    controller.step = 600  # past the ramp: the whole budget is wanted
    sets = [controller.update_(tracker) for _ in range(10)]
    assert all(s is sets[0] for s in sets[:5]) and sets[5] is not sets[0]  # steps 600 and 605
    assert BudgetController(0.5, total_steps=200, strength=1.0).select_every == 1
