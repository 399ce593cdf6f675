"""L1 (network-slimming) penalty on BN scales: value and gradient for every layer in one launch.

``R = strength * sum |gamma|`` with subgradient ``strength * sign(gamma)`` (``sign(0) = 0``),
added straight into ``gamma.grad`` after ``loss.backward()``. Same packed-buffer mechanism as
:mod:`kernels.receding_penalty` (whose docstring explains the choice).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kernels import packing
from kernels.dispatch import resolve_backend

_OP = "l1_penalty_"
_BLOCK = 1024


def l1_penalty_ref(gamma: torch.Tensor, *, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference value and gradient, in fp32, for BN scales ``gamma`` of any shape.

    Returns:
        ``(value, grad)``: a 0-d fp32 value and an fp32 gradient shaped like ``gamma``.
    """
    g = gamma.detach().float()
    return strength * g.abs().sum(), strength * g.sign()


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def l1_kernel(g_ptr, grad_ptr, partial_ptr, n, strength, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        tl.store(grad_ptr + offs, strength * sign, mask=mask)
        tl.store(partial_ptr + pid, strength * tl.sum(tl.abs(g), axis=0), mask=pid * BLOCK < n)

    return l1_kernel


def l1_penalty_triton(flat: torch.Tensor, *, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel over a packed buffer; same contract as :func:`l1_penalty_ref`.

    Raises:
        ValueError: ``flat`` is not a non-empty contiguous 1-D floating buffer, or
            ``strength`` is not a finite number ``>= 0``.
    """
    packing.check_flat(flat, _OP)
    strength = packing.check_scalar(strength, "strength", _OP, minimum=0.0)
    import triton

    n = flat.numel()
    grid = (triton.cdiv(n, _BLOCK),)
    grad = torch.empty(n, dtype=torch.float32, device=flat.device)
    partial = torch.empty(grid[0], dtype=torch.float32, device=flat.device)
    _kernel()[grid](flat, grad, partial, n, strength, BLOCK=_BLOCK)
    return partial.sum(), grad


def _apply(
    params: list[torch.Tensor], grads: list[torch.Tensor], strength: float, backend: str
) -> torch.Tensor:
    """One op per step: pack, value and gradient, add into ``grads``; ``backend`` is resolved."""
    impl = l1_penalty_triton if backend == "triton" else l1_penalty_ref
    value, grad = impl(packing.pack(params), strength=strength)
    packing.add_flat_(grads, grad.reshape(-1))
    return value


# Under torch.compile the step sees one op; eager calls skip the custom op's dispatch cost.
_penalty_op = torch.library.custom_op("recede::l1_penalty_", _apply, mutates_args=("grads",))


@_penalty_op.register_fake
def _(params, grads, strength, backend):
    return params[0].new_empty((), dtype=torch.float32)


@torch.no_grad()
def l1_penalty_(
    params: Sequence[torch.Tensor], *, strength: float, backend: str = "auto"
) -> torch.Tensor:
    """Add the L1 penalty's subgradient into each ``p.grad``; return its value.

    Call after ``loss.backward()`` and before ``optimizer.step()``.

    Args:
        params: BN scales, one tensor per layer, any mix of sizes, on one device.
        strength: penalty weight (``>= 0``); scales value and gradient.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.

    Returns:
        The penalty value, a detached 0-d fp32 tensor on the params' device.
    """
    device = packing.check_params(params, _OP)
    strength = packing.check_scalar(strength, "strength", _OP, minimum=0.0)
    if device is None:
        return torch.zeros((), dtype=torch.float32)
    resolved = resolve_backend(backend, device)
    op = _penalty_op if torch.compiler.is_compiling() else _apply
    return op(list(params), packing.grads_of(params), strength, resolved)
