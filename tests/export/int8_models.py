"""Small models for the INT8 tests: one trained on the digits (its decisions depend on its
input, so an INT8 check on it can fail), one untrained, and one built to fail plain INT8.

Training takes a few seconds on two cores and is cached per test process.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DataConfig
from pipeline.data.datasets import DataBundle, load_data

SIZE = 16
SHAPE = (1, SIZE, SIZE)


class DigitsNet(nn.Module):
    """conv -> ReLU -> pool -> conv -> ReLU -> pool -> linear: a small classifier."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (SIZE // 4) ** 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


@functools.cache
def digits() -> DataBundle:
    return load_data(DataConfig(name="digits", image_size=SIZE), seed=0)


@functools.cache
@torch.enable_grad()  # callers may hold no_grad
def _trained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(6):
        for x, y in digits().train:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


def trained_digits_net() -> tuple[DigitsNet, DataBundle]:
    """A :class:`DigitsNet` trained to above 90% on the digits test split, and the data."""
    net = DigitsNet()
    net.load_state_dict(_trained_state())
    return net.eval(), digits()


@torch.no_grad()
def blind_digits_net() -> DigitsNet:
    """The trained net with its first convolution's weights zeroed: it ignores its input (every
    sample gets the same logits), so no accuracy check on it can tell a wrong model apart."""
    net, _ = trained_digits_net()
    net.c1.weight.zero_()
    return net.eval()


def _with_outlier(conv: nn.Conv2d, reader: nn.Module) -> tuple[nn.Conv2d, nn.Module]:
    """``conv`` with one more output channel, constant at 1000, and ``reader`` (a conv or the
    linear head over the flattened map) ignoring it."""
    width = conv.out_channels
    wider = nn.Conv2d(conv.in_channels, width + 1, 3, padding=1)
    wider.weight.zero_()
    wider.weight[:width] = conv.weight
    wider.bias[:width] = conv.bias
    wider.bias[width] = 1000.0
    if isinstance(reader, nn.Conv2d):
        read = nn.Conv2d(width + 1, reader.out_channels, 3, padding=1)
        read.weight.zero_()
        read.weight[:, :width] = reader.weight
    else:  # the head reads (width + 1) x 4 x 4 features, the new channel's last
        read = nn.Linear(reader.in_features + reader.in_features // width, reader.out_features)
        read.weight.zero_()
        read.weight[:, : reader.in_features] = reader.weight
    read.bias.copy_(reader.bias)
    return wider, read


@torch.no_grad()
def outlier_net(outliers: int = 1) -> DigitsNet:
    """The trained net with one more channel out of ``c1`` (and with ``outliers=2`` out of
    ``c2`` too), constant at 1000, that its reader ignores: the function is unchanged, but
    per-tensor INT8 of that output now has a step of about 4, which crushes every real channel
    (their range is a few units)."""
    net, _ = trained_digits_net()
    net.c1, net.c2 = _with_outlier(net.c1, net.c2)
    if outliers == 2:
        net.c2, net.fc = _with_outlier(net.c2, net.fc)
    return net.eval()


class DigitsBNNet(nn.Module):
    """:class:`DigitsNet` with BatchNorm after each conv: what ``recede prune`` can cut."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc = nn.Linear(2 * width * (SIZE // 4) ** 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


@functools.cache
@torch.enable_grad()
def _trained_bn_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = DigitsBNNet()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(4):
        for x, y in digits().train:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


def trained_bn_factory() -> DigitsBNNet:
    """A ``--model`` factory: the trained :class:`DigitsBNNet` (``recede prune --model
    tests.export.int8_models:trained_bn_factory --input-shape 1,1,16,16``)."""
    net = DigitsBNNet()
    net.load_state_dict(_trained_bn_state())
    return net.eval()


def digits_inputs(count: int) -> np.ndarray:
    """The first ``count`` digits training inputs, as a float32 array (a ``--calibration`` file)."""
    xs = [x for x, _ in digits().train.dataset]
    return np.stack([x.numpy() for x in xs[:count]]).astype(np.float32)
