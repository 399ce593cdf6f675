"""Receding penalty on bounded-BN logits: value and gradient for every layer in one launch.

``R = strength * sum over all channels of s * (1 - log s)``, with ``s = sigmoid(w + bias)``.
Its gradient ``strength * (-log s) * s * (1 - s)`` is added straight into ``w.grad`` after
``loss.backward()``, like decoupled weight decay, so the penalty never enters the autograd graph;
the value comes back detached, for logging.

Why a packed flat buffer and not a pointer table: a table of raw ``data_ptr()`` values would
skip the copy in, but the Triton interpreter (how the tests run on CPU) cannot follow raw
addresses loaded from a tensor, each program would have to search the table for its layer, and
mixed param dtypes would need one kernel specialisation per mix. BN logits are tiny (about 26k
values for a ResNet-50), so one ``torch.cat`` into a flat buffer costs one small copy. A step is
then four launches whatever the number of layers: ``cat``; this kernel, writing the flat
gradient and one strength-scaled partial sum per block; a ``sum`` of the partials (deterministic,
unlike an atomic add); and one ``torch._foreach_add_`` of per-layer views of the flat gradient
into each ``.grad``. The naive version launches several kernels per layer, forward and
backward. :mod:`kernels.packing` holds the helpers; the L1 and polarization penalties reuse them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels import packing
from kernels.dispatch import resolve_backend

_OP = "receding_penalty_"
_BLOCK = 1024


def receding_penalty_ref(
    w: torch.Tensor, *, strength: float, bias: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference value and gradient, in fp32, for logits ``w`` of any shape.

    Returns:
        ``(value, grad)``: a 0-d fp32 value and an fp32 gradient shaped like ``w``.
    """
    z = w.detach().float() + bias
    log_s = -F.softplus(-z)  # stable log(sigmoid(z))
    s = torch.sigmoid(z)
    value = strength * (s * (1.0 - log_s)).sum()
    grad = strength * (-log_s) * s * torch.sigmoid(-z)
    return value, grad


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def receding_kernel(w_ptr, grad_ptr, partial_ptr, n, strength, bias, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        z = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias
        # log s = -softplus(-z) = min(z, 0) - log1p(exp(-|z|)); log1p via Goldberg's trick,
        # which keeps full relative accuracy when exp(-|z|) is tiny (large logits).
        e = tl.exp(-tl.abs(z))
        u = 1.0 + e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        log_s = tl.minimum(z, 0.0) - log1p_e
        s = tl.exp(log_s)
        one_minus_s = tl.exp(log_s - z)  # sigmoid(-z); the exponent is <= 0, never overflows
        tl.store(grad_ptr + offs, strength * (-log_s) * s * one_minus_s, mask=mask)
        term = tl.where(mask, s * (1.0 - log_s), 0.0)
        tl.store(partial_ptr + pid, strength * tl.sum(term, axis=0), mask=pid * BLOCK < n)

    return receding_kernel


def receding_penalty_triton(
    flat: torch.Tensor, *, strength: float, bias: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel over a packed buffer; same contract as :func:`receding_penalty_ref`.

    Raises:
        ValueError: ``flat`` is not a non-empty contiguous 1-D floating buffer, or ``strength``
            / ``bias`` is not finite (``strength`` must also be ``>= 0``).
    """
    packing.check_flat(flat, _OP)
    strength = packing.check_scalar(strength, "strength", _OP, minimum=0.0)
    bias = packing.check_scalar(bias, "bias", _OP)
    import triton

    n = flat.numel()
    grid = (triton.cdiv(n, _BLOCK),)
    grad = torch.empty(n, dtype=torch.float32, device=flat.device)
    partial = torch.empty(grid[0], dtype=torch.float32, device=flat.device)
    _kernel()[grid](flat, grad, partial, n, strength, bias, BLOCK=_BLOCK)
    return partial.sum(), grad


def _apply(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    strength: float,
    bias: float,
    backend: str,
) -> torch.Tensor:
    """One op per step: pack, value and gradient, add into ``grads``; ``backend`` is resolved."""
    impl = receding_penalty_triton if backend == "triton" else receding_penalty_ref
    value, grad = impl(packing.pack(params), strength=strength, bias=bias)
    packing.add_flat_(grads, grad.reshape(-1))
    return value


# Under torch.compile the step sees one op; eager calls skip the custom op's dispatch cost.
_penalty_op = torch.library.custom_op("recede::receding_penalty_", _apply, mutates_args=("grads",))


@_penalty_op.register_fake
def _(params, grads, strength, bias, backend):
    return params[0].new_empty((), dtype=torch.float32)


@torch.no_grad()
def receding_penalty_(
    params: Sequence[torch.Tensor],
    *,
    strength: float,
    bias: float = 3.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Add the receding penalty's gradient into each ``p.grad``; return its value.

    Call after ``loss.backward()`` and before ``optimizer.step()``.

    Args:
        params: bounded-BN logits, one tensor per layer, any mix of sizes, on one device.
        strength: penalty weight (``>= 0``); scales value and gradient.
        bias: added to the logits before the sigmoid.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.

    Returns:
        The penalty value, a detached 0-d fp32 tensor on the params' device.
    """
    device = packing.check_params(params, _OP)
    strength = packing.check_scalar(strength, "strength", _OP, minimum=0.0)
    bias = packing.check_scalar(bias, "bias", _OP)
    if device is None:
        return torch.zeros((), dtype=torch.float32)
    resolved = resolve_backend(backend, device)
    op = _penalty_op if torch.compiler.is_compiling() else _apply
    return op(list(params), packing.grads_of(params), strength, bias, resolved)
