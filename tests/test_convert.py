import pytest
import torch
import torchvision
from torch import nn

from pipeline.bounded_bn import BoundedBatchNorm2d
from pipeline.convert import convert_trained_to_bounded_


def _trained_like(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(
                    torch.rand(m.weight.shape, generator=g) * 3 - 0.8
                )  # negatives and > 1
                m.weight[0] = 0.0
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_model_keeps_its_function(name):
    model = _trained_like(torchvision.models.get_model(name, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    report = convert_trained_to_bounded_(model, x)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    bounded = [m for m in model.modules() if isinstance(m, BoundedBatchNorm2d)]
    assert all(float(m.importance.max()) < 1 for m in bounded)
    assert report.flipped_channels > 0 and report.readers  # both mechanisms were exercised
    assert (model(x) - before).abs().max() <= 1e-5 * before.abs().max()


def test_residual_bn_falls_back_to_the_variance_route():
    model = _trained_like(torchvision.models.resnet18(num_classes=10))
    report = convert_trained_to_bounded_(model, torch.randn(2, 3, 64, 64))
    assert "layer1.0.bn2" in report.variance  # feeds a residual add: readers route not exact
    assert "layer1.0.bn1" in report.readers  # BN -> ReLU -> conv: readers route exact
