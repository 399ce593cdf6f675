"""Channel graph: coupling of residual adds, concat, depthwise, grouped, flatten, SE and shuffle.

Each case builds a small model by hand, checks the groups the graph found, and then checks the
one property the rest of recede relies on: physically pruning a set of groups gives the same
output as masking them (their BN scale and shift set to zero).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.shufflenetv2 import channel_shuffle

from pipeline.graph.channel_graph import ChannelGraph, GraphError, build_channel_graph
from pipeline.prune.stage import (
    PrunePlan,
    SelectionRules,
    apply_plan_,
    make_plan,
    select_groups,
    zero_groups_,
)

REL_TOL = 1e-5  # of the output's scale: fp32 sums over a few hundred terms in another order


def _bn(c: int) -> nn.BatchNorm2d:
    """A BN whose scale, shift and running stats are all far from their defaults."""
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def _cbr(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), _bn(cout), nn.ReLU()
    )


class _Head(nn.Module):
    """Global average pool and a linear classifier: keeps the last block's channels prunable."""

    def __init__(self, c: int, classes: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def _graph(model: nn.Module, size: int = 8) -> tuple[ChannelGraph, torch.Tensor]:
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(2, 3, size, size)
    return build_channel_graph(model, x), x


def _prune_exactly(
    model: nn.Module, graph: ChannelGraph, dropped: set[int], x: torch.Tensor
) -> nn.Module:
    """Prune a copy of ``model``, assert it equals the masked copy, and return it."""
    masked = zero_groups_(copy.deepcopy(model), graph, dropped, shifts=dropped)
    pruned = apply_plan_(copy.deepcopy(model), make_plan(graph, dropped))
    with torch.no_grad():
        want, got, before = masked(x), pruned(x), model(x)
    assert not torch.equal(want, before), "masking these groups changed nothing; weak test"
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=0.0, atol=REL_TOL * scale)
    return pruned


def _groups_of(graph: ChannelGraph, layer: str) -> tuple[int, ...]:
    return graph.layers[layer].out_groups


def _prunable_ids(graph: ChannelGraph) -> set[int]:
    return {g.id for g in graph.prunable_groups}


