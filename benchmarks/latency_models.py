"""Model factories for the latency-budget benchmark (``benchmarks/latency_budget.py``).

``mobilenet_v2_small`` is the MobileNetV2-class model of the benchmark: torchvision's
MobileNetV2 (inverted residuals, depthwise 3x3, ReLU6, widths rounded to multiples of 8) at
``width_mult=0.5``, with a stem for small grey images (``in_channels`` inputs, stride 1, so a
28-pixel Fashion-MNIST image keeps 28x28 in the first blocks instead of 14x14). Use it as a
user factory::

    PYTHONPATH=benchmarks recede run --set model.name=latency_models:mobilenet_v2_small ...
"""

from __future__ import annotations

from torch import nn


def mobilenet_v2_small(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """torchvision's MobileNetV2 at width 0.5 with a stride-1 stem of ``in_channels``."""
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5, num_classes=num_classes)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, 1, 1, bias=False)
    return model
