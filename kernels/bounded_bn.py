"""Bounded BatchNorm forward/backward: y = act(sigmoid(w) * x_hat + shift).

Training mode on the Triton backend is one fused kernel each way, wrapped in an
``autograd.Function``. Forward: batch statistics per channel (fp32 sums, shifted by the
channel's first value so the variance does not cancel), the running-stat update, then
``act(sigmoid(logit) * (x - mean) * rstd + shift)`` in a second pass over ``x``. Backward:
the two channel sums, then ``dx``; ``dlogit`` and ``dshift`` fall out of the sums. Only ``x``
and the per-channel mean and rstd are saved, and the ReLU mask is recomputed from them, so the
fused op keeps one activation for backward where BN followed by ReLU keeps two.

Each program owns a tile of channels and loops over the ``N * spatial`` values of each; tiles
are wide in channels when the spatial extent is small, so 2-D ``N x C`` inputs and late,
small feature maps still give many channels per program. There is no split reduction across
programs, so a few channels with huge ``N * H * W`` underfill a large GPU.

Eval mode (``training=False``) always runs the reference, ``F.batch_norm`` with the running
statistics, which is already one pass. Running statistics follow ``nn.BatchNorm2d``:
``running = (1 - momentum) * running + momentum * batch``, with the unbiased variance for
``running_var``; ``momentum`` is a float here (the caller resolves ``None``, the cumulative
average, and bumps ``num_batches_tracked``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kernels._dispatch import resolve_backend

_OP = "bounded_batch_norm"
_TILE = 2048  # values per program per loop step
_MAX_BLOCK_C = 128


def bounded_batch_norm_ref(
    x: torch.Tensor,
    logit: torch.Tensor,
    shift: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool = False,
) -> torch.Tensor:
    """Reference: ``nn.BatchNorm2d`` semantics with weight ``sigmoid(logit)``."""
    y = F.batch_norm(
        x, running_mean, running_var, torch.sigmoid(logit), shift, training, momentum, eps
    )
    return F.relu(y) if relu else y


@functools.cache
def _forward_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def bn_forward_kernel(
        x_ptr,
        y_ptr,
        logit_ptr,
        shift_ptr,
        run_mean_ptr,
        run_var_ptr,
        mean_ptr,
        rstd_ptr,
        C,
        HW,
        R,
        momentum,
        eps,
        HAS_SHIFT: tl.constexpr,
        HAS_RUNNING: tl.constexpr,
        RELU: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        chan = c.to(tl.int64) * HW  # offset of x[0, c, 0]
        k = tl.load(x_ptr + chan, mask=c_mask, other=0.0).to(tl.float32)  # variance shift
        acc = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
        acc_sq = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)  # r = n * HW + hw
            n = r // HW
            offs = chan[:, None] + (n.to(tl.int64) * C * HW + (r - n * HW))[None, :]
            mask = c_mask[:, None] & (r < R)[None, :]
            d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - k[:, None]
            d = tl.where(mask, d, 0.0)
            acc += d
            acc_sq += d * d
        mean_d = tl.sum(acc, axis=1) / R
        var = tl.maximum(tl.sum(acc_sq, axis=1) / R - mean_d * mean_d, 0.0)  # biased
        mean = k + mean_d
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_ptr + c, mean, mask=c_mask)
        tl.store(rstd_ptr + c, rstd, mask=c_mask)
        if HAS_RUNNING:
            rm = tl.load(run_mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            rv = tl.load(run_var_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            rm = (1.0 - momentum) * rm + momentum * mean
            rv = (1.0 - momentum) * rv + momentum * (var * R / (R - 1))
            tl.store(run_mean_ptr + c, rm.to(run_mean_ptr.dtype.element_ty), mask=c_mask)
            tl.store(run_var_ptr + c, rv.to(run_var_ptr.dtype.element_ty), mask=c_mask)
        w = tl.sigmoid(tl.load(logit_ptr + c, mask=c_mask, other=0.0).to(tl.float32))
        scale = w * rstd
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_SHIFT:
            b = tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            n = r // HW
            offs = chan[:, None] + (n.to(tl.int64) * C * HW + (r - n * HW))[None, :]
            mask = c_mask[:, None] & (r < R)[None, :]
            xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = (xv - mean[:, None]) * scale[:, None] + b[:, None]
            if RELU:
                y = tl.maximum(y, 0.0)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    return bn_forward_kernel


@functools.cache
def _backward_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def bn_backward_kernel(
        x_ptr,
        dy_ptr,
        dx_ptr,
        logit_ptr,
        shift_ptr,
        mean_ptr,
        rstd_ptr,
        dlogit_ptr,
        dshift_ptr,
        C,
        HW,
        R,
        HAS_SHIFT: tl.constexpr,
        RELU: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        chan = c.to(tl.int64) * HW
        mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
        rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0)
        w = tl.sigmoid(tl.load(logit_ptr + c, mask=c_mask, other=0.0).to(tl.float32))
        scale = w * rstd  # the forward's exact expression, so the ReLU mask matches
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_SHIFT:
            b = tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        acc_dy = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
        acc_dyx = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            n = r // HW
            offs = chan[:, None] + (n.to(tl.int64) * C * HW + (r - n * HW))[None, :]
            mask = c_mask[:, None] & (r < R)[None, :]
            xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if RELU:
                dy = tl.where(xc * scale[:, None] + b[:, None] > 0.0, dy, 0.0)
            acc_dy += dy
            acc_dyx += dy * xc * rstd[:, None]
        sum_dy = tl.sum(acc_dy, axis=1)
        sum_dyx = tl.sum(acc_dyx, axis=1)  # = d loss / d sigmoid(logit)
        tl.store(
            dlogit_ptr + c, (sum_dyx * w * (1.0 - w)).to(dlogit_ptr.dtype.element_ty), mask=c_mask
        )
        if HAS_SHIFT:
            tl.store(dshift_ptr + c, sum_dy.to(dshift_ptr.dtype.element_ty), mask=c_mask)
        mean_dy = sum_dy / R
        mean_dyx = sum_dyx / R
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            n = r // HW
            offs = chan[:, None] + (n.to(tl.int64) * C * HW + (r - n * HW))[None, :]
            mask = c_mask[:, None] & (r < R)[None, :]
            xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if RELU:
                dy = tl.where(xc * scale[:, None] + b[:, None] > 0.0, dy, 0.0)
            x_hat = xc * rstd[:, None]
            dx = scale[:, None] * (dy - mean_dy[:, None] - x_hat * mean_dyx[:, None])
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    return bn_backward_kernel


def _launch_shape(x: torch.Tensor) -> tuple[tuple[int], tuple[int, int, int], dict[str, int]]:
    """Grid, ``(C, HW, R)`` and block sizes for contiguous ``(N, C, ...)`` input ``x``.

    ``R = N * HW`` values per channel; a tile holds about ``_TILE`` values, wide in R first,
    then in channels (at most ``_MAX_BLOCK_C``) when R is small.
    """
    channels = x.shape[1]
    per_channel = x.numel() // channels
    block_r = min(_next_pow2(per_channel), _TILE)
    block_c = max(min(_next_pow2(channels), _MAX_BLOCK_C, _TILE // block_r), 1)
    grid = (-(-channels // block_c),)
    dims = (channels, per_channel // x.shape[0], per_channel)
    return grid, dims, {"BLOCK_C": block_c, "BLOCK_R": block_r}


def _next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (``triton.next_power_of_2``, without importing triton)."""
    return 1 << max(n - 1, 0).bit_length()


