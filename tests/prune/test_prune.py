"""The prune stage's result (``pipeline.prune.stage``): the counts both commands report."""

from __future__ import annotations

import json

import torch

from pipeline.config import PruneConfig
from pipeline.prune.stage import prune_model
from tests.conftest import tiny_net_random_bn


def test_prune_summary_counts_what_the_plan_dropped_as_the_repr_says() -> None:
    model, x = tiny_net_random_bn().eval(), torch.randn(1, 3, 16, 16)
    result = prune_model(model, x, PruneConfig(threshold="ratio", ratio=0.5, min_channels=1))
    summary = result.report()
    assert 0 < summary.dropped <= summary.prunable <= summary.total
    assert f"dropped {summary.dropped} of {summary.prunable} prunable groups" in repr(result)
    assert summary.dropped == len(result.plan.dropped_groups)
    assert (summary.threshold_mode, summary.threshold_value) == (
        "ratio",
        result.plan.threshold_value,
    )
    assert json.loads(json.dumps(summary.barriers)) == summary.barriers  # report.json-ready
