"""Models with several outputs: a shared trunk, an FPN-like top-down path with upsample-and-add,
several heads, returned as a tensor, a tuple, a list, a dict or nested containers.

``MultiHeadNet`` is what the property tests draw from; the ``*_net`` functions are ``--model``
factories for the command-line tests. Every model has distinct BN scales (so a ratio has a
ranking) and BN statistics of its own input on random data (so its outputs move with the input
and every check of it is sensitive).
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RETURNS = ("tensor", "tuple", "list", "dict", "nested", "namedtuple")
Pair = namedtuple("Pair", ["logits", "boxes"])


@dataclass(frozen=True)
class Arch:
    """A drawn architecture: trunk widths (one level each, stride 2 after the first), FPN width
    (0: no top-down path), heads as (level, output channels), and how outputs are returned."""

    widths: tuple[int, ...] = (8, 12, 16)
    fpn: int = 8
    heads: tuple[tuple[int, int], ...] = ((0, 4), (2, 3))
    returns: str = "dict"
    seed: int = 0


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class MultiHeadNet(nn.Module):
    """Trunk levels -> (optional) FPN top-down path -> heads; see :class:`Arch`."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        widths = arch.widths
        self.trunk = nn.ModuleList(
            _cbr(3 if i == 0 else widths[i - 1], w, 1 if i == 0 else 2) for i, w in enumerate(widths)
        )
        if arch.fpn:
            self.lateral = nn.ModuleList(
                nn.Sequential(nn.Conv2d(w, arch.fpn, 1, bias=False), nn.BatchNorm2d(arch.fpn))
                for w in widths
            )
        level_width = [arch.fpn or w for w in widths]
        self.heads = nn.ModuleList(
            nn.Sequential(_cbr(level_width[lvl], 8), nn.Conv2d(8, out, 1)) for lvl, out in arch.heads
        )

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.trunk:
            x = stage(x)
            feats.append(x)
        if not self.arch.fpn:
            return feats
        top = self.lateral[-1](feats[-1])
        out = [top]
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1]), strict=True):
            top = lateral(f) + F.interpolate(top, scale_factor=2.0, mode="nearest")  # upsample-add
            out.insert(0, top)
        return out

    def forward(self, x):
        feats = self.levels(x)
        heads = [head(feats[lvl]) for head, (lvl, _) in zip(self.heads, self.arch.heads, strict=True)]
        kind = self.arch.returns
        if kind == "tensor":
            return heads[0]
        if kind == "tuple":
            return tuple(heads)
        if kind == "list":
            return list(heads)
        if kind == "dict":
            return OrderedDict((f"head{i}", h) for i, h in enumerate(heads))
        if kind == "namedtuple":
            return Pair(heads[0], heads[-1])
        return {"heads": heads[:-1], "last": (heads[-1], {"features": feats[-1]})}

    def head_leaves(self) -> list[str]:
        """The output name each head's tensor gets (``pipeline.core.outputs``); "" if not returned."""
        n, kind = len(self.heads), self.arch.returns
        if kind == "tensor":
            return ["output"] + [""] * (n - 1)
        if kind in ("tuple", "list"):
            return [f"output.{i}" for i in range(n)]
        if kind == "dict":
            return [f"head{i}" for i in range(n)]
        if kind == "namedtuple":
            return ["logits"] + [""] * (n - 2) + ["boxes"] if n > 1 else ["logits"]
        return [f"heads.{i}" for i in range(n - 1)] + ["last.0"]


def calibrated(model: nn.Module, shape: tuple[int, ...] = (3, 32, 32), seed: int = 0) -> nn.Module:
    """Distinct BN scales and shifts, then BN statistics of the model's own random input."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.05)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None
        model.train()
        model(torch.randn(16, *shape, generator=g))
        for m in bns:
            m.momentum = 0.1
    return model.eval()


def build(arch: Arch) -> MultiHeadNet:
    with torch.random.fork_rng():
        torch.manual_seed(arch.seed)
        return calibrated(MultiHeadNet(arch), seed=arch.seed)


def dict_net(num_classes: int = 4) -> nn.Module:
    """A segmenter's shape: ``{"head0": [N, num_classes, H, W], "head1": [N, 3, H/4, W/4]}``."""
    return build(Arch(heads=((0, num_classes), (2, 3)), returns="dict"))


def tuple_net(num_classes: int = 4) -> nn.Module:
    """Three heads returned as a tuple."""
    return build(Arch(heads=((0, num_classes), (1, 2), (2, 3)), returns="tuple"))


def nested_net(num_classes: int = 4) -> nn.Module:
    """``{"heads": [h0], "last": (h1, {"features": top level})}``."""
    return build(Arch(heads=((0, num_classes), (2, 3)), returns="nested"))


class StringOutput(nn.Module):
    """Returns a tensor and a string: not a tree of tensors."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = _cbr(3, 4)

    def forward(self, x):
        return {"logits": self.body(x), "note": "not a tensor"}


def string_output_net(num_classes: int = 4) -> nn.Module:
    return StringOutput(num_classes).eval()


class OddOutputs(nn.Module):
    """``dict_net`` with one more, awkward output beside its map (see :data:`ODD`)."""

    def __init__(self, odd: str, num_classes: int = 4) -> None:
        super().__init__()
        self.odd, self.body = odd, dict_net(num_classes)
        self.register_buffer("prior", torch.linspace(0, 1, 6).reshape(1, 6))

    def forward(self, x):
        out = self.body(x)
        head = out["head0"]
        extra = {
            "twice": (head, head),  # the same tensor under two names
            "classes": head.argmax(1),  # an integer map
            "scalar": head.mean(),  # no batch axis
            "int_keys": {0: out["head1"], 1: head},  # numeric dict keys
            "image": x,  # the input itself
            "constant": self.prior,  # moves with nothing
        }[self.odd]
        return {"map": head, "extra": extra}


ODD = ("twice", "classes", "scalar", "int_keys", "image", "constant")


def odd_output_net(num_classes: int = 4, odd: str = "twice") -> nn.Module:
    return OddOutputs(odd, num_classes).eval()
