"""torchvision's detectors by name: the part a graph can hold, wrapped so recede can prune it.

A torchvision detector (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite) is a
pipeline, not a graph: it resizes and normalises a list of images of any size into a batch
(``transform``), runs the backbone (with its FPN) and the dense heads, then makes anchors,
decodes boxes, thresholds scores and runs NMS, and a two-stage detector pools features at the
proposals it chose (``roi_heads``). Everything after the dense heads depends on the data (how
many boxes survive), which no static graph holds; none of it has BatchNorm channels to prune.

So ``torchvision:<detector>`` builds a :class:`DetectorTrunk`: a module holding the whole
untrained detector (``weights=None, weights_backbone=None``: nothing is downloaded) whose
``forward`` runs only the traceable part on a batch as the backbone sees it (already
normalised and resized) and returns a dict:

- ``features``: the backbone's feature maps by level (``features.0`` ... ``features.pool``),
  what ``roi_heads`` pools from;
- one-stage (RetinaNet, FCOS, SSD, SSDlite): the head's outputs as torchvision names them
  (``cls_logits``, ``bbox_regression``, FCOS's ``bbox_ctrness``), concatenated over levels;
- two-stage (R-CNNs): the RPN head's ``objectness`` and ``box_deltas``, one tensor per level.

Pruning, folding, ONNX export and verification work on that dict like on any model with several
outputs. The modules outside it are **kept whole** (:func:`kept_whole` says which and why, and
``recede prune`` prints it); they stay inside ``trunk.detector``, which therefore remains a
complete detector with the pruned backbone: ``trunk.detector(images)`` gives boxes, scores and
labels as torchvision's does. A head shared by every level (the RPN head, RetinaNet's and
FCOS's heads) is one layer called once per level; the channel graph keeps its channels whole
(one set of weights must serve every level) and reports it as a barrier.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DETECTORS = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "keypointrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
)

_DATA_DEPENDENT = (
    "its output depends on how many boxes survive (data-dependent), which no static graph holds"
)
_WHY = {
    "transform": (
        "resizes and normalises a list of images of any size into one batch; the trunk takes "
        "that batch, and the detector runs it before the backbone"
    ),
    "anchor_generator": "anchors depend only on the feature sizes: no weights to prune",
    "rpn.anchor_generator": "anchors depend only on the feature sizes: no weights to prune",
    "rpn": f"proposal selection (top-k per level, NMS): {_DATA_DEPENDENT}; its head is pruned",
    "roi_heads": (
        "reads features pooled (RoIAlign) at the proposals the RPN chose at run time: "
        f"{_DATA_DEPENDENT}; box, mask and keypoint heads alike"
    ),
    "postprocess_detections": f"box decoding, score threshold and NMS: {_DATA_DEPENDENT}",
}


class DetectorTrunk(nn.Module):
    """The traceable part of a torchvision detector: backbone (+FPN) and dense heads (see the
    module docstring). ``detector`` is the whole detector, pruned where the trunk was."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.two_stage = hasattr(detector, "rpn")

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        features = self.detector.backbone(images)  # an OrderedDict of levels, or one tensor
        if not isinstance(features, Mapping):  # a tensor, or a Proxy of one under torch.fx
            features = OrderedDict([("0", features)])
        levels = list(features.values())
        if self.two_stage:
            objectness, deltas = self.detector.rpn.head(levels)
            return {"features": features, "objectness": objectness, "box_deltas": deltas}
        return {"features": features, **self.detector.head(levels)}


def kept_whole(model: nn.Module) -> dict[str, str]:
    """The modules of ``model`` outside its traced part, and why (empty for other models)."""
    if not isinstance(model, DetectorTrunk):
        return {}
    names = {n for n, _ in model.detector.named_children()} | {"postprocess_detections"}
    names |= {f"rpn.{n}" for n, _ in getattr(model.detector, "rpn", nn.Module()).named_children()}
    return {f"detector.{n}": why for n, why in _WHY.items() if n in names}


def build_detector(name: str, num_classes: int) -> DetectorTrunk:
    """The untrained torchvision detector ``name`` with ``num_classes`` classes (background
    included: 91 for COCO), as a :class:`DetectorTrunk`."""
    import torchvision

    kwargs = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    return DetectorTrunk(torchvision.models.get_model(name, **kwargs))
