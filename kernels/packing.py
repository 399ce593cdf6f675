"""Pack many small per-layer tensors into one flat buffer, and scatter results back.

The penalty and proximal ops touch every BN layer once per step. Packing the layers into one
contiguous buffer lets a single kernel launch cover all of them; these helpers do the packing
(one ``torch.cat``) and the way back (one ``torch._foreach_*`` call over per-layer views of a
flat result), and hold the per-block layer table the ISTA kernel reads its thresholds through.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch


def check_params(params: Sequence[torch.Tensor], op: str) -> torch.device | None:
    """Check that ``params`` are floating tensors on one device and return that device.

    Returns ``None`` when there is nothing to do (no params, or only empty ones).

    Raises:
        ValueError: a param is not a floating tensor, or the params span several devices.
    """
    devices = set()
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            got = p.dtype if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"{op}: params[{i}] must be a floating tensor; got {got}")
        devices.add(p.device)
    if len(devices) > 1:
        raise ValueError(
            f"{op}: all params must live on one device; got {sorted(map(str, devices))}. "
            "Move the model to a single device first."
        )
    if sum(p.numel() for p in params) == 0:
        return None
    return next(iter(devices))


def check_scalar(value: float, name: str, op: str, *, minimum: float | None = None) -> float:
    """Return ``value`` as a float after checking it is finite (and ``>= minimum``).

    Raises:
        ValueError: ``value`` is not a finite number, or is below ``minimum``.
    """
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{op}: {name} must be a finite number{bound}; got {value!r}")
    return float(value)


def check_flat(flat: torch.Tensor, op: str) -> None:
    """Check that ``flat`` is a non-empty, contiguous, 1-D floating buffer (a kernel's input).

    Raises:
        ValueError: naming the shape, layout or dtype that was got.
    """
    if not isinstance(flat, torch.Tensor) or not flat.is_floating_point():
        got = flat.dtype if isinstance(flat, torch.Tensor) else type(flat).__name__
        raise ValueError(f"{op}: expected a floating tensor; got {got}")
    if flat.dim() != 1 or flat.numel() == 0 or not flat.is_contiguous():
        raise ValueError(
            f"{op}: expected a non-empty contiguous 1-D buffer (see kernels.packing.pack); "
            f"got shape {tuple(flat.shape)}, contiguous={flat.is_contiguous()}"
        )


def pack(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the params, flattened, into one contiguous 1-D buffer (a copy).

    The buffer takes the promoted dtype of the params; kernels upcast to fp32 on load.
    """
    return torch.cat([p.detach().reshape(-1) for p in params])


def sizes_of(params: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """Element count of each param, in order: the layout of :func:`pack`'s buffer."""
    return tuple(p.numel() for p in params)


def _views_like(params: Sequence[torch.Tensor], flat: torch.Tensor) -> list[torch.Tensor]:
    """Split ``flat`` into per-param views shaped (and, if needed, cast) like each param."""
    views = flat.split(sizes_of(params))
    return [v.view_as(p).to(p.dtype) for v, p in zip(views, params, strict=True)]


def grads_of(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each param's ``.grad``, a missing one allocated as zeros first (so ``existing + penalty``)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def add_flat_(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Add ``flat`` (laid out like :func:`pack` of ``tensors``) into each tensor, in place."""
    torch._foreach_add_(list(tensors), _views_like(tensors, flat))


def add_flat_grad_(params: Sequence[torch.Tensor], flat_grad: torch.Tensor) -> None:
    """Add ``flat_grad`` (laid out like :func:`pack`) into each ``p.grad``, in place.

    A missing ``.grad`` is allocated as zeros first, so the result is always "existing grad
    plus penalty grad", like decoupled weight decay. Parameter identity is never touched.
    """
    add_flat_(grads_of(params), flat_grad)


def copy_flat_(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Write ``flat`` (laid out like :func:`pack`) back into the params' storage, in place."""
    with torch.no_grad():
        torch._foreach_copy_([p.detach() for p in params], _views_like(params, flat))


@functools.cache
def block_table(sizes: tuple[int, ...], block: int, device: torch.device) -> torch.Tensor:
    """Per-block ``(layer, start, end)`` rows for a packed buffer, cached per layout.

    Blocks never straddle two layers, so a kernel program reads one per-layer value (a
    threshold) instead of a per-element table. Shape ``(num_blocks, 3)``, int32 (int64 when
    the buffer is too long for int32 offsets).
    """
    rows = []
    start = 0
    for layer, n in enumerate(sizes):
        rows += [(layer, s, start + n) for s in range(start, start + n, block)]
        start += n
    dtype = torch.int32 if start < 2**31 else torch.int64
    return torch.tensor(rows, dtype=dtype, device=device).reshape(-1, 3)
