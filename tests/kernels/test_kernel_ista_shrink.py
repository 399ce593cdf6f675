"""ISTA shrink: exact zeros, per-layer thresholds, Triton bit-equal to the reference."""

import pytest
import torch

from kernels.ista_shrink import ista_shrink_, ista_shrink_ref, ista_shrink_triton_

EXACT = {"rtol": 0.0, "atol": 0.0}
# The interpreter casts fp32 -> bf16 by truncation where GPUs round to nearest even, so under
# TRITON_INTERPRET a bf16 result may sit one bf16 ulp (2**-7 relative) below the reference.
ONE_BF16_ULP = {"rtol": 2.0**-7, "atol": 0.0}
SIZES = [(1,), (7,), (1000,), (4099,), (1, 7, 1000, 4099)]


def _args(n_layers):
    return {"lrs": [0.1] * n_layers, "lambdas": [float(i + 1) for i in range(n_layers)], "rho": 2.0}


def test_reference_soft_thresholds_with_exact_zeros():
    g = torch.tensor([-1.0, -0.3, -0.2, 0.0, 0.1, 0.2, 0.25, 2.0])
    got = ista_shrink_ref(g, 0.25)
    want = torch.tensor([-0.75, -0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 1.75])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    zeros = got[2:7]
    assert (zeros == 0).all() and not torch.signbit(zeros).any()  # +0.0, never -0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_triton_is_bit_equal_to_reference(sizes, dtype, device, make_layers, clone, triton_backend):
    ref_layers = make_layers(sizes, dtype=dtype, scale=0.5)
    with torch.no_grad():
        for p in ref_layers:
            p[0] = 0.01  # under every threshold: must come out exactly zero
    tri_layers = clone(ref_layers)
    ids = [id(p) for p in tri_layers]
    ista_shrink_(ref_layers, **_args(len(sizes)), backend="torch")
    ista_shrink_(tri_layers, **_args(len(sizes)), backend=triton_backend)
    assert [id(p) for p in tri_layers] == ids
    tol = ONE_BF16_ULP if dtype == torch.bfloat16 and device.type == "cpu" else EXACT
    for p, q in zip(tri_layers, ref_layers, strict=True):
        assert p.dtype == dtype
        torch.testing.assert_close(p, q, **tol)
        assert torch.equal(p == 0, q == 0) and p[0] == 0


def test_each_layer_gets_its_own_threshold(make_layers, triton_backend):
    layers = make_layers((1000, 1000, 7))
    before = [p.detach().clone() for p in layers]
    ista_shrink_(
        layers, lrs=[0.1, 0.1, 1.0], lambdas=[0.0, 5.0, 1.0], rho=1.0, backend=triton_backend
    )
    torch.testing.assert_close(layers[0].detach(), before[0], rtol=0, atol=0)  # threshold 0
    for p, b, thr in zip(layers[1:], before[1:], (0.5, 1.0), strict=True):
        torch.testing.assert_close(p.detach(), ista_shrink_ref(b, thr), rtol=0, atol=0)
        assert ((b.abs() <= thr) == (p == 0)).all()


def test_public_rejects_mismatched_lengths(make_layers):
    with pytest.raises(ValueError, match="2 params, 1 lrs and 2 lambdas"):
        ista_shrink_(make_layers((3, 4)), lrs=[0.1], lambdas=[1.0, 1.0], rho=1.0)
    with pytest.raises(ValueError, match=r"lambdas\[1\].*-1.0"):
        ista_shrink_(make_layers((3, 4)), lrs=[0.1, 0.1], lambdas=[1.0, -1.0], rho=1.0)


def test_launcher_rejects_inconsistent_layout(device):
    flat = torch.zeros(10, device=device)
    with pytest.raises(ValueError, match="sizes summing to 9"):
        ista_shrink_triton_(flat, [0.1, 0.1], [4, 5])
    with pytest.raises(ValueError, match=r"thresholds\[0\].*nan"):
        ista_shrink_triton_(flat, [float("nan")], [10])
