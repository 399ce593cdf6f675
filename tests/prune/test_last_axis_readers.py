"""Removing BN channels that a Linear reads on the last axis, or that reach a reader through a
pooling or a resampling, is exact or refused with a setting that works; never a crash.

The class: a BN group read by a Linear over tokens ``(B, N, C)``, a channels-last map ``(B, H,
W, C)`` or a view, after permute, flatten or view (the absorption indexed axis 1 where the graph
reads the last axis: exit 2 "please report" or an IndexError); and a removed channel's constant
made position- and size-dependent by a zero-padded average pool, an adaptive pool or an
upsampling before its reader (a Linear bias or a 1x1 conv behind a global pool fixed at the
example's size: "this is a bug ... please report" at the larger size).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.graph.channel_graph import build_channel_graph
from pipeline.prune.absorb import larger_input
from pipeline.prune.remove import ExactnessError
from pipeline.prune.stage import PruneError, make_plan, remove_groups, zero_groups_
from tests.graph.random_nets import BLOCKS, RESAMPLING, RandomNet, drop_some, shift_bns_

LAST_AXIS = ("tokens", "channels_last", "view")


@torch.no_grad()
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _reference(net: nn.Module, graph, dropped: set[int]) -> nn.Module:
    """The zeroed model a removal must equal: scales zeroed, shifts too where not absorbable."""
    approximate = {g.id for g in graph.groups if g.id in dropped and not g.absorbable}
    return zero_groups_(copy.deepcopy(net).double(), graph, dropped, shifts=approximate)


_KINDS = st.lists(st.sampled_from(BLOCKS + RESAMPLING), max_size=2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=_KINDS,
    reader=st.sampled_from(LAST_AXIS),
    after=_KINDS,
    width=st.sampled_from([4, 8]),
    repeat=st.integers(1, 2),
    size=st.sampled_from([4, 6]),
    seed=st.integers(0, 2**16),
)
def test_last_axis_readers_are_exact_or_refused_naming_a_setting(
    before, reader, after, width, repeat, size, seed
):
    kinds = [*before, reader, *after]
    net = shift_bns_(RandomNet(kinds, width, repeat, groups=2), seed)
    x = torch.randn(2, 3, size, size)
    graph = build_channel_graph(net, x)
    dropped = drop_some(graph, seed)
    plan = make_plan(graph, dropped)
    try:
        pruned, report = remove_groups(net, graph, plan, x)
    except ExactnessError as err:  # a bug: never the answer to an input
        pytest.fail(f"removal was not exact: {err}")
    except PruneError as err:  # only a constant moved by a pooling or a resampling
        assert any(k in RESAMPLING for k in kinds), err
        event("refused, then removed with exact_borders=false")
        assert "prune.exact_borders=false" in str(err) and "--no-exact-borders" in str(err)
        pruned, report = remove_groups(net, graph, plan, x, exact_borders=False)
        assert report.max_border_err > 0  # the setting works and reports what it leaves
        return
    reference, maps = _reference(net, graph, dropped), {f for _, f in report.corrections} & {"map"}
    for probe in (x.double(), larger_input(x).double()):
        try:
            out = pruned.double()(probe)
        except RuntimeError as err:  # a per-position map refuses another size, by design
            assert maps and "deployment input size" in str(err)
            event("exact at the example's size, other sizes refused")
            continue
        assert _rel(out, reference(probe)) <= 1e-6
    assert report.max_rel_err <= 1e-6
    event("exact")


def _token_net(layout: str) -> nn.Module:
    net = shift_bns_(RandomNet([layout], width=8, repeat=1, groups=2), seed=0)
    with torch.no_grad():
        net.stem[1].weight[[1, 5]] = 0.0  # zero scales: these channels emit relu(shift)
    return net


@pytest.mark.parametrize("layout", LAST_AXIS)
def test_zero_scale_channels_read_on_the_last_axis_are_absorbed_into_the_bias(layout):
    # exit 2 "(please report)" for tokens and views, an IndexError (exit 1) for channels last
    net, x = _token_net(layout), torch.randn(2, 3, 6, 6)
    graph = build_channel_graph(net, x)
    dropped = {g.id for g in graph.removable_groups if ("stem.1", 1) in g.bn_channels}
    dropped |= {g.id for g in graph.removable_groups if ("stem.1", 5) in g.bn_channels}
    pruned, report = remove_groups(net, graph, make_plan(graph, dropped), x)
    assert pruned.blocks[0].fc.in_features == 6 and ("blocks.0.fc", "bias") in report.corrections
    assert _rel(pruned(x), net(x)) < 1e-5  # zero scales: the pruned model is the trained one
