"""The Python prune result: a one-line repr and a summary() table whose totals are the counters'."""

from __future__ import annotations

import torch

from pipeline.config import PruneConfig
from pipeline.graph.costs import count_layer_macs, count_macs, count_params
from pipeline.prune.layer_table import human, percent
from pipeline.prune.stage import prune_model
from tests.conftest import tiny_net_random_bn


def test_pruned_repr_is_one_short_line_and_summary_is_the_table() -> None:
    model, x = tiny_net_random_bn().eval(), torch.randn(1, 3, 16, 16)
    result = prune_model(model, x, PruneConfig(threshold="ratio", ratio=0.5, min_channels=1))
    text = repr(result)
    assert "\n" not in text and len(text) < 200 and "prunable groups" in text
    lines = result.summary().splitlines()
    total = next(line.split() for line in lines if line.startswith("total (whole model)"))
    before, after = count_params(model), count_params(result.model)
    assert total[3:6] == [human(before), human(after), percent(after, before)]
    macs = f"MACs {human(count_macs(model, (3, 16, 16)))} -> {human(count_macs(result.model, (3, 16, 16)))}"
    assert macs in lines[-1]


def test_layer_macs_add_up_to_the_whole() -> None:
    model = tiny_net_random_bn().eval()
    macs = count_layer_macs(model, (3, 16, 16))
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    assert macs[""] == count_macs(model, (3, 16, 16)) == sum(macs.get(n, 0) for n in leaves)
    assert macs["stem.0"] == 8 * 3 * 9 * 16 * 16  # out x in x kernel x positions
