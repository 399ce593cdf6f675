"""torchvision's semantic segmentation models by name (``torchvision:lraspp_mobilenet_v3_large``).

FCN, DeepLabV3 and LR-ASPP are built untrained (``weights=None, weights_backbone=None``: nothing
is downloaded) with the run's class count. Each returns what torchvision's does, an
``OrderedDict`` with ``out`` (``[N, classes, H, W]``, at the input's size) and, with
``aux_loss``, ``aux``; recede treats both as named outputs (``pipeline.core.outputs``). The
whole model is one graph: the backbone's feature getter, the ASPP/LR-ASPP heads and the final
upsampling all trace, so everything with a BatchNorm is prunable.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)

SEGMENTERS = (
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet101",
    "deeplabv3_resnet50",
    "fcn_resnet101",
    "fcn_resnet50",
    "lraspp_mobilenet_v3_large",
)


def build_segmenter(name: str, num_classes: int, *, aux_loss: bool = False) -> nn.Module:
    """The untrained torchvision segmenter ``name`` with ``num_classes`` classes.

    Args:
        name: One of :data:`SEGMENTERS`.
        num_classes: Classes of the ``out`` map (21 for Pascal VOC).
        aux_loss: Add the auxiliary head (output ``aux``) FCN and DeepLabV3 train with.
    """
    import torchvision

    kwargs = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if aux_loss and not name.startswith("lraspp"):  # LR-ASPP has no auxiliary head
        kwargs["aux_loss"] = True
    return torchvision.models.get_model(name, **kwargs)
