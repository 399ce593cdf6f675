"""docs/python-api.md's own-loop examples for dense tasks run as written and do what they say:
segmentation (pixel cross-entropy, mean IoU) and detection (torchvision's Faster R-CNN losses),
each on tiny synthetic data the block makes. Before, neither example existed, and the detection
one failed: ``DetectorTrunk`` could not be traced around a backbone returning one tensor (as
torchvision's own custom-backbone example does: 'Proxy object cannot be iterated')."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pipeline.models.detection import DetectorTrunk

PAGE = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"
BLOCK = re.compile(r"<!-- (\w+) loop -->\n```python\n(.*?)```", re.S)


def _run(kind: str, monkeypatch, tmp_path) -> dict:
    blocks = dict(BLOCK.findall(PAGE.read_text()))
    assert set(blocks) == {"segmentation", "detection"}, "python-api.md lost a dense-task example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "docs_block"}
    exec(compile(blocks[kind], str(PAGE), "exec"), scope)
    return scope


def test_segmentation_example_learns_and_measures_mean_iou(monkeypatch, tmp_path, capsys):
    scope = _run("segmentation", monkeypatch, tmp_path)
    losses = scope["losses"]
    assert len(losses) == 40 and losses[-1] < 0.2 * losses[0]
    assert scope["miou"] > 0.8  # the synthetic shapes are easy: a loop that does not learn fails
    assert scope["pruned"].removal.check.verdict == "ok"
    assert "mean IoU" in capsys.readouterr().out
    mean_iou, val_y = scope["mean_iou"], scope["val_y"]
    perfect = torch.nn.functional.one_hot(val_y, 3).permute(0, 3, 1, 2).float()
    assert mean_iou(perfect, val_y) == 1.0
    shifted = perfect.roll(1, dims=1)  # every pixel given the next class: no overlap anywhere
    assert mean_iou(shifted, val_y) == 0.0


def test_detection_example_trains_with_torchvision_losses_and_prunes(monkeypatch, tmp_path):
    scope = _run("detection", monkeypatch, tmp_path)
    assert set(scope["losses"]) == {
        "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
    }  # fmt: skip
    history = scope["history"]
    assert len(history) == 12 and history[-1] < history[0]
    pruned = scope["pruned"]
    assert pruned.removal.check.verdict == "ok"
    assert pruned.plan.dropped_groups, "a 30% ratio removed nothing"
    assert {"boxes", "scores", "labels"} <= set(scope["detections"][0])


@pytest.mark.parametrize("tensor_backbone", [True, False])
def test_a_trunk_traces_whatever_its_backbone_returns(tensor_backbone):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    class Backbone(torch.nn.Sequential):
        def forward(self, x):
            y = super().forward(x)
            return y if tensor_backbone else {"p3": y}

    backbone = Backbone(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8))
    backbone.out_channels = 8
    anchors = AnchorGenerator(((16,),), ((1.0,),))
    trunk = DetectorTrunk(RetinaNet(backbone, 2, anchor_generator=anchors)).eval()
    from pipeline.graph.channel_graph import build_channel_graph

    graph = build_channel_graph(trunk, torch.randn(1, 3, 32, 32))
    assert "detector.backbone.0" in graph.layers