def _check_vector(v: torch.Tensor | None, name: str, x: torch.Tensor) -> None:
    """A per-channel vector must be ``(C,)``, floating, contiguous and on ``x``'s device."""
    if v is None:
        return
    channels = x.shape[1]
    ok = v.dim() == 1 and v.shape[0] == channels and v.is_floating_point()
    if not ok or not v.is_contiguous() or v.device != x.device:
        raise ValueError(
            f"{_OP}: {name} must be a contiguous floating ({channels},) tensor on {x.device}; "
            f"got shape {tuple(v.shape)}, dtype {v.dtype}, device {v.device}, "
            f"contiguous={v.is_contiguous()}"
        )


def _check_inputs(
    x: torch.Tensor,
    logit: torch.Tensor,
    shift: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> None:
    """Validate the training-mode launch; every message names what it got.

    Raises:
        ValueError: on a bad shape, dtype, device, scalar, or fewer than two values per channel.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        got = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{_OP}: x must be a floating (N, C, ...) tensor; got {got}")
    for name, v in (("logit", logit), ("shift", shift)):
        _check_vector(v, name, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{_OP}: pass both running_mean and running_var, or neither")
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(v, name, x)
    if x.numel() // max(x.shape[1], 1) < 2:
        raise ValueError(
            f"{_OP}: training needs more than one value per channel; got input of shape "
            f"{tuple(x.shape)}. Use a larger batch or training=False."
        )
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{_OP}: momentum must be a float in [0, 1]; got {momentum!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"{_OP}: eps must be a finite float > 0; got {eps!r}")


def bounded_batch_norm_forward_triton(
    x: torch.Tensor,
    logit: torch.Tensor,
    shift: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    config: tuple[float, float, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused training forward; updates the running stats in place.

    Args:
        config: ``(momentum, eps, relu)``.

    Returns:
        ``(y, mean, rstd)``: ``y`` contiguous like ``x``; fp32 per-channel batch mean and
        ``1 / sqrt(var + eps)``, saved for the backward.

    Raises:
        ValueError: see :func:`_check_inputs`.
    """
    momentum, eps, relu = config
    _check_inputs(x, logit, shift, running_mean, running_var, momentum, eps)
    x = x.contiguous()
    grid, dims, blocks = _launch_shape(x)
    y = torch.empty_like(x)
    mean = torch.empty(x.shape[1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    tracked = running_mean is not None
    stats = (running_mean, running_var) if tracked else (mean, mean)  # unused when untracked
    pointers = (x, y, logit, logit if shift is None else shift, *stats, mean, rstd)
    flags = {"HAS_SHIFT": shift is not None, "HAS_RUNNING": tracked, "RELU": relu}
    _forward_kernel()[grid](*pointers, *dims, float(momentum), float(eps), **flags, **blocks)
    return y, mean, rstd


def bounded_batch_norm_backward_triton(
    x: torch.Tensor,
    dy: torch.Tensor,
    saved: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor],
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the fused training backward.

    Args:
        x: the forward's (contiguous) input.
        dy: gradient of the output, shaped like ``x``.
        saved: ``(logit, shift, mean, rstd)`` from the forward.
        relu: whether the forward applied the ReLU.

    Returns:
        ``(dx, dlogit, dshift)``; ``dshift`` is ``None`` when ``shift`` is.

    Raises:
        ValueError: ``dy`` does not match ``x``'s shape.
    """
    logit, shift, mean, rstd = saved
    if dy.shape != x.shape:
        raise ValueError(f"{_OP}: dy must have x's shape {tuple(x.shape)}; got {tuple(dy.shape)}")
    dy = dy.contiguous()
    grid, dims, blocks = _launch_shape(x)
    dx = torch.empty_like(x)
    dlogit = torch.empty_like(logit)
    dshift = None if shift is None else torch.empty_like(shift)
    pointers = (x, dy, dx, logit, logit if shift is None else shift, mean, rstd, dlogit)
    pointers += (dlogit if dshift is None else dshift,)
    flags = {"HAS_SHIFT": shift is not None, "RELU": relu}
    _backward_kernel()[grid](*pointers, *dims, **flags, **blocks)
    return dx, dlogit, dshift


class _BoundedBatchNormFn(torch.autograd.Function):
    """Training-mode bounded BN on the Triton kernels; saves x, mean and rstd only."""

    @staticmethod
    def forward(ctx, x, logit, shift, running_mean, running_var, momentum, eps, relu):
        x = x.contiguous()
        y, mean, rstd = bounded_batch_norm_forward_triton(
            x, logit, shift, running_mean, running_var, (momentum, eps, relu)
        )
        ctx.save_for_backward(x, logit, shift, mean, rstd)
        ctx.relu = relu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, logit, shift, mean, rstd = ctx.saved_tensors
        dx, dlogit, dshift = bounded_batch_norm_backward_triton(
            x, dy, (logit, shift, mean, rstd), ctx.relu
        )
        return dx, dlogit, dshift, None, None, None, None, None


def bounded_batch_norm(
    x: torch.Tensor,
    logit: torch.Tensor,
    shift: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Bounded BN, ``act(sigmoid(logit) * (x - mean) / sqrt(var + eps) + shift)``.

    Args:
        x: ``(N, C, H, W)`` activations (any ``(N, C, ...)`` works, ``(N, C)`` included).
        logit: ``(C,)`` unbounded scale parameter; the scale is ``sigmoid(logit)``.
        shift: ``(C,)`` additive shift, or ``None`` for none.
        running_mean, running_var: ``(C,)`` buffers updated in place in training mode, or
            ``None`` to skip tracking (eval mode then needs them).
        training: use and track batch statistics (fused Triton path when selected).
        momentum: running-stat momentum, a float (resolved by the caller).
        eps: added to the variance.
        relu: apply ReLU to the output.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``;
            eval mode always uses the reference.
    """
    use_triton = resolve_backend(backend, x.device) == "triton"
    if training and use_triton:
        args = (x, logit, shift, running_mean, running_var, momentum, eps, relu)
        return _BoundedBatchNormFn.apply(*args)
    kwargs = {"training": training, "momentum": momentum, "eps": eps, "relu": relu}
    return bounded_batch_norm_ref(x, logit, shift, running_mean, running_var, **kwargs)
