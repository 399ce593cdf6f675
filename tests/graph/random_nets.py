"""Random small nets whose BN channels reach every reader kind the channel graph accepts.

Plain, grouped and depthwise convs; Linears over the last axis of tokens ``(B, N, C)`` (flatten
and transpose), of a channels-last map ``(B, H, W, C)`` (permute) and of a view; a zero-padded
average pool, an adaptive pool and an upsampling, which make a removed channel's constant depend
on position and input size; and one block called several times. ``hook_macs`` counts MACs the way
a forward hook sees them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCKS = (
    "conv", "grouped", "depthwise", "maxpool", "tokens", "channels_last", "view",
)  # fmt: skip
RESAMPLING = ("avgpool", "adaptive", "upsample")


def hook_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of one sample, from forward hooks on every conv and linear call."""
    total, hooks = [0], []

    def conv(m: nn.Conv2d, _: tuple, out: torch.Tensor) -> None:
        kh, kw = m.kernel_size
        total[0] += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear(m: nn.Linear, _: tuple, out: torch.Tensor) -> None:
        total[0] += out.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return total[0]


class TokenMixer(nn.Module):
    """BN channels read by a Linear over the last axis: tokens (flatten + transpose), channels
    last (permute) or a view; the Linear's output comes back to NCHW for the next BN."""

    def __init__(self, c: int, d: int, layout: str) -> None:
        super().__init__()
        self.layout, self.fc, self.bn = layout, nn.Linear(c, d), nn.BatchNorm2d(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.layout == "tokens":  # (B, N, C)
            y = self.fc(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
        elif self.layout == "channels_last":  # (B, H, W, C)
            y = self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:  # a view onto (B, C, N) then the last axis moved: (B, N, C)
            y = self.fc(x.view(b, c, h * w).permute(0, 2, 1)).permute(0, 2, 1).view(b, -1, h, w)
        return torch.relu(self.bn(y))


class Upsample(nn.Module):
    """Bilinear resampling to twice the size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def _block(kind: str, width: int, groups: int) -> nn.Module:
    convs = {"conv": 1, "grouped": groups, "depthwise": width}
    if kind in convs:
        conv = nn.Conv2d(width, width, 3, padding=1, groups=convs[kind])
        return nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU())
    if kind == "maxpool":
        return nn.MaxPool2d(3, 2, 1)
    if kind == "avgpool":  # zero-padded: a constant map becomes smaller at the border
        return nn.AvgPool2d(3, 1, 1)
    if kind == "adaptive":
        return nn.AdaptiveAvgPool2d(3)
    if kind == "upsample":
        return Upsample()
    return TokenMixer(width, width, kind)


class RandomNet(nn.Module):
    """A stem, then blocks drawn from ``kinds``; ``repeat`` calls of one shared block."""

    def __init__(self, kinds: list[str], width: int, repeat: int, groups: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width))
        self.blocks = nn.Sequential(*(_block(kind, width, groups) for kind in kinds))
        self.shared = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.repeat = repeat
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        for _ in range(self.repeat):  # one module, several calls
            x = self.shared(x)
        return self.head(x.mean((2, 3)))


def shift_bns_(model: nn.Module, seed: int) -> nn.Module:
    """Random BN statistics and scales, shifts in [0.2, 1]: a removed channel emits ReLU(shift),
    a constant its readers must get back."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.8 + 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def drop_some(graph, seed: int) -> set[int]:
    """About half of ``graph``'s removable groups, leaving every layer at least one channel."""
    gen = torch.Generator().manual_seed(seed)
    ids = [g.id for g in graph.removable_groups]
    dropped = {
        g for g, r in zip(ids, torch.rand(len(ids), generator=gen).tolist(), strict=True) if r < 0.5
    }
    for layer in graph.layers.values():
        if layer.out_groups and set(layer.out_groups) <= dropped:
            dropped.discard(layer.out_groups[0])
    return dropped
