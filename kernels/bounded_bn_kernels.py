"""The Triton kernels of :mod:`kernels.bounded_bn`, built on first use (triton imported then).

Forward: per-channel batch statistics (fp32 sums, shifted by the channel's first value so the
variance does not cancel), then ``act(sigmoid(logit) * (x - mean) * rstd + shift)`` in a second
pass over ``x``; it writes the mean, rstd and unbiased variance (for the running statistics,
which the caller updates). Backward: the two channel sums, then ``dx``; ``dlogit`` and
``dshift`` fall out of the sums, and the ReLU mask is recomputed from ``x``, mean and rstd.
"""

from __future__ import annotations

import functools


@functools.cache
def forward_kernel():
    """The compiled forward kernel (statistics, then the normalised and activated output)."""
    import triton
    import triton.language as tl

    @triton.jit
    def bn_forward_kernel(
        x_ptr,
        y_ptr,
        logit_ptr,
        shift_ptr,
        mean_ptr,
        rstd_ptr,
        var_ptr,
        C,
        HW,
        R,
        eps,
        HAS_SHIFT: tl.constexpr,
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
        tl.store(var_ptr + c, var * R / (R - 1), mask=c_mask)  # unbiased, for running_var
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
def backward_kernel():
    """The compiled backward kernel (the two channel sums, then ``dx``)."""
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
    ):  # dshift (the sum of dy) is written even without a shift: the op always returns it
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
