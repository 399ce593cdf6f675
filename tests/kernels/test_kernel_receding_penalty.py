"""Receding penalty: reference against autograd, Triton against the reference."""

import pytest
import torch
import torch.nn.functional as F

from kernels import packing
from kernels.receding_penalty import (
    receding_penalty_,
    receding_penalty_ref,
    receding_penalty_triton,
)

# Named tolerances. fp32: sums of up to ~5k terms in a different order. Half precisions: the
# math is fp32 in both paths, so only the final cast of the gradient to the param dtype differs.
FP32 = {"rtol": 1e-5, "atol": 1e-7}
HALF = {
    torch.float16: {"rtol": 1e-3, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-5},
}
SIZES = [(1,), (7,), (1000,), (4099,), (1, 7, 1000, 4099)]


def _autograd_truth(w: torch.Tensor, strength: float, bias: float):
    """Value and gradient of the formula, by autograd in fp64 (logsigmoid: finite everywhere)."""
    w64 = w.detach().double().requires_grad_()
    s = torch.sigmoid(w64 + bias)
    value = strength * (s * (1 - F.logsigmoid(w64 + bias))).sum()
    value.backward()
    return value.detach(), w64.grad


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_reference_matches_autograd(scale):
    w = torch.randn(4099, generator=torch.Generator().manual_seed(1)) * scale
    value, grad = receding_penalty_ref(w, strength=0.3, bias=3.0)
    want_value, want_grad = _autograd_truth(w, 0.3, 3.0)
    torch.testing.assert_close(value.double(), want_value, **FP32)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_triton_matches_reference(sizes, make_layers, clone, triton_backend):
    ref_layers = make_layers(sizes, scale=3.0)
    tri_layers = clone(ref_layers)
    want = receding_penalty_(ref_layers, strength=0.1, backend="torch")
    got = receding_penalty_(tri_layers, strength=0.1, backend=triton_backend)
    torch.testing.assert_close(got, want, **FP32)
    for p, q in zip(tri_layers, ref_layers, strict=True):
        torch.testing.assert_close(p.grad, q.grad, **FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_half_precision(dtype, make_layers, clone, triton_backend):
    ref_layers = make_layers(dtype=dtype, scale=3.0)
    tri_layers = clone(ref_layers)
    want = receding_penalty_(ref_layers, strength=0.1, backend="torch")
    got = receding_penalty_(tri_layers, strength=0.1, backend=triton_backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, **FP32)
    for p, q in zip(tri_layers, ref_layers, strict=True):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, q.grad, **HALF[dtype])


def test_triton_extreme_logits_stay_finite_and_accurate(device, triton_backend):
    w = torch.tensor([-1e4, -80.0, -20.0, -3.0, 0.0, 6.0, 12.0, 30.0, 1e4], device=device)
    flat = w.contiguous()
    value, grad = receding_penalty_triton(flat, strength=1.0, bias=3.0)
    want_value, _ = _autograd_truth(w.cpu(), 1.0, 3.0)
    # Closed form in fp64: autograd's two terms cancel to e^-2|z| and lose it at large z.
    z = w.cpu().double() + 3.0
    want_grad = -F.logsigmoid(z) * torch.sigmoid(z) * torch.sigmoid(-z)
    assert torch.isfinite(grad).all() and torch.isfinite(value)
    torch.testing.assert_close(value.cpu().double(), want_value, **FP32)
    # Relative accuracy even where the gradient is tiny (down to ~1e-29 here).
    torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grads_are_added_to_existing_grad(backend, make_layers, request):
    if backend == "triton":
        backend = request.getfixturevalue("triton_backend")
    layers = make_layers((7, 1000))
    existing = torch.full_like(layers[0], 2.5)
    layers[0].grad = existing.clone()
    ids = [id(p) for p in layers]
    receding_penalty_(layers, strength=0.2, backend=backend)
    _, grad = receding_penalty_ref(packing.pack(layers), strength=0.2)
    torch.testing.assert_close(layers[0].grad, existing + grad[:7], **FP32)
    torch.testing.assert_close(layers[1].grad, grad[7:], **FP32)  # allocated from zeros
    assert [id(p) for p in layers] == ids


def test_value_is_detached_fp32_scalar_without_graph(make_layers):
    layers = make_layers((7,))
    value = receding_penalty_(layers, strength=0.1, backend="torch")
    assert value.shape == () and value.dtype == torch.float32
    assert value.grad_fn is None and not value.requires_grad
    assert layers[0].grad.grad_fn is None


def test_empty_params_give_zero_and_no_grads():
    assert receding_penalty_([], strength=1.0).item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"strength": -1.0}, "strength.*-1.0"), ({"strength": 1.0, "bias": float("nan")}, "bias")],
)
def test_launcher_rejects_bad_scalars(kwargs, match, device):
    with pytest.raises(ValueError, match=match):
        receding_penalty_triton(torch.zeros(4, device=device), **kwargs)


def test_launcher_rejects_bad_buffer(device):
    with pytest.raises(ValueError, match=r"got shape \(2, 2\)"):
        receding_penalty_triton(torch.zeros(2, 2, device=device), strength=1.0)
    with pytest.raises(ValueError, match="torch.int64"):
        receding_penalty_triton(torch.zeros(4, dtype=torch.long, device=device), strength=1.0)


def test_public_rejects_bad_backend(make_layers):
    with pytest.raises(ValueError, match="'cuda'"):
        receding_penalty_(make_layers((7,)), strength=1.0, backend="cuda")