# -- residual add -------------------------------------------------------------------------------
class _ProjectionBlock(nn.Module):
    """ResNet basic block with a 1x1 projection shortcut, then an identity block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), _bn(6)
        self.proj, self.bnp = nn.Conv2d(3, 6, 1, bias=False), _bn(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 6, 3, padding=1, bias=False), _bn(6)
        self.head = _Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        y = torch.relu(y + self.bnp(self.proj(x)))
        y = torch.relu(self.bn3(self.conv3(y)) + y)
        return self.head(y)


def test_projection_shortcut_couples_the_add() -> None:
    model = _ProjectionBlock()
    graph, x = _graph(model)
    main = _groups_of(graph, "bn2")
    # channel c of every add operand is one group
    assert main == _groups_of(graph, "bnp") == _groups_of(graph, "bn3")
    assert len(set(main)) == 6
    assert set(main) <= _prunable_ids(graph)
    by_id = {g.id: g for g in graph.groups}
    assert set(by_id[main[2]].bn_channels) == {("bn2", 2), ("bnp", 2), ("bn3", 2)}
    assert set(_groups_of(graph, "bn1")).isdisjoint(main)

    pruned = _prune_exactly(model, graph, {main[0], main[4], _groups_of(graph, "bn1")[1]}, x)
    assert pruned.conv2.out_channels == pruned.proj.out_channels == pruned.conv3.in_channels == 4
    assert pruned.conv2.in_channels == 7
    assert pruned.head.fc.in_features == 4


# -- concat -------------------------------------------------------------------------------------
class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _cbr(3, 4), _cbr(3, 5)
        self.conv, self.bn = nn.Conv2d(9, 6, 1, bias=False), _bn(6)
        self.head = _Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(torch.cat([self.a(x), self.b(x)], 1))))


def test_concat_offsets_the_second_input() -> None:
    model = _Concat()
    graph, x = _graph(model)
    a, b = _groups_of(graph, "a.1"), _groups_of(graph, "b.1")
    assert graph.layers["conv"].in_groups == a + b
    dropped = {a[0], b[2], b[4]}
    plan = {layer.name: layer for layer in make_plan(graph, dropped).layers}
    assert plan["conv"].keep_in == (1, 2, 3, 4, 5, 7)  # b's channel 2 sits at offset 4 + 2
    assert plan["b.0"].keep_out == (0, 1, 3)
    pruned = _prune_exactly(model, graph, dropped, x)
    assert pruned.conv.weight.shape == (6, 6, 1, 1)


# -- depthwise ----------------------------------------------------------------------------------
def test_depthwise_couples_input_and_output() -> None:
    model = nn.Sequential(_cbr(3, 6), _cbr(6, 6, groups=6), _cbr(6, 4, k=1), _Head(4))
    graph, x = _graph(model)
    dw = graph.layers["1.0"]
    assert dw.in_groups == dw.out_groups == _groups_of(graph, "0.1") == _groups_of(graph, "1.1")
    by_id = {g.id: g for g in graph.groups}
    assert set(by_id[dw.out_groups[3]].bn_channels) == {("0.1", 3), ("1.1", 3)}

    pruned = _prune_exactly(model, graph, {dw.out_groups[0], dw.out_groups[5]}, x)
    conv = pruned[1][0]
    assert conv.groups == conv.in_channels == conv.out_channels == 4
    assert conv.weight.shape == (4, 1, 3, 3)


# -- grouped conv -------------------------------------------------------------------------------
def test_grouped_conv_keeps_equal_groups() -> None:
    model = nn.Sequential(_cbr(3, 8), _cbr(8, 12, groups=4), _cbr(12, 4, k=1), _Head(4))
    graph, x = _graph(model)
    inputs, outputs = _groups_of(graph, "0.1"), _groups_of(graph, "1.1")
    # input channel j of every group (8 = 4 groups x 2) is one group; likewise outputs (4 x 3)
    assert all(inputs[k * 2 + j] == inputs[j] for k in range(4) for j in range(2))
    assert all(outputs[k * 3 + j] == outputs[j] for k in range(4) for j in range(3))
    assert len(set(inputs)) == 2 and len(set(outputs)) == 3

    importance = {g: float(torch.rand(())) for g in _prunable_ids(graph)}
    dropped = select_groups(importance, graph, ratio=0.5, rules=SelectionRules(min_channels=1))
    assert dropped
    pruned = _prune_exactly(model, graph, dropped, x)
    conv = pruned[1][0]
    assert conv.groups == 4
    assert conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    assert conv.in_channels + conv.out_channels < 8 + 12
    assert conv.weight.shape == (conv.out_channels, conv.in_channels // 4, 3, 3)


# -- flatten -> linear --------------------------------------------------------------------------
def test_flatten_to_linear_drops_blocks_of_spatial_features() -> None:
    model = nn.Sequential(_cbr(3, 5), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 7))
    graph, x = _graph(model)
    channels = _groups_of(graph, "0.1")
    assert graph.layers["3"].in_groups == tuple(g for g in channels for _ in range(4))  # C*2*2

    weight = model[3].weight.detach().clone()
    pruned = _prune_exactly(model, graph, {channels[1], channels[3]}, x)
    kept = [f for c in (0, 2, 4) for f in range(4 * c, 4 * c + 4)]
    assert pruned[3].in_features == 12
    assert torch.equal(pruned[3].weight, weight[:, kept])


# -- squeeze-and-excitation ---------------------------------------------------------------------
class _SE(nn.Module):
    def __init__(self, c: int, squeeze: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * s  # [N, C, H, W] * [N, C, 1, 1]


def test_se_gate_couples_excitation_with_gated_channels() -> None:
    model = nn.Sequential(_cbr(3, 8), _SE(8, 3), _cbr(8, 4, k=1), _Head(4))
    graph, x = _graph(model)
    gated = _groups_of(graph, "0.1")
    assert graph.layers["1.fc2"].out_groups == gated
    assert graph.layers["1.fc1"].in_groups == gated
    assert set(gated) <= _prunable_ids(graph)
    assert set(graph.layers["1.fc1"].out_groups).isdisjoint(_prunable_ids(graph))  # no BN

    pruned = _prune_exactly(model, graph, {gated[0], gated[6], gated[7]}, x)
    assert pruned[1].fc2.out_channels == pruned[1].fc1.in_channels == 5
    assert pruned[1].fc2.bias.shape == (5,)


# -- channel shuffle ----------------------------------------------------------------------------
class _Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = _cbr(3, 8, k=1), _cbr(8, 4, k=1), _Head(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(channel_shuffle(self.a(x), 2)))


def test_channel_shuffle_ties_position_within_group() -> None:
    model = _Shuffle()
    graph, x = _graph(model)
    shuffled = _groups_of(graph, "a.1")
    assert shuffled[:4] == shuffled[4:], "view(n, 2, c // 2) ties channel j with channel 4 + j"
    assert len(set(shuffled)) == 4
    assert set(shuffled) <= _prunable_ids(graph)


@pytest.mark.parametrize("drop", [(0,), (3,), (0, 2), (1, 2, 3)])
def test_channel_shuffle_prunes_exactly(drop: tuple[int, ...]) -> None:
    model = _Shuffle()
    graph, x = _graph(model)
    shuffled = _groups_of(graph, "a.1")
    pruned = _prune_exactly(model, graph, {shuffled[j] for j in drop}, x)
    assert pruned.b[0].in_channels == 8 - 2 * len(drop)


# -- barriers -----------------------------------------------------------------------------------
class _CumSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=1)  # mixes channels in an order-dependent way


class _ChannelLayerNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # normalise over C


@pytest.mark.parametrize(
    ("mixer", "op", "node", "where"),
    [
        (_CumSum(), "cumsum", "cumsum", "mix"),
        (_ChannelLayerNorm(6), "LayerNorm", "mix_norm", "mix.norm"),
    ],
)
def test_unknown_op_is_a_barrier(mixer: nn.Module, op: str, node: str, where: str) -> None:
    model = nn.Sequential()
    model.add_module("a", _cbr(3, 6))
    model.add_module("mix", mixer)
    model.add_module("b", _cbr(6, 6))
    model.add_module("c", _cbr(6, 4, k=1))
    model.add_module("head", _Head(4))
    graph, x = _graph(model)

    assert len(graph.barriers) == 1
    barrier = graph.barriers[0]
    assert barrier.op.startswith(op) and barrier.node == node and barrier.module == where
    by_id = {g.id: g for g in graph.groups}
    for g in _groups_of(graph, "a.1"):
        assert not by_id[g].prunable and "barrier" in by_id[g].reason
    # channels made after the barrier are still prunable, and prune exactly
    after = _groups_of(graph, "b.1")
    assert set(after) <= _prunable_ids(graph)
    _prune_exactly(model, graph, {after[0], after[5]}, x)


def test_model_without_batchnorm_raises() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    with pytest.raises(GraphError, match="no BatchNorm"):
        build_channel_graph(model, torch.randn(1, 3, 8, 8))


class _ReadBeforeBN(nn.Module):
    """conv1's output feeds bn1 and, with no BN in between, a second conv."""

    def __init__(self, raw_reader: bool) -> None:
        super().__init__()
        self.raw_reader = raw_reader
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), _bn(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 1, bias=False), _bn(4)
        self.conv3, self.bn3 = nn.Conv2d(6, 4, 1, bias=False), _bn(4)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.conv1(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(raw))))
        z = self.bn3(self.conv3(raw if self.raw_reader else torch.relu(self.bn1(raw))))
        return self.head(torch.cat([y, z], 1))


