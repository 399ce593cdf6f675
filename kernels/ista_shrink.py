"""ISTA proximal shrink of BN scales, every layer in one launch after the optimizer step.

Per layer ``l``: ``g <- sign(g) * max(|g| - lr_l * rho * lambda_l, 0)``, in place. Values at or
under the threshold become exact (+0.0) zeros, which is what lets pruning read them off.

Mechanism: the params are packed into one flat buffer (:mod:`kernels.packing`), shrunk in place
by one kernel, and copied back with one ``torch._foreach_copy_``. Each program covers one block
of one layer: a cached ``(layer, start, end)`` table per block (blocks never straddle layers)
tells it which per-layer threshold to read, so only one float per layer crosses to the device
each step, not one per element.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kernels import packing
from kernels.dispatch import resolve_backend

_OP = "ista_shrink_"
_BLOCK = 1024


def ista_shrink_ref(gamma: torch.Tensor, threshold: float) -> torch.Tensor:
    """Reference soft-threshold of one tensor, computed in fp32, returned in its dtype.

    The threshold is rounded to fp32 first, as the kernel sees it, so both agree bit for bit.
    """
    g = gamma.detach().float()
    thr = torch.tensor(threshold, dtype=torch.float32, device=g.device)
    shrunk = torch.where(g.abs() > thr, g - g.sign() * thr, torch.zeros_like(g))
    return shrunk.to(gamma.dtype)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ista_kernel(g_ptr, thr_ptr, table_ptr, num_blocks, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        ok = pid < num_blocks
        layer = tl.load(table_ptr + 3 * pid, mask=ok, other=0)
        start = tl.load(table_ptr + 3 * pid + 1, mask=ok, other=0)
        end = tl.load(table_ptr + 3 * pid + 2, mask=ok, other=0)
        thr = tl.load(thr_ptr + layer, mask=ok, other=0.0)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        out = tl.where(tl.abs(g) > thr, g - sign * thr, 0.0)
        tl.store(g_ptr + offs, out.to(g_ptr.dtype.element_ty), mask=mask)

    return ista_kernel


def ista_shrink_triton_(
    flat: torch.Tensor, thresholds: Sequence[float], sizes: Sequence[int]
) -> None:
    """Shrink a packed buffer in place, layer ``l`` (``sizes[l]`` elements) by ``thresholds[l]``.

    Raises:
        ValueError: ``flat`` is not a non-empty contiguous 1-D floating buffer, ``sizes`` does
            not add up to its length or does not match ``thresholds``, or a threshold is
            negative or not finite.
    """
    packing.check_flat(flat, _OP)
    sizes = tuple(int(n) for n in sizes)
    if len(sizes) != len(thresholds) or sum(sizes) != flat.numel():
        raise ValueError(
            f"{_OP}: need one threshold per layer and sizes adding up to the buffer length "
            f"{flat.numel()}; got {len(thresholds)} thresholds, sizes summing to {sum(sizes)} "
            f"over {len(sizes)} layers"
        )
    for i, thr in enumerate(thresholds):
        packing.check_scalar(thr, f"thresholds[{i}]", _OP, minimum=0.0)
    table = packing.block_table(sizes, _BLOCK, flat.device)
    thr = torch.tensor(thresholds, dtype=torch.float32, device=flat.device)
    num_blocks = table.shape[0]
    _kernel()[(num_blocks,)](flat, thr, table, num_blocks, BLOCK=_BLOCK)


def _thresholds(
    n_params: int, lrs: Sequence[float], lambdas: Sequence[float], rho: float
) -> list[float]:
    """Per-layer ``lr * rho * lambda``, after checking lengths and signs."""
    if len(lrs) != n_params or len(lambdas) != n_params:
        raise ValueError(
            f"{_OP}: need one lr and one lambda per param; got {n_params} params, "
            f"{len(lrs)} lrs and {len(lambdas)} lambdas"
        )
    rho = packing.check_scalar(rho, "rho", _OP, minimum=0.0)
    for name, values in (("lrs", lrs), ("lambdas", lambdas)):
        for i, v in enumerate(values):
            packing.check_scalar(v, f"{name}[{i}]", _OP, minimum=0.0)
    return [float(lr) * rho * float(lam) for lr, lam in zip(lrs, lambdas, strict=True)]


def _apply(params: list[torch.Tensor], thresholds: list[float], backend: str) -> None:
    """One op per step: shrink every layer in place; ``backend`` is resolved."""
    if backend == "triton":
        flat = packing.pack(params)
        ista_shrink_triton_(flat, thresholds, packing.sizes_of(params))
        packing.copy_flat_(params, flat)
        return
    for p, thr in zip(params, thresholds, strict=True):
        p.copy_(ista_shrink_ref(p, thr))


# Under torch.compile the step sees one op; eager calls skip the custom op's dispatch cost.
_shrink_op = torch.library.custom_op("recede::ista_shrink_", _apply, mutates_args=("params",))


@_shrink_op.register_fake
def _(params, thresholds, backend):
    return None


@torch.no_grad()
def ista_shrink_(
    params: Sequence[torch.Tensor],
    *,
    lrs: Sequence[float],
    lambdas: Sequence[float],
    rho: float,
    backend: str = "auto",
) -> None:
    """Soft-threshold each BN-scale tensor in place by ``lr_l * rho * lambda_l``.

    Call after ``optimizer.step()``. Parameter identity is kept; only the values change.

    Args:
        params: BN scales, one tensor per layer, any mix of sizes, on one device.
        lrs: the learning rate of each layer's param group, one per param (``>= 0``).
        lambdas: per-layer sparsity weights, one per param (``>= 0``).
        rho: global sparsity weight (``>= 0``).
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.
    """
    device = packing.check_params(params, _OP)
    thresholds = _thresholds(len(params), lrs, lambdas, rho)
    if device is None:
        return
    op = _shrink_op if torch.compiler.is_compiling() else _apply
    op(list(params), thresholds, resolve_backend(backend, device))
