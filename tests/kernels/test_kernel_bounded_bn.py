"""Bounded BN: Triton forward/backward against autograd on the reference, and running
statistics against ``nn.BatchNorm``."""

import pytest
import torch
from torch import nn

from kernels.bounded_bn import (
    bounded_batch_norm,
    bounded_batch_norm_forward_triton,
    bounded_batch_norm_ref,
)

# Named tolerances. fp32: with only 2-3 values per channel (the wide shapes below) x - mean
# cancels, so one ulp of the mean shows as ~1e-5 in y; 1e-4 still catches any real error.
FP32 = {"rtol": 1e-4, "atol": 1e-4}
# Half precisions: inputs are rounded to the dtype, the math is fp32, the output is rounded
# (and truncated, for bf16 under the interpreter) back to the dtype.
HALF = {
    torch.float16: {"rtol": 5e-3, "atol": 5e-3},
    torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
}
SHAPES = [(4, 1, 3, 3), (4, 7, 3, 3), (2, 1000, 2, 2), (3, 4099)]
EPS = 1e-5


def _inputs(shape, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    cpu = {
        "x": torch.randn(shape, generator=gen) * 2.0 + 0.5,
        "dy": torch.randn(shape, generator=gen),
        "logit": torch.randn(c, generator=gen),
        "shift": torch.randn(c, generator=gen),
        "running_mean": torch.randn(c, generator=gen) * 0.1,
        "running_var": torch.rand(c, generator=gen) + 0.5,
    }
    out = {k: v.to(device) for k, v in cpu.items()}
    out["x"] = out["x"].to(dtype)
    out["dy"] = out["dy"].to(dtype)
    return out


def _run(inp, backend, *, relu, with_shift, momentum=0.1, reference=False):
    """One training forward + backward; returns outputs, grads and the updated stats."""
    x = inp["x"].clone().requires_grad_()
    logit = inp["logit"].clone().requires_grad_()
    shift = inp["shift"].clone().requires_grad_() if with_shift else None
    stats = (inp["running_mean"].clone(), inp["running_var"].clone())
    kwargs = {"training": True, "momentum": momentum, "eps": EPS, "relu": relu}
    if reference:
        y = bounded_batch_norm_ref(x, logit, shift, *stats, **kwargs)
    else:
        y = bounded_batch_norm(x, logit, shift, *stats, **kwargs, backend=backend)
    y.backward(inp["dy"])
    out = {
        "y": y,
        "dx": x.grad,
        "dlogit": logit.grad,
        "running_mean": stats[0],
        "running_var": stats[1],
    }
    if with_shift:
        out["dshift"] = shift.grad
    return out


@pytest.mark.parametrize("with_shift", [True, False], ids=["shift", "no_shift"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_autograd_on_reference(shape, relu, with_shift, device, triton_backend):
    inp = _inputs(shape, device)
    want = _run(inp, "torch", relu=relu, with_shift=with_shift, reference=True)
    got = _run(inp, triton_backend, relu=relu, with_shift=with_shift)
    assert got["y"].grad_fn.name() == "_EagerFnBackward"  # eager: the op's autograd.Function twin
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **FP32, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 7, 3, 3), (2, 1000, 2, 2)], ids=str)
def test_triton_half_precision_inputs(shape, dtype, device, triton_backend):
    inp = _inputs(shape, device, dtype=dtype)
    got = _run(inp, triton_backend, relu=True, with_shift=True)
    ref_inp = {**inp, "x": inp["x"].float(), "dy": inp["dy"].float()}  # same rounded values
    want = _run(ref_inp, "torch", relu=True, with_shift=True, reference=True)
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    for name in ("y", "dx"):
        torch.testing.assert_close(got[name].float(), want[name], **HALF[dtype], msg=name)
    for name in ("dlogit", "dshift", "running_mean", "running_var"):
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], **HALF[dtype], msg=name)


