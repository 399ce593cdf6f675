"""The latency model as data: axis points, interpolation (exact and smooth, alignment classes),
kept groups to widths, and the JSON round trip. No timing here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ModelConfig
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.graph.latency_cost import (
    Blocking,
    KeptLatency,
    LatencyModel,
    LayerTable,
    axis_points,
    ceil_to,
    latency_share,
    layer_widths,
)
from pipeline.models.zoo import build_model

BLOCKS = Blocking(align=16, quantum=4)


def fast_cost(cin: float, cout: float) -> float:
    """A bilinear cost: what a table must reproduce exactly on its aligned grid."""
    return 0.01 + 0.002 * cin + 0.001 * cout + 3e-5 * cin * cout


def slow_cost(cin: float, cout: float) -> float:
    return 2.0 * fast_cost(cin, cout) + 0.05


def table_of(full_in: int, full_out: int, kind: str = "conv") -> LayerTable:
    """A table measured from ``fast_cost`` (fast input widths) and ``slow_cost`` (others)."""
    ins = axis_points(full_in, BLOCKS.align, BLOCKS.quantum, True)
    if kind == "depthwise":
        ms = tuple((fast_cost(c, c) if BLOCKS.fast(c) else slow_cost(c, c),) for c in ins)
        return LayerTable("dw", kind, full_in, full_out, ins, (), ms)
    outs = tuple(
        p
        for p in axis_points(full_out, BLOCKS.align, BLOCKS.quantum, True)
        if p % BLOCKS.align == 0 or p == full_out
    )
    ms = tuple(
        tuple(fast_cost(ci, co) if BLOCKS.fast(ci) else slow_cost(ci, co) for co in outs)
        for ci in ins
    )
    return LayerTable("conv", kind, full_in, full_out, ins, outs, ms)


def test_axis_points_hold_both_classes_and_the_full_width():
    points = axis_points(256, 16, 4, True)
    assert points[-1] == 256 and 16 in points
    aligned = [p for p in points if p % 16 == 0]
    slow = [p for p in points if p % 4]
    assert len(aligned) >= 4 and len(slow) == 3 and max(slow) == 255 and min(slow) <= 17
    assert axis_points(256, 16, 4, prunable=False) == (256,)  # a fixed axis: one point
    assert all(p % 3 == 0 for p in axis_points(96, 16, 4, True, multiple=3))  # grouped conv


@settings(max_examples=60, deadline=None)
@given(
    full_in=st.integers(33, 300),
    full_out=st.integers(33, 300),
    cin=st.integers(1, 300),
    cout=st.integers(1, 300),
)
def test_exact_reading_pads_fast_widths_and_keeps_slow_ones_on_their_own_grid(
    full_in, full_out, cin, cout
):
    """Any table of a bilinear cost: a fast input width reads the aligned grid at its padded
    width (exact: bilinear interpolation reproduces a bilinear cost), a slow one the slow grid
    at its own width; a fast output width is padded too."""
    cin, cout = min(cin, full_in), min(cout, full_out)
    t = table_of(full_in, full_out)
    got = t.latency_ms(cin, cout, BLOCKS, exact=True)
    pad_out = BLOCKS.padded(cout, full_out) if BLOCKS.fast(cout) else cout
    if cin in t.in_points and not BLOCKS.fast(cin):
        want = slow_cost(cin, pad_out)
    elif BLOCKS.fast(cin):
        want = fast_cost(BLOCKS.padded(cin, full_in), pad_out)
    else:
        want = slow_cost(cin, pad_out)
    assert got == pytest.approx(max(0.0, want), rel=1e-9, abs=1e-12)


def test_a_slow_width_costs_the_slow_grid_and_a_fast_one_its_block():
    t = table_of(128, 128)
    assert t.latency_ms(63, 128, BLOCKS) == pytest.approx(slow_cost(63, 128))
    assert t.latency_ms(60, 128, BLOCKS) == pytest.approx(fast_cost(64, 128))  # 60 pads to 64
    assert t.latency_ms(52, 128, BLOCKS) == pytest.approx(fast_cost(64, 128))
    assert t.latency_ms(63, 128, BLOCKS) > t.latency_ms(64, 128, BLOCKS)  # alignment is seen


def test_smooth_reading_is_continuous_and_adds_half_a_block():
    t = table_of(128, 96)
    values = [t.latency_ms(w / 4, 96, BLOCKS, exact=False) for w in range(20, 513)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:], strict=False))  # monotone
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert max(steps) < 0.01  # no jump: a half-receded group moves it by a little
    assert t.latency_ms(40.0, 96, BLOCKS, exact=False) == pytest.approx(fast_cost(47.5, 96))
    assert t.latency_ms(128.0, 96, BLOCKS, exact=False) == pytest.approx(fast_cost(128, 96))


def test_depthwise_tables_have_one_axis():
    t = table_of(96, 96, "depthwise")
    assert t.latency_ms(48, 48, BLOCKS) == pytest.approx(fast_cost(48, 48))
    assert t.latency_ms(47, 47, BLOCKS) == pytest.approx(slow_cost(47, 47), rel=0.05)


def test_a_table_refuses_a_grid_of_the_wrong_shape():
    with pytest.raises(ValueError, match="2x1 grid"):
        LayerTable("x", "conv", 32, 32, (16, 32), (32,), ((1.0,),))


def _model_and_latency(width: float = 0.125):
    model = build_model(ModelConfig(name="vgg", width=width), num_classes=10, in_channels=3)
    x = torch.randn(2, 3, 16, 16)
    graph = build_channel_graph(model.eval(), x[:1])
    layers = []
    for name, (cin, cout) in layer_widths(model).items():
        kind = "depthwise" if graph.layers[name].depthwise else "conv"
        t = table_of(cin, cout, kind)
        layers.append(LayerTable(name, kind, cin, cout, t.in_points, t.out_points, t.ms))
    deployment = {
        "backend": "fake",
        "device": "cpu",
        "precision": "fp32",
        "batch": 1,
        "threads": 1,
        "clock": "cpu",
    }
    return model, x, graph, LatencyModel(tuple(layers), 16, 4, 0.02, 1.5, deployment)


def test_kept_latency_follows_the_groups_through_the_graph():
    model, _, graph, latency = _model_and_latency(0.5)
    ids = tuple(g.id for g in graph.removable_groups)
    cost = KeptLatency(graph, latency, ids)
    assert cost.dense == pytest.approx(latency.dense_ms)
    kept = torch.ones(len(ids))
    first_conv = graph.layers["features.0"]
    kept[[ids.index(g) for g in first_conv.out_groups[:10]]] = 0.0
    widths = cost.widths(kept)
    assert widths["features.0"] == (3, len(first_conv.out_groups) - 10)
    assert widths["features.4"][0] == len(graph.layers["features.4"].in_groups) - 10
    assert cost.removed_share(kept) > 0
    kept[[ids.index(g) for g in first_conv.out_groups[10:12]]] = 0.5  # half-way counts half
    assert cost.removed_share(kept) > cost.removed_share(torch.where(kept == 0.5, 1.0, kept))
    kept[[ids.index(g) for g in first_conv.out_groups[10:12]]] = 1.0
    assert cost.removed_share(torch.zeros(len(ids))) > cost.removed_share(kept)
    assert latency_share(cost, cost.dense / 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not below the dense"):
        latency_share(cost, cost.dense * 1.01)


def test_kept_latency_refuses_a_table_of_another_model():
    _, _, _, latency = _model_and_latency(0.125)
    other = build_model(ModelConfig(name="vgg", width=0.25), num_classes=10, in_channels=3)
    graph = build_channel_graph(other.eval(), torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="measured for another model"):
        KeptLatency(graph, latency, tuple(g.id for g in graph.removable_groups))


def test_latency_model_round_trips_through_json():
    _, _, _, latency = _model_and_latency()
    again = LatencyModel.from_dict(latency.to_dict())
    assert again == latency
    with pytest.raises(ValueError, match="schema"):
        LatencyModel.from_dict({**latency.to_dict(), "schema": 99})


def test_ceil_to():
    assert [ceil_to(w, 16) for w in (1, 16, 17, 32.0, 33.5)] == [16, 16, 32, 32, 48]
    assert math.isclose(Blocking(16, 4).smooth(10, 128), 17.5)
