"""Physical channel removal (``pipeline.prune.remove``): what it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.graph.channel_graph import build_channel_graph
from pipeline.prune.plan import PruneError, PrunePlan
from pipeline.prune.remove import remove_groups


def test_remove_groups_refuses_a_plan_from_another_graph():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    graph = build_channel_graph(model, x)
    plan = PrunePlan((10_000,), (), "ratio", None, 4, 4)
    with pytest.raises(PruneError, match="which this graph lacks"):
        remove_groups(model, graph, plan, x)
