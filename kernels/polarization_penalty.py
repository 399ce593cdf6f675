"""Polarization penalty on BN scales (Zhuang et al., NeurIPS 2020), all layers in one launch.

``R = strength * (t * sum_i |g_i| - sum_i |g_i - m|)``, where ``m`` is the mean of *all* the
scaling factors of the network, across layers, as in the paper (not a per-layer mean). The
gradient is exact, including the mean's dependence on every ``g``::

    dR/dg_j = strength * (t * sign(g_j) - sign(g_j - m) + (1/n) * sum_i sign(g_i - m))

It is added straight into ``g.grad`` after ``loss.backward()``. The paper also keeps each
``g`` in ``[0, 1]``; that clamp is the caller's job after ``optimizer.step()`` (the training
loop in ``pipeline`` does it), not this op's.

Mechanism: the packed buffer of :mod:`kernels.receding_penalty`. The global mean couples all
elements, so ``m`` is one ``torch.mean`` over the packed buffer, read by the kernel from device
memory (no host sync). The kernel writes ``t*sign(g) - sign(g - m)`` and two per-block partial
sums (value and ``sum sign(g - m)``); the constant last term is then added to the whole flat
gradient in one op before the usual single ``_foreach_add_`` into the grads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kernels import packing
from kernels.dispatch import resolve_backend

_OP = "polarization_penalty_"
_BLOCK = 1024


def polarization_penalty_ref(
    gamma: torch.Tensor, *, strength: float, t: float = 1.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference value and exact gradient, in fp32, over all of ``gamma`` (one mean).

    Returns:
        ``(value, grad)``: a 0-d fp32 value and an fp32 gradient shaped like ``gamma``.
    """
    g = gamma.detach().float()
    m = g.mean()
    sign_dev = torch.sign(g - m)
    value = strength * (t * g.abs().sum() - (g - m).abs().sum())
    grad = strength * (t * g.sign() - sign_dev + sign_dev.sum() / g.numel())
    return value, grad


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def polarization_kernel(
        g_ptr, mean_ptr, grad_ptr, partial_ptr, n, num_blocks, strength, t, BLOCK: tl.constexpr
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(mean_ptr + offs * 0, mask=mask, other=0.0)  # the mean, broadcast
        sign_g = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        sign_dev = tl.where(g > m, 1.0, tl.where(g < m, -1.0, 0.0))
        sign_dev = tl.where(mask, sign_dev, 0.0)
        tl.store(grad_ptr + offs, strength * (t * sign_g - sign_dev), mask=mask)
        term = tl.where(mask, t * tl.abs(g) - tl.abs(g - m), 0.0)
        tl.store(partial_ptr + pid, strength * tl.sum(term, axis=0), mask=pid < num_blocks)
        tl.store(partial_ptr + num_blocks + pid, tl.sum(sign_dev, axis=0), mask=pid < num_blocks)

    return polarization_kernel


def polarization_penalty_triton(
    flat: torch.Tensor, *, strength: float, t: float = 1.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel over a packed buffer; same contract as the reference.

    Raises:
        ValueError: ``flat`` is not a non-empty contiguous 1-D floating buffer, or
            ``strength`` / ``t`` is not a finite number ``>= 0``.
    """
    packing.check_flat(flat, _OP)
    strength = packing.check_scalar(strength, "strength", _OP, minimum=0.0)
    t = packing.check_scalar(t, "t", _OP, minimum=0.0)
    import triton

    n = flat.numel()
    num_blocks = triton.cdiv(n, _BLOCK)
    mean = flat.float().mean().reshape(1)  # same expression as the reference: same m
    grad = torch.empty(n, dtype=torch.float32, device=flat.device)
    partial = torch.empty(2, num_blocks, dtype=torch.float32, device=flat.device)
    _kernel()[(num_blocks,)](flat, mean, grad, partial, n, num_blocks, strength, t, BLOCK=_BLOCK)
    sums = partial.sum(dim=1)  # (value, sum of sign(g - m))
    grad.add_(sums[1], alpha=strength / n)
    return sums[0], grad


def _apply(
    params: list[torch.Tensor], grads: list[torch.Tensor], strength: float, t: float, backend: str
) -> torch.Tensor:
    """One op per step: pack, value and gradient, add into ``grads``; ``backend`` is resolved."""
    impl = polarization_penalty_triton if backend == "triton" else polarization_penalty_ref
    value, grad = impl(packing.pack(params), strength=strength, t=t)
    packing.add_flat_(grads, grad.reshape(-1))
    return value


# Under torch.compile the step sees one op; eager calls skip the custom op's dispatch cost.
_penalty_op = torch.library.custom_op(
    "recede::polarization_penalty_", _apply, mutates_args=("grads",)
)


@_penalty_op.register_fake
def _(params, grads, strength, t, backend):
    return params[0].new_empty((), dtype=torch.float32)


@torch.no_grad()
def polarization_penalty_(
    params: Sequence[torch.Tensor],
    *,
    strength: float,
    t: float = 1.2,
    backend: str = "auto",
) -> torch.Tensor:
    """Add the polarization penalty's gradient into each ``p.grad``; return its value.

    Call after ``loss.backward()`` and before ``optimizer.step()``; clamp the scales to
    ``[0, 1]`` after the step.

    Args:
        params: BN scales, one tensor per layer, any mix of sizes, on one device. The mean is
            taken over all of them together.
        strength: penalty weight (``>= 0``); scales value and gradient.
        t: the paper's ``t`` (``>= 0``), weighting the L1 term against the spread term.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.

    Returns:
        The penalty value, a detached 0-d fp32 tensor on the params' device.
    """
    device = packing.check_params(params, _OP)
    strength = packing.check_scalar(strength, "strength", _OP, minimum=0.0)
    t = packing.check_scalar(t, "t", _OP, minimum=0.0)
    if device is None:
        return torch.zeros((), dtype=torch.float32)
    resolved = resolve_backend(backend, device)
    op = _penalty_op if torch.compiler.is_compiling() else _apply
    return op(list(params), packing.grads_of(params), strength, t, resolved)
