"""torchvision's segmenters and detectors by name (``torchvision:<name>``), untrained and without
downloads: a segmenter as torchvision builds it, a detector as its traceable trunk
(``pipeline.models.detection``) with the rest kept whole and named. Before, every one of these
names exited 2 with "unknown torchvision model"."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.core.outputs import flatten
from pipeline.models.detection import DETECTORS, DetectorTrunk, kept_whole
from pipeline.models.segmentation import SEGMENTERS
from pipeline.models.zoo import ModelError, build_model


def _build(name: str, classes: int) -> torch.nn.Module:
    return build_model(ModelConfig(name=f"torchvision:{name}"), num_classes=classes, in_channels=3)


def test_every_segmenter_and_detector_is_listed_by_torchvision():
    import torchvision

    models = torchvision.models
    assert set(SEGMENTERS) == set(models.list_models(module=models.segmentation))
    assert set(DETECTORS) == set(models.list_models(module=models.detection))


def test_a_segmenter_returns_its_class_map_by_name():
    model = _build("lraspp_mobilenet_v3_large", 5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert isinstance(out, OrderedDict)
    assert {n: tuple(t.shape) for n, t in flatten(out).items()} == {"out": (1, 5, 64, 64)}


@pytest.mark.parametrize(
    ("name", "heads"),
    [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", {"objectness", "box_deltas"}),
        ("ssdlite320_mobilenet_v3_large", {"cls_logits", "bbox_regression"}),
    ],
)
def test_a_detector_is_its_trunk_with_the_rest_kept_whole(name, heads):
    model = _build(name, 3).eval()
    assert isinstance(model, DetectorTrunk)
    with torch.no_grad():
        leaves = flatten(model(torch.randn(1, 3, 128, 128)))
    assert any(n.startswith("features.") for n in leaves)
    assert {n.split(".")[0] for n in leaves} == {"features", *heads}
    whole = kept_whole(model)
    assert "detector.transform" in whole and "detector.postprocess_detections" in whole
    assert ("detector.roi_heads" in whole) == model.two_stage
    with torch.no_grad():  # the whole detector is still there, boxes, scores and labels
        detections = model.detector([torch.rand(3, 128, 128)])
    assert {"boxes", "scores", "labels"} <= set(detections[0])


def test_no_weights_are_asked_for():
    model = _build("fcn_resnet50", 3)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(type(m) is torch.nn.BatchNorm2d for m in bns)  # not FrozenBatchNorm2d
    assert all(bool((m.running_var == 1).all()) for m in bns)  # untrained statistics


def test_an_unknown_name_lists_segmenters_and_detectors():
    with pytest.raises(ModelError, match="segmenters: deeplabv3_mobilenet_v3_large.*detectors:"):
        _build("fcn_resnet18", 3)
    with pytest.raises(ModelError, match="takes 3 input channels"):
        build_model(ModelConfig(name="torchvision:fcn_resnet50"), num_classes=3, in_channels=1)


@pytest.mark.parametrize(
    ("spec", "classes"),
    [
        ("torchvision:lraspp_mobilenet_v3_large", 21),
        ("torchvision:fcn_resnet50", 21),
        ("torchvision:ssdlite320_mobilenet_v3_large", 91),
        ("torchvision:retinanet_resnet50_fpn", 91),
        ("torchvision:resnet18", 1000),
        ("timm:resnet18", 1000),
        ("vgg", 1000),
    ],
)
def test_without_num_classes_a_model_gets_its_familys_default(spec, classes):
    import argparse

    from pipeline.cli.main import _build

    if spec == "torchvision:lraspp_mobilenet_v3_large":  # and the model is built with them
        model, _ = _build(argparse.Namespace(model=spec, num_classes=None), (3, 64, 64))
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 3, 64, 64))["out"].shape[1] == classes
    from pipeline.models.zoo import default_num_classes

    assert default_num_classes(spec) == classes
