"""The ``recede::`` custom ops: ``torch.library.opcheck`` on every op (schema, fake tensor,
autograd registration, AOT dispatch), sizes 1, 7 and 4099 and fp32/fp16/bf16, on the torch
reference and on the Triton kernels (interpreted on the CPU, compiled on a GPU); and the
bounded-BN reference formulas against autograd."""

import pytest
import torch
from torch.library import opcheck

import kernels.ista_shrink
import kernels.l1_penalty
import kernels.polarization_penalty
import kernels.receding_penalty  # noqa: F401  (importing an op's module registers it)
from kernels import packing
from kernels.bounded_bn import (
    bounded_batch_norm_backward_ref,
    bounded_batch_norm_forward_ref,
    bounded_batch_norm_ref,
)

SIZES = (1, 7, 4099)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BN_SHAPES = [(4, 1, 3, 3), (2, 7, 5, 5), (3, 4099)]  # (N, C, ...): C of 1, 7 and 4099
OPS = torch.ops.recede
# The forward reference against autograd through F.batch_norm (both fp32).
FP32 = {"rtol": 1e-4, "atol": 1e-4}


def _bn_inputs(shape, dtype, device, shift=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype)
    logit = torch.randn(c, generator=gen).to(device)
    return x, logit, torch.randn(c, generator=gen).to(device) if shift else None


def _backend(name: str, request: pytest.FixtureRequest) -> str:
    """``"torch"``, or ``"triton"`` after the fixture's skip checks (interpreter or GPU)."""
    return request.getfixturevalue("triton_backend") if name == "triton" else name


BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("with_shift", [True, False], ids=["shift", "no_shift"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_reference_formulas_match_autograd(shape, with_shift, relu):
    x, logit, shift = _bn_inputs(shape, torch.float32, "cpu", shift=with_shift)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    leaves = [t.clone().requires_grad_() for t in (x, logit)]
    shift_leaf = shift.clone().requires_grad_() if with_shift else None
    kwargs = {"training": True, "momentum": 0.1, "eps": 1e-5, "relu": relu}
    want = bounded_batch_norm_ref(*leaves, shift_leaf, None, None, **kwargs)
    want.backward(dy)
    y, mean, rstd, var = bounded_batch_norm_forward_ref(x, logit, shift, 1e-5, relu)
    dx, dlogit, dshift = bounded_batch_norm_backward_ref(x, dy, (logit, shift, mean, rstd), relu)
    torch.testing.assert_close(y, want.detach(), **FP32)
    torch.testing.assert_close(dx, leaves[0].grad, **FP32)
    torch.testing.assert_close(dlogit, leaves[1].grad, **FP32)
    if with_shift:
        torch.testing.assert_close(dshift, shift_leaf.grad, **FP32)
    dims = [0, *range(2, x.dim())]
    torch.testing.assert_close(var, x.var(dim=dims, correction=1), **FP32)


def _bn_cases():
    """Every shape and dtype on both backends; C = 4099 on the Triton interpreter takes 35 to
    65 s per case on 2 cores, so those three are ``slow`` (the kernel tests cover C = 4099)."""
    for backend in BACKENDS:
        for shape in BN_SHAPES:
            for dtype in DTYPES:
                heavy = backend == "triton" and shape[1] > 1000
                marks = [pytest.mark.slow] if heavy else []
                yield pytest.param(
                    backend, shape, dtype, marks=marks, id=f"{backend}-{shape}-{dtype}"
                )


@pytest.mark.parametrize(("backend", "shape", "dtype"), _bn_cases())
def test_opcheck_bounded_bn(backend, shape, dtype, device, request):
    backend = _backend(backend, request)
    for relu, with_shift in ((True, True), (False, False)):
        x, logit, shift = _bn_inputs(shape, dtype, device, shift=with_shift)
        x.requires_grad_()
        logit.requires_grad_()
        opcheck(OPS.bounded_bn_forward, (x, logit, shift, 1e-5, relu, backend))
        _, mean, rstd, _ = OPS.bounded_bn_forward(x, logit, shift, 1e-5, relu, backend)
        dy = torch.randn_like(x).detach()
        args = (x.detach(), dy, logit.detach(), shift, mean, rstd, relu, backend)
        opcheck(OPS.bounded_bn_backward, args)


def _layers(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen) * 2).to(device, dtype) for n in SIZES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("name", "scalars"),
    [
        ("receding_penalty_", (0.1, 3.0)),
        ("l1_penalty_", (0.1,)),
        ("polarization_penalty_", (0.1, 1.2)),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_penalties(backend, name, scalars, dtype, device, request):
    params = _layers(dtype, device)
    grads = [torch.full_like(p, 0.25) for p in params]
    opcheck(getattr(OPS, name), (params, grads, *scalars, _backend(backend, request)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_ista_shrink(dtype, backend, device, request):
    args = (_layers(dtype, device), [0.5, 0.0, 1.5], _backend(backend, request))
    opcheck(OPS.ista_shrink_, args)


def test_penalty_op_mutates_only_the_grads():
    params = _layers(torch.float32, "cpu")
    before = [p.clone() for p in params]
    grads = [torch.zeros_like(p) for p in params]
    value = OPS.receding_penalty_(params, grads, 0.1, 3.0, "torch")
    from kernels.receding_penalty import receding_penalty_ref

    want_value, want_grad = receding_penalty_ref(packing.pack(params), strength=0.1)
    torch.testing.assert_close(value, want_value)
    torch.testing.assert_close(torch.cat(grads), want_grad)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
