"""Bounded BatchNorm forward/backward: y = act(sigmoid(w) * x_hat + shift).

Training mode on the Triton backend is two PyTorch custom ops, ``recede::bounded_bn_forward``
and ``recede::bounded_bn_backward`` (``torch.library.custom_op``, with fake implementations and
the backward registered as the forward's autograd formula), so ``torch.compile`` (and the CUDA
graphs its ``reduce-overhead`` mode records) sees one opaque op per BN layer and direction.
Each op takes the resolved backend: ``"triton"`` launches one fused kernel
(:mod:`kernels.bounded_bn_kernels`), ``"torch"`` runs the pure-torch reference with the same
formulas (``bounded_batch_norm_forward_ref`` / ``_backward_ref``; what ``opcheck`` exercises
without Triton). Eager calls (outside ``torch.compile``) go through ``_EagerFn``, an
``autograd.Function`` over the same launchers, whose host cost per call is lower than a Python
custom op's. Only ``x`` and the per-channel mean and rstd are saved, and the ReLU mask is
recomputed from them, so the fused op keeps one activation for backward where BN followed by
ReLU keeps two.

Each program owns a tile of channels and loops over the ``N * spatial`` values of each; tiles
are wide in channels when the spatial extent is small, so 2-D ``N x C`` inputs and late,
small feature maps still give many channels per program. There is no split reduction across
programs, so a few channels with huge ``N * H * W`` underfill a large GPU.

Eval mode (``training=False``) and the ``"torch"`` backend in training run
``bounded_batch_norm_ref``, ``F.batch_norm`` with ``sigmoid(logit)`` (a native op, which
``torch.compile`` understands). Running statistics follow ``nn.BatchNorm2d``:
``running = (1 - momentum) * running + momentum * batch``, with the unbiased variance for
``running_var``; on the Triton path the forward op returns the batch statistics and one
``torch._foreach_lerp_`` updates both buffers (custom ops with autograd must be functional).
``momentum`` is a float here (the caller resolves ``None``, the cumulative average, and bumps
``num_batches_tracked``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kernels.bounded_bn_kernels import backward_kernel, forward_kernel
from kernels.dispatch import resolve_backend

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


def bounded_batch_norm_forward_ref(
    x: torch.Tensor, logit: torch.Tensor, shift: torch.Tensor | None, eps: float, relu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference training forward in fp32: ``(y, mean, rstd, unbiased var)`` as the kernel.

    ``y`` is contiguous in ``x``'s dtype; the per-channel vectors are fp32 ``(C,)``.
    """
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast a (C,) vector over (N, C, ...)
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean.view(shape)) * (torch.sigmoid(logit.float()) * rstd).view(shape)
    if shift is not None:
        y = y + shift.float().view(shape)
    if relu:
        y = torch.relu(y)
    per_channel = x.numel() // x.shape[1]
    unbiased = var * (per_channel / max(per_channel - 1, 1))
    return y.to(x.dtype).contiguous(), mean, rstd, unbiased


def bounded_batch_norm_backward_ref(
    x: torch.Tensor,
    dy: torch.Tensor,
    saved: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor],
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference training backward in fp32, the kernel's formulas: ``(dx, dlogit, dshift)``.

    ``dshift`` is the per-channel sum of ``dy`` (after the ReLU mask), returned even without a
    shift, in the shift's dtype (the logit's when there is none).
    """
    logit, shift, mean, rstd = saved
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    w = torch.sigmoid(logit.float())
    x_hat = (x.float() - mean.view(shape)) * rstd.view(shape)
    dyf = dy.float()
    if relu:
        pre = x_hat * w.view(shape) + (0.0 if shift is None else shift.float().view(shape))
        dyf = torch.where(pre > 0, dyf, 0.0)
    sum_dy, sum_dyx = dyf.sum(dims), (dyf * x_hat).sum(dims)
    count = x.numel() // x.shape[1]
    dx = (w * rstd).view(shape) * (
        dyf - (sum_dy / count).view(shape) - x_hat * (sum_dyx / count).view(shape)
    )
    dlogit = (sum_dyx * w * (1.0 - w)).to(logit.dtype)
    dshift = sum_dy.to(logit.dtype if shift is None else shift.dtype)
    return dx.to(x.dtype).contiguous(), dlogit, dshift


def bounded_batch_norm_forward_triton(
    x: torch.Tensor, logit: torch.Tensor, shift: torch.Tensor | None, eps: float, relu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused training forward; same contract as :func:`bounded_batch_norm_forward_ref`.

    Raises:
        ValueError: see :func:`_check_inputs`.
    """
    _check_inputs(x, logit, shift, None, None, 0.0, eps)
    x = x.contiguous()
    grid, dims, blocks = _launch_shape(x)
    y = torch.empty_like(x)
    # Three buffers, not views of one: a custom op's outputs must not alias each other.
    stats = [torch.empty(x.shape[1], dtype=torch.float32, device=x.device) for _ in range(3)]
    pointers = (x, y, logit, logit if shift is None else shift, *stats)
    flags = {"HAS_SHIFT": shift is not None, "RELU": relu}
    forward_kernel()[grid](*pointers, *dims, float(eps), **flags, **blocks)
    return y, stats[0], stats[1], stats[2]


