import copy

import pytest
import torch
import torchvision
from sensitivity import calibrate_bn_, channel_sensitivity
from torch import nn

from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.train.convert import ConversionError, convert_trained_to_bounded_

RTOL = 1e-5  # of the output scale
RTOL64 = 1e-9  # in float64, where only the conversion's own error remains


def _trained_like(model, seed=0, size=64):
    """Trained-looking BN affine terms (negatives, > 1, an exact 0), statistics from random data.

    Calibrated statistics keep the untrained model responsive to its input (made-up ones left
    mobilenet_v2's output almost constant, so any conversion error passed).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(
                    torch.rand(m.weight.shape, generator=g) * 3 - 0.8
                )  # negatives and > 1
                m.weight[0] = 0.0
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    return calibrate_bn_(model, (8, in_channels, size, size), g)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_model_keeps_its_function(name):
    """Converted in float64: fp32 rounding alone moves a responsive mobilenet_v2 by 1.5e-5."""
    model = _trained_like(torchvision.models.get_model(name, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    zero = frozenset((n, 0) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert min(channel_sensitivity(model, x, zero)) > RTOL  # responsive; RTOL64 is far below
    model, x = model.double(), x.double()
    before = model(x)
    report = convert_trained_to_bounded_(model, x)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    bounded = [m for m in model.modules() if isinstance(m, BoundedBatchNorm2d)]
    assert all(float(m.importance.max()) < 1 for m in bounded)
    assert all(m.weight.dtype == torch.float64 for m in bounded)
    assert report.flipped_channels > 0 and report.readers and report.producer
    assert (model(x) - before).abs().max() <= RTOL64 * before.abs().max()


def test_residual_bn_falls_back_to_the_producer_route():
    model = _trained_like(torchvision.models.resnet18(num_classes=10))
    report = convert_trained_to_bounded_(model, torch.randn(2, 3, 64, 64))
    assert "layer1.0.bn2" in report.producer  # feeds a residual add: readers route not exact
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
    assert ("b1" in report.producer) != homogeneous
    for scale in (0.1, 1.0, 3.0, 10.0):  # far past ReLU6's clip
        x = scale * torch.randn(2, 3, 12, 12)
        ref = original(x)
        assert (model(x) - ref).abs().max() <= 1e-5 * ref.abs().max(), scale


def test_homogeneity_is_structural():
    from pipeline.graph.channel_graph import positively_homogeneous_bns

    assert positively_homogeneous_bns(Clipped(nn.ReLU())) == {"b1", "b2"}  # b2: ReLU, mean, fc
    assert positively_homogeneous_bns(Clipped(nn.ReLU6())) == {"b2"}
    resnet = torchvision.models.resnet18(num_classes=10)
    found = positively_homogeneous_bns(resnet)
    assert "layer1.0.bn1" in found and "layer1.0.bn2" not in found  # residual add


class PooledBN(nn.Module):
    """conv -> maxpool -> BN -> ReLU6 -> conv: no conv feeds the BN, no homogeneous path."""

    def __init__(self):
        super().__init__()
        self.c1, self.pool, self.bn = (
            nn.Conv2d(3, 4, 3, padding=1),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(4),
        )
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(nn.functional.relu6(self.bn(self.pool(self.c1(x)))))


def test_variance_route_is_exact_or_refuses():
    model = _trained_like(PooledBN(), size=8)
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([2.0, 3.0, 0.5, 1.5]))
    x = torch.randn(2, 3, 8, 8)
    original = copy.deepcopy(model)
    report = convert_trained_to_bounded_(model, x)
    assert report.variance == ("bn",)
    y = 3 * x
    assert (model(y) - original(y)).abs().max() <= RTOL * original(y).abs().max()
    tiny = copy.deepcopy(original)
    with torch.no_grad():
        tiny.bn.running_var[1] = 1e-6  # (1e-6 + eps) / alpha^2 - eps < 0
    with pytest.raises(ConversionError, match="bn: channel 1 .* too small to carry the factor"):
        convert_trained_to_bounded_(tiny, x)


def test_a_sign_flip_carries_the_corrections_of_an_earlier_prune():
    """Negating a conv that carries constant corrections must negate them too (1.3e-1 before)."""
    from pipeline.config import PruneConfig
    from pipeline.layers.corrected_conv import corrections
    from pipeline.prune.stage import prune_model

    model, x = _trained_like(Clipped(nn.ReLU()), size=12), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        model.b1.bias.abs_()  # the dropped channels' constants pass the ReLU
    cfg = PruneConfig(threshold="ratio", ratio=0.4, min_channels=1)
    pruned = prune_model(model, x, cfg).model
    assert corrections(pruned.c2)  # b1's dropped shifts live on in c2
    with torch.no_grad():
        pruned.b2.weight.copy_(torch.linspace(-1.5, 0.5, pruned.b2.num_features))
    original = copy.deepcopy(pruned)
    report = convert_trained_to_bounded_(pruned, x)
    assert report.flipped_channels > 0
    y = 3 * x
    assert (pruned(y) - original(y)).abs().max() <= RTOL * original(y).abs().max()
