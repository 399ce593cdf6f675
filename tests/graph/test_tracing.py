"""Tracing (``pipeline.graph.tracing``): what torch.fx cannot trace is kept whole as a leaf, and only
that part is pinned in the channel graph."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.graph.channel_graph import GraphError, build_channel_graph
from pipeline.graph.tracing import trace_with_leaves

ROOT = Path(__file__).resolve().parents[2]
X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


class Gated(nn.Module):
    """A data-dependent branch fx cannot trace."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.conv(x) if x.mean() > 0 else x


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.gate = Gated(8)
        self.c = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.c(self.gate(self.b(self.a(x))))
        return self.fc(x.mean((2, 3)))


def test_tracing_fallback_pins_only_the_untraceable_part() -> None:
    model = WithGate().eval()
    _, leaves = trace_with_leaves(model)
    assert list(leaves) == ["gate"] and "control flow" in leaves["gate"]
    # Traced with values, the opaque gate runs as plain code: its conv is no node of the graph.
    # In a fresh process: the first such trace in a process is the one that went wrong.
    code = (
        "from test_tracing import WithGate, X\n"
        "from pipeline.graph.tracing import trace_with_leaves\n"
        "gm, leaves = trace_with_leaves(WithGate().eval(), X[:1])\n"
        "print(list(leaves), [n.target for n in gm.graph.nodes if n.op == 'call_module'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "graph")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = ["a.0", "a.1", "a.2", "b.0", "b.1", "b.2", "gate", "c.0", "c.1", "c.2", "fc"]
    assert done.stdout.strip() == f"['gate'] {calls}"
    graph = build_channel_graph(model, X)
    assert [b.module for b in graph.barriers] == ["gate"]
    assert "torch.fx cannot trace it" in graph.barriers[0].op
    gated = {name for g in graph.prunable_groups for name, _ in g.bn_channels}
    assert gated == {"a.1", "c.1"}  # b.1 feeds the opaque gate: pinned


class ShapeBranch(nn.Module):
    """timm's VGG ``ConvMlp``: a branch on the input's spatial size."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 8, 3)

    def forward(self, x):
        if x.shape[-2] < 7 or x.shape[-1] < 7:
            x = F.adaptive_avg_pool2d(x, (7, 7))
        return self.conv(x)


class WithShapeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.mlp = ShapeBranch(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.mlp(self.a(x))).mean((2, 3)))


def test_shape_branches_trace_with_the_example_shapes() -> None:
    """A branch on shapes resolves from the example; without one the module is kept whole."""
    model = WithShapeBranch().eval()
    _, leaves = trace_with_leaves(model)
    assert list(leaves) == ["mlp"]
    _, leaves = trace_with_leaves(model, X[:1])
    assert not leaves
    graph = build_channel_graph(model, X)
    assert not graph.barriers
    assert {g.id for g in graph.weight_groups} == set(graph.layers["mlp.conv"].out_groups)
    assert {n for g in graph.prunable_groups for n, _ in g.bn_channels} == {"a.1"}
    assert not list(model.named_children())[3:], "tracing added modules to the model"


def test_untraceable_root_is_refused() -> None:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x) if x.sum() > 0 else x

    with pytest.raises(GraphError, match="could not trace Root"):
        build_channel_graph(Root().eval(), X)


class SizeOf(nn.Module):
    """A branch on shapes (so only the tracer with values traces it), then ``x.size(dim)``
    used as a number: timm's BAT blocks read ``x.size(0)`` this way."""

    def __init__(self, dim: int, keyword: bool) -> None:
        super().__init__()
        self.dim, self.keyword = dim, keyword
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.shape[-1] > 100:
            y = y[..., :100]
        n = y.size(dim=self.dim) if self.keyword else y.size(self.dim)
        return self.fc(y.reshape(y.shape[0], 4, -1).mean(-1) * (n + y.size(self.dim)))


@pytest.mark.parametrize("keyword", [False, True])
@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1, -2, -3, -4])
def test_size_of_every_dim_is_traced_as_that_size(dim, keyword) -> None:
    # MetaProxy.size(0) tested `if dim` and returned the whole shape: timm:bat_resnext26ts at
    # 256 px failed with a TypeError
    model = SizeOf(dim, keyword).eval()
    x = torch.randn(1, 3, 5, 7)
    gm, leaves = trace_with_leaves(model, x)
    assert not leaves
    assert torch.equal(gm(x), model(x))
    assert build_channel_graph(model, x).prunable_groups