def test_conv_reading_before_bn_makes_group_unprunable() -> None:
    graph, _ = _graph(_ReadBeforeBN(raw_reader=True))
    by_id = {g.id: g for g in graph.groups}
    for g in _groups_of(graph, "bn1"):
        assert not by_id[g].prunable
        assert by_id[g].reason == "a conv/linear reads it before its BN"
    assert set(_groups_of(graph, "bn3")) <= _prunable_ids(graph)

    control, _ = _graph(_ReadBeforeBN(raw_reader=False))
    assert set(_groups_of(control, "bn1")) <= _prunable_ids(control)


# -- plans and selection ------------------------------------------------------------------------
class _Tiny(nn.Module):
    """Residual add, concat, depthwise, grouped conv, SE gate and a linear head; widths x8."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16)
        self.res = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), _bn(16))
        self.left, self.right = _cbr(16, 8, k=1), _cbr(16, 24, k=1)
        self.dw = _cbr(32, 32, groups=32)
        self.grouped = _cbr(32, 16, groups=2)
        self.se = _SE(16, 8)
        self.head = _Head(16, classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.res(x) + x)
        x = self.dw(torch.cat([self.left(x), self.right(x)], 1))
        return self.head(self.se(self.grouped(x)))


@pytest.mark.parametrize("fixture", ["tiny_net", "tiny_bounded_net"])
def test_plan_json_round_trip(fixture: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(fixture)
    graph, x = _graph(model)
    importance = {g: float(torch.rand(())) for g in _prunable_ids(graph)}
    dropped = select_groups(importance, graph, threshold=0.4, rules=SelectionRules(min_channels=1))
    plan = make_plan(graph, dropped, mode="threshold", value=0.4)
    assert plan.layers and plan.dropped_groups
    assert {layer.kind for layer in plan.layers} == {"conv", "bn", "linear"}

    decoded = PrunePlan.from_json(plan.to_json())
    assert decoded == plan
    assert PrunePlan.from_json(decoded.to_json()) == plan
    a = apply_plan_(copy.deepcopy(model), plan)
    b = apply_plan_(copy.deepcopy(model), decoded)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _kept_out(graph: ChannelGraph, dropped: set[int]) -> dict[str, tuple[int, int]]:
    """Kept and total output channels of every layer."""
    return {
        name: (sum(g not in dropped for g in layer.out_groups), len(layer.out_groups))
        for name, layer in graph.layers.items()
    }


def _importance(graph: ChannelGraph, seed: int) -> dict[int, float]:
    gen = torch.Generator().manual_seed(seed)
    return {g: float(torch.rand((), generator=gen)) for g in sorted(_prunable_ids(graph))}


@pytest.mark.parametrize("seed", range(3))
def test_select_groups_keeps_min_channels(seed: int) -> None:
    graph, _ = _graph(_Tiny())
    rules = SelectionRules(min_channels=5, max_layer_ratio=1.0)
    dropped = select_groups(_importance(graph, seed), graph, ratio=1.0, rules=rules)
    kept = _kept_out(graph, dropped)
    assert dropped
    assert all(k >= min(5, total) for k, total in kept.values()), kept
    assert min(k for k, total in kept.values() if total > 5) < 8, "the floor never bound"


@pytest.mark.parametrize("seed", range(3))
def test_select_groups_respects_max_layer_ratio(seed: int) -> None:
    graph, _ = _graph(_Tiny())
    rules = SelectionRules(min_channels=1, max_layer_ratio=0.25)
    dropped = select_groups(_importance(graph, seed), graph, ratio=1.0, rules=rules)
    kept = _kept_out(graph, dropped)
    assert all(k >= 0.75 * total for k, total in kept.values()), kept
    assert any(k < total for k, total in kept.values())


@pytest.mark.parametrize("seed", range(5))
def test_select_groups_rounds_kept_widths_of_wide_layers_to_multiples(seed: int) -> None:
    from pipeline.prune.plan import ROUND_MIN_BLOCKS

    model = _Tiny()
    graph, x = _graph(model)
    rules = SelectionRules(min_channels=1, round_to=4)  # layers >= 16 wide are rounded
    dropped = select_groups(_importance(graph, seed), graph, ratio=0.6, rules=rules)
    assert dropped
    pruned = _prune_exactly(model, graph, dropped, x)
    dense = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    widths = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    wide = {n for n, w in dense.items() if w >= ROUND_MIN_BLOCKS * 4}
    assert wide and all(widths[n] % 4 == 0 for n in wide), widths
    assert sum(widths.values()) < sum(dense.values())


def test_a_layer_narrower_than_four_multiples_keeps_its_exact_width() -> None:
    model = _Tiny()
    graph, x = _graph(model)
    importance = _importance(graph, 0)
    plain = select_groups(importance, graph, ratio=0.6, rules=SelectionRules(min_channels=1))
    rounded = select_groups(
        importance, graph, ratio=0.6, rules=SelectionRules(min_channels=1, round_to=64)
    )
    assert rounded == plain  # no layer of _Tiny is 256 wide: round_to=64 rounds none of them
