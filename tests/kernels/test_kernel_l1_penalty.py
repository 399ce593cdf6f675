"""L1 penalty: reference against autograd, Triton against the reference."""

import pytest
import torch

from kernels.l1_penalty import l1_penalty_, l1_penalty_ref, l1_penalty_triton

# Named tolerances: the value is a sum in a different order; sign gradients are exact.
VALUE = {"rtol": 1e-5, "atol": 1e-6}
EXACT = {"rtol": 0.0, "atol": 0.0}
SIZES = [(1,), (7,), (1000,), (4099,), (1, 7, 1000, 4099)]


def test_reference_matches_autograd():
    g = torch.randn(4099, generator=torch.Generator().manual_seed(2))
    g[::97] = 0.0  # sign(0) = 0, as autograd's abs gives
    value, grad = l1_penalty_ref(g, strength=0.5)  # exact in fp32
    g64 = g.double().requires_grad_()
    want = 0.5 * g64.abs().sum()
    want.backward()
    torch.testing.assert_close(value.double(), want.detach(), **VALUE)
    torch.testing.assert_close(grad.double(), g64.grad, **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_triton_matches_reference(sizes, dtype, make_layers, clone, triton_backend):
    ref_layers = make_layers(sizes, dtype=dtype)
    with torch.no_grad():
        ref_layers[-1][::5] = 0.0
    tri_layers = clone(ref_layers)
    want = l1_penalty_(ref_layers, strength=0.1, backend="torch")
    got = l1_penalty_(tri_layers, strength=0.1, backend=triton_backend)
    torch.testing.assert_close(got, want, **VALUE)
    for p, q in zip(tri_layers, ref_layers, strict=True):
        torch.testing.assert_close(p.grad, q.grad, **EXACT)


def test_grads_are_added_to_existing_grad(make_layers, triton_backend):
    layers = make_layers((7, 1000))
    layers[1].grad = torch.ones_like(layers[1])
    value = l1_penalty_(layers, strength=0.5, backend=triton_backend)
    torch.testing.assert_close(layers[0].grad, 0.5 * layers[0].detach().sign(), **EXACT)
    torch.testing.assert_close(layers[1].grad, 1.0 + 0.5 * layers[1].detach().sign(), **EXACT)
    want = 0.5 * sum(p.detach().abs().sum() for p in layers)
    torch.testing.assert_close(value, want, **VALUE)
    assert value.grad_fn is None


def test_launcher_rejects_bad_inputs(device):
    with pytest.raises(ValueError, match="strength.*inf"):
        l1_penalty_triton(torch.zeros(3, device=device), strength=float("inf"))
    with pytest.raises(ValueError, match=r"got shape \(0,\)"):
        l1_penalty_triton(torch.zeros(0, device=device), strength=1.0)


def test_public_rejects_non_float_params(device):
    with pytest.raises(ValueError, match=r"params\[1\].*torch.int64"):
        l1_penalty_([torch.zeros(3, device=device), torch.zeros(3, dtype=torch.long)], strength=1.0)