@pytest.mark.parametrize(
    ("module", "shape"), [(nn.BatchNorm2d, (4, 7, 3, 3)), (nn.BatchNorm1d, (5, 7))], ids=str
)
def test_running_stats_match_nn_batchnorm(module, shape, device, triton_backend):
    inp = _inputs(shape, device)
    bn = module(shape[1], eps=1e-3, momentum=0.3).to(device).train()
    with torch.no_grad():
        bn.weight.copy_(torch.sigmoid(inp["logit"]))
        bn.bias.copy_(inp["shift"])
        bn.running_mean.copy_(inp["running_mean"])
        bn.running_var.copy_(inp["running_var"])
    stats = (inp["running_mean"].clone(), inp["running_var"].clone())
    for step in range(3):
        x = _inputs(shape, device, seed=step + 1)["x"]
        y = bounded_batch_norm(
            x,
            inp["logit"],
            inp["shift"],
            *stats,
            training=True,
            momentum=0.3,
            eps=1e-3,
            backend=triton_backend,
        )
        torch.testing.assert_close(y, bn(x), **FP32)
    torch.testing.assert_close(stats[0], bn.running_mean, **FP32)
    torch.testing.assert_close(stats[1], bn.running_var, **FP32)


def test_without_running_stats_and_channels_last(device, triton_backend):
    inp = _inputs((4, 7, 3, 3), device)
    x = inp["x"].to(memory_format=torch.channels_last).requires_grad_()
    y = bounded_batch_norm(
        x,
        inp["logit"],
        inp["shift"],
        None,
        None,
        training=True,
        momentum=0.1,
        eps=EPS,
        relu=True,
        backend=triton_backend,
    )
    want = bounded_batch_norm_ref(
        inp["x"],
        inp["logit"],
        inp["shift"],
        None,
        None,
        training=True,
        momentum=0.1,
        eps=EPS,
        relu=True,
    )
    torch.testing.assert_close(y, want, **FP32)
    y.backward(inp["dy"])
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_eval_mode_uses_reference_and_leaves_stats(device, triton_backend):
    inp = _inputs((4, 7, 3, 3), device)
    stats = (inp["running_mean"].clone(), inp["running_var"].clone())
    y = bounded_batch_norm(
        inp["x"],
        inp["logit"],
        inp["shift"],
        *stats,
        training=False,
        momentum=0.1,
        eps=EPS,
        backend=triton_backend,
    )
    want = bounded_batch_norm_ref(
        inp["x"], inp["logit"], inp["shift"], *stats, training=False, momentum=0.1, eps=EPS
    )
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(stats[0], inp["running_mean"], rtol=0, atol=0)


def test_auto_on_cpu_runs_the_reference():
    inp = _inputs((4, 7, 3, 3), torch.device("cpu"))
    logit = inp["logit"].requires_grad_()
    y = bounded_batch_norm(inp["x"], logit, None, None, None, training=True, momentum=0.1, eps=EPS)
    assert y.grad_fn.name() != "_EagerFnBackward"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"logit": torch.zeros(6)}, r"logit must be .*\(7,\).*got shape \(6,\)"),
        ({"x": torch.zeros(1, 7, 1, 1)}, r"more than one value per channel.*\(1, 7, 1, 1\)"),
        ({"x": torch.zeros(7)}, r"x must be .*\(7,\)"),
        ({"running_var": None}, "both running_mean and running_var"),
        ({"running_mean": torch.zeros(8)}, r"running_mean must be .*got shape \(8,\)"),
        ({"momentum": 1.5}, "momentum.*1.5"),
        ({"eps": 0.0}, "eps.*0.0"),
    ],
    ids=["logit", "one_value", "1d", "half_stats", "stats_shape", "momentum", "eps"],
)
def test_triton_path_rejects_bad_inputs(change, match, device, triton_backend):
    args = {
        "x": torch.zeros(2, 7, 3, 3),
        "logit": torch.zeros(7),
        "shift": None,
        "running_mean": torch.zeros(7),
        "running_var": torch.ones(7),
        "momentum": 0.1,
        "eps": EPS,
    }
    args.update(change)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    scalars = {"momentum": args.pop("momentum"), "eps": args.pop("eps")}
    with pytest.raises(ValueError, match=match):
        bounded_batch_norm(*args.values(), training=True, **scalars, backend=triton_backend)
    if not {"momentum", "running_mean", "running_var"} & change.keys():  # the launcher's own
        with pytest.raises(ValueError, match=match):
            bounded_batch_norm_forward_triton(
                args["x"], args["logit"], None, scalars["eps"], relu=False
            )
