"""Polarization penalty: reference against autograd (global mean), Triton against it."""

import pytest
import torch

from kernels import packing
from kernels.polarization_penalty import (
    polarization_penalty_,
    polarization_penalty_ref,
    polarization_penalty_triton,
)

# Named tolerances: the value is a sum in a different order; the gradient is a few signs plus
# one constant, so it differs only by fp32 rounding of that constant.
VALUE = {"rtol": 1e-5, "atol": 1e-5}
GRAD = {"rtol": 1e-6, "atol": 1e-6}
HALF_GRAD = {
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-4},
}
SIZES = [(1,), (7,), (1000,), (4099,), (1, 7, 1000, 4099)]


def _autograd_truth(layers, strength, t):
    """The paper's R over all layers with one network-wide mean, by autograd in fp64."""
    g = torch.cat([p.detach().reshape(-1) for p in layers]).double().requires_grad_()
    value = strength * (t * g.abs().sum() - (g - g.mean()).abs().sum())
    value.backward()
    return value.detach(), g.grad


def test_reference_matches_autograd_with_global_mean(make_layers):
    # Layers with very different means: a per-layer mean would give another gradient.
    layers = make_layers((7, 1000, 33), scale=0.2, offset=0.5)
    with torch.no_grad():
        layers[1].add_(0.4)
    value, grad = polarization_penalty_ref(packing.pack(layers).cpu(), strength=0.3, t=1.2)
    want_value, want_grad = _autograd_truth([p.cpu() for p in layers], 0.3, 1.2)
    torch.testing.assert_close(value.double(), want_value, **VALUE)
    torch.testing.assert_close(grad.double(), want_grad, **GRAD)


@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_triton_matches_reference(sizes, make_layers, clone, triton_backend):
    ref_layers = make_layers(sizes, scale=0.3, offset=0.5)
    tri_layers = clone(ref_layers)
    want = polarization_penalty_(ref_layers, strength=0.1, t=1.2, backend="torch")
    got = polarization_penalty_(tri_layers, strength=0.1, t=1.2, backend=triton_backend)
    torch.testing.assert_close(got, want, **VALUE)
    for p, q in zip(tri_layers, ref_layers, strict=True):
        torch.testing.assert_close(p.grad, q.grad, **GRAD)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_half_precision(dtype, make_layers, clone, triton_backend):
    ref_layers = make_layers(dtype=dtype, scale=0.3, offset=0.5)
    tri_layers = clone(ref_layers)
    want = polarization_penalty_(ref_layers, strength=0.1, backend="torch")
    got = polarization_penalty_(tri_layers, strength=0.1, backend=triton_backend)
    torch.testing.assert_close(got, want, **VALUE)
    for p, q in zip(tri_layers, ref_layers, strict=True):
        torch.testing.assert_close(p.grad, q.grad, **HALF_GRAD[dtype])


def test_grads_are_added_to_existing_grad(make_layers, triton_backend):
    layers = make_layers((7, 1000), scale=0.3, offset=0.5)
    before = [torch.randn_like(p) for p in layers]
    for p, b in zip(layers, before, strict=True):
        p.grad = b.clone()
    value = polarization_penalty_(layers, strength=0.2, t=1.5, backend=triton_backend)
    want_value, want_grad = _autograd_truth([p.cpu() for p in layers], 0.2, 1.5)
    torch.testing.assert_close(value.double().cpu(), want_value, **VALUE)
    got = torch.cat([(p.grad - b).reshape(-1) for p, b in zip(layers, before, strict=True)])
    torch.testing.assert_close(got.double().cpu(), want_grad, **GRAD)


def test_launcher_rejects_bad_t(device):
    with pytest.raises(ValueError, match="t must be.*-0.5"):
        polarization_penalty_triton(torch.zeros(4, device=device), strength=1.0, t=-0.5)