def bounded_batch_norm_backward_triton(
    x: torch.Tensor,
    dy: torch.Tensor,
    saved: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor],
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused training backward; same contract as :func:`bounded_batch_norm_backward_ref`.

    Args:
        x: the forward's input.
        dy: gradient of the output, shaped like ``x``.
        saved: ``(logit, shift, mean, rstd)`` from the forward.
        relu: whether the forward applied the ReLU.

    Raises:
        ValueError: ``dy`` does not match ``x``'s shape.
    """
    logit, shift, mean, rstd = saved
    if dy.shape != x.shape:
        raise ValueError(f"{_OP}: dy must have x's shape {tuple(x.shape)}; got {tuple(dy.shape)}")
    x, dy = x.contiguous(), dy.contiguous()
    grid, dims, blocks = _launch_shape(x)
    dx = torch.empty_like(x)
    dlogit = torch.empty_like(logit)
    dshift = torch.empty_like(logit if shift is None else shift)
    pointers = (x, dy, dx, logit, logit if shift is None else shift, mean, rstd, dlogit, dshift)
    flags = {"HAS_SHIFT": shift is not None, "RELU": relu}
    backward_kernel()[grid](*pointers, *dims, **flags, **blocks)
    return dx, dlogit, dshift


def _forward_impl(backend: str):
    return (
        bounded_batch_norm_forward_triton if backend == "triton" else bounded_batch_norm_forward_ref
    )


def _backward_impl(backend: str):
    return (
        bounded_batch_norm_backward_triton
        if backend == "triton"
        else bounded_batch_norm_backward_ref
    )


@torch.library.custom_op("recede::bounded_bn_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    logit: torch.Tensor,
    shift: torch.Tensor | None,
    eps: float,
    relu: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward as one op: ``(y, mean, rstd, unbiased var)``; ``backend`` is resolved."""
    return _forward_impl(backend)(x, logit, shift, eps, relu)


@_forward_op.register_fake
def _(x, logit, shift, eps, relu, backend):
    channel = x.new_empty(x.shape[1], dtype=torch.float32)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, channel, torch.empty_like(channel), torch.empty_like(channel)


@torch.library.custom_op("recede::bounded_bn_backward", mutates_args=())
def _backward_op(
    x: torch.Tensor,
    dy: torch.Tensor,
    logit: torch.Tensor,
    shift: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    relu: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training backward as one op: ``(dx, dlogit, dshift)``; ``backend`` is resolved."""
    return _backward_impl(backend)(x, dy, (logit, shift, mean, rstd), relu)


@_backward_op.register_fake
def _(x, dy, logit, shift, mean, rstd, relu, backend):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, torch.empty_like(logit), torch.empty_like(logit if shift is None else shift)


def _setup_context(ctx, inputs, output) -> None:
    x, logit, shift, _, relu, backend = inputs
    _, mean, rstd, var = output
    ctx.save_for_backward(x, logit, shift, mean, rstd)  # one activation, even with the ReLU
    ctx.relu, ctx.backend = relu, backend
    ctx.mark_non_differentiable(mean, rstd, var)


def _backward(ctx, dy, *_stat_grads):
    x, logit, shift, mean, rstd = ctx.saved_tensors
    dx, dlogit, dshift = _backward_op(x, dy, logit, shift, mean, rstd, ctx.relu, ctx.backend)
    return dx, dlogit, None if shift is None else dshift, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFn(torch.autograd.Function):
    """The same launchers and saved tensors outside ``torch.compile``: a Python custom op's
    dispatch costs more host time per call than an ``autograd.Function`` (about 150 us more on
    the 2-core CPU here), and eager training is launch-bound, so eager calls take this path."""

    @staticmethod
    def forward(ctx, x, logit, shift, eps, relu, backend):
        y, mean, rstd, var = _forward_impl(backend)(x, logit, shift, eps, relu)
        _setup_context(ctx, (x, logit, shift, eps, relu, backend), (y, mean, rstd, var))
        return y, mean, rstd, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *_stat_grads):
        x, logit, shift, mean, rstd = ctx.saved_tensors
        saved = (logit, shift, mean, rstd)
        dx, dlogit, dshift = _backward_impl(ctx.backend)(x, dy, saved, ctx.relu)
        return dx, dlogit, None if shift is None else dshift, None, None, None


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
        training: use and track batch statistics (the ``recede::bounded_bn_forward`` op on
            the Triton backend).
        momentum: running-stat momentum, a float (resolved by the caller).
        eps: added to the variance.
        relu: apply ReLU to the output.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``;
            eval mode always uses the reference.
    """
    use_triton = resolve_backend(backend, x.device) == "triton"
    if training and use_triton:
        _check_inputs(x, logit, shift, running_mean, running_var, momentum, eps)
        op = _forward_op if torch.compiler.is_compiling() else _EagerFn.apply
        y, mean, _, var = op(x, logit, shift, eps, relu, "triton")
        if running_mean is not None:  # one foreach op for both buffers, as nn.BatchNorm2d
            batch = [mean.to(running_mean.dtype), var.to(running_var.dtype)]
            torch._foreach_lerp_([running_mean, running_var], batch, momentum)
        return y
    kwargs = {"training": training, "momentum": momentum, "eps": eps, "relu": relu}
    return bounded_batch_norm_ref(x, logit, shift, running_mean, running_var, **kwargs)
