"""The corrected conv: a Conv2d plus the exact contribution of removed constant input channels.

``pipeline.prune.absorb`` computes the corrections; folding, rescaling, pruning again and checkpoints
reach them only through the accessors here, never by buffer name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

CORRECTIONS = ("const_kernel", "const_map")
"""Buffer names of the two correction forms (``kernel``: any size; ``map``: one output size)."""


class CorrectedConv2d(nn.Conv2d):
    """A Conv2d plus the exact contribution of removed constant input channels.

    The ``kernel`` correction depends only on the input's spatial size, so it is computed once
    per (H, W, device, dtype) and cached outside the state dict; later calls at that size add a
    stored tensor and run no extra conv. The cache is rebuilt whenever ``const_kernel`` is
    replaced or changed in place (folding, rescaling, pruning again).
    """

    const_kernel: torch.Tensor | None
    const_map: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.const_kernel is not None:
            y = y + self.kernel_correction(x)
        if self.const_map is not None:
            if not torch.jit.is_tracing() and y.shape[-2:] != self.const_map.shape[-2:]:
                raise RuntimeError(
                    f"constant-channel correction was computed for a {tuple(self.const_map.shape[-2:])} output, got "
                    f"{tuple(y.shape[-2:])}; prune again with an example of the deployment input size"
                )
            y = y + self.const_map
        return y

    def kernel_correction(self, x: torch.Tensor) -> torch.Tensor:
        """``conv2d(ones(1, 1, H, W), const_kernel)`` for ``x``'s size: (1, C_out, H', W')."""
        kernel = self.const_kernel
        cache = self.__dict__.get("_correction_cache")
        if cache is None or cache[0] is not kernel or cache[1] != kernel._version:
            cache = (kernel, kernel._version, {})  # holding the kernel keeps its id unique
            self.__dict__["_correction_cache"] = cache
        key = (int(x.shape[-2]), int(x.shape[-1]), x.device, x.dtype)
        if key not in cache[2]:
            ones = torch.ones(1, 1, *key[:2], device=x.device, dtype=x.dtype)
            with torch.no_grad():  # zero padding shapes the borders
                cache[2][key] = F.conv2d(
                    ones, kernel, None, self.stride, self.padding, self.dilation
                )
        return cache[2][key]


def make_corrected_(
    conv: nn.Conv2d, *, kernel: torch.Tensor | None = None, map_: torch.Tensor | None = None
) -> None:
    """Turn ``conv`` into a ``CorrectedConv2d`` in place (parameters and name are kept).

    A correction the conv already holds is added to, so pruning twice accumulates.
    """
    conv.__class__ = CorrectedConv2d
    for name, value in zip(CORRECTIONS, (kernel, map_), strict=True):
        old = getattr(conv, name, None) if name in conv._buffers else None
        total = value if old is None else (old + value if value is not None else old)
        conv.register_buffer(name, total)


def corrections(conv: nn.Module) -> dict[str, torch.Tensor]:
    """Buffer name -> tensor of each correction ``conv`` holds (empty for a plain conv)."""
    return {k: v for k in CORRECTIONS if (v := getattr(conv, k, None)) is not None}


def kernel_corrected(model: nn.Module) -> list[str]:
    """Names of the convs in ``model`` that carry a ``kernel`` correction."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, CorrectedConv2d) and m.const_kernel is not None
    ]


def scale_corrections_(conv: nn.Module, factor: torch.Tensor) -> None:
    """Multiply every correction by ``factor`` per output channel, in place (they scale like outputs)."""
    for value in corrections(conv).values():
        value.mul_(factor.view(-1, *[1] * (value.dim() - 1)))


def replace_corrections_(conv: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every correction ``t`` by ``fn(t)`` (a new tensor: slicing, folding)."""
    for name, value in corrections(conv).items():
        setattr(conv, name, fn(value))


def set_map_(conv: CorrectedConv2d, value: torch.Tensor) -> None:
    """Drop the ``kernel`` correction and add ``value`` (C, H', W') to the ``map`` one."""
    conv.const_kernel = None
    conv.const_map = value.clone() if conv.const_map is None else conv.const_map + value


def drop_kernel_(conv: CorrectedConv2d) -> None:
    """Drop the ``kernel`` correction; a conv left with none becomes a plain ``nn.Conv2d``."""
    conv.const_kernel = None
    if conv.const_map is None:
        del conv.const_kernel, conv.const_map
        conv.__class__ = nn.Conv2d  # nothing size-dependent is left
