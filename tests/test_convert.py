import copy

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


class Clipped(nn.Module):
    """conv-BN-act-[maxpool]-conv-BN-ReLU-linear, with the activation after the first BN chosen."""

    def __init__(self, act):
        super().__init__()
        self.c1, self.b1, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act
        self.pool = nn.MaxPool2d(2)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.pool(self.act(self.b1(self.c1(x))))
        return self.fc(torch.relu(self.b2(self.c2(x))).mean((2, 3)))


ACTS = {
    "relu": (nn.ReLU(), True),
    "leaky_relu": (nn.LeakyReLU(0.1), True),
    "relu6": (nn.ReLU6(), False),
    "hardtanh": (nn.Hardtanh(-1.0, 1.0), False),
    "silu": (nn.SiLU(), False),
}


@pytest.mark.parametrize("act", ACTS)
def test_scale_moves_into_readers_only_through_homogeneous_ops(act):
    """Checked on a 0.1-scale example, dividing by alpha before a clip looked exact (4e-9)."""
    module, homogeneous = ACTS[act]
    model = _trained_like(Clipped(module))
    with torch.no_grad():
        model.b1.weight.copy_(torch.linspace(1.5, 4.0, 8))  # every channel needs alpha > 1
    small = 0.1 * torch.randn(2, 3, 12, 12)
    original = copy.deepcopy(model)
    report = convert_trained_to_bounded_(model, small)
    assert ("b1" in report.readers) == homogeneous
    assert ("b1" in report.variance) != homogeneous
    for scale in (0.1, 1.0, 3.0, 10.0):  # far past ReLU6's clip
        x = scale * torch.randn(2, 3, 12, 12)
        ref = original(x)
        assert (model(x) - ref).abs().max() <= 1e-5 * ref.abs().max(), scale


def test_homogeneity_is_structural():
    from pipeline.channel_graph import positively_homogeneous_bns

    assert positively_homogeneous_bns(Clipped(nn.ReLU())) == {"b1", "b2"}  # b2: ReLU, mean, fc
    assert positively_homogeneous_bns(Clipped(nn.ReLU6())) == {"b2"}
    resnet = torchvision.models.resnet18(num_classes=10)
    found = positively_homogeneous_bns(resnet)
    assert "layer1.0.bn1" in found and "layer1.0.bn2" not in found  # residual add
