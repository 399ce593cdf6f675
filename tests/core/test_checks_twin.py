"""pipeline.core.checks: one policy for every check of an untrained model, and a failed check is
never `insensitive` nor accepted as such (issue 31 item 11, issue 32 item 13, issue 33 item 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.core.checks import (
    Check,
    VerificationError,
    calibrated_twin,
    judge,
    on_twin,
    raise_unless_verified,
    with_twin,
)
from pipeline.core.tolerance import tolerance_for

RNG = np.random.default_rng(0)


def _blind() -> Check:
    """An insensitive check: the samples' outputs differ by far less than the bound."""
    ref = 3.0 + 1e-9 * RNG.standard_normal((4, 10))
    check = judge("onnx", [(ref, ref)], tolerance_for("fp32"), path="model.onnx")
    assert check.verdict == "insensitive"
    return check


def _twin(verdict: str) -> Check:
    """A twin's check with the given verdict (ok, failed or insensitive)."""
    ref = (
        RNG.standard_normal((4, 10))
        if verdict != "insensitive"
        else 3.0 + 1e-9 * RNG.random((4, 10))
    )
    got = ref + (0.5 if verdict == "failed" else 0.0)
    check = judge("onnx", [(ref, got)], tolerance_for("fp32"))
    assert check.verdict == verdict
    return check


def _untrained() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).eval()


def test_a_failed_twin_makes_the_check_failed_and_no_acceptance_ships_it() -> None:
    """The reported case (issue 32 item 13): the twin's fp16 check failed at a relative error of
    0.61, and the verdict stayed `insensitive`, which --accept-insensitive shipped."""
    check = with_twin(_blind(), _twin("failed"))
    assert check.verdict == "failed" and not check.passed
    assert check.cause.startswith("on its BN-calibrated twin") and "above the bound" in check.cause
    assert check.twin["verdict"] == "failed" and "-> failed" in check.line()
    with pytest.raises(VerificationError, match="never accepts a failed check"):
        raise_unless_verified([check], accept_insensitive=True, where="x")


@pytest.mark.parametrize(
    ("twin", "verdict"), [("ok", "twin-ok"), ("failed", "failed"), ("insensitive", "insensitive")]
)
def test_the_twin_decides_an_untrained_models_insensitive_check(twin: str, verdict: str) -> None:
    model, batch = _untrained(), torch.randn(4, 3, 6, 6)
    seen: list[nn.Module] = []

    def recheck(copy: nn.Module) -> Check:
        seen.append(copy)
        return _twin(twin)

    check = on_twin(_blind(), model, batch, recheck)
    assert check.verdict == verdict and check.twin["verdict"] == twin
    (copy,) = seen  # the twin: BN statistics of the batch, the model itself unchanged
    assert not torch.equal(copy[1].running_var, torch.ones(4))
    assert torch.equal(model[1].running_var, torch.ones(4))


@given(st.sampled_from(["ok", "failed"]), st.booleans())
@settings(max_examples=20, deadline=None)
def test_no_twin_for_a_trained_model_or_a_check_that_could_see(verdict: str, trained: bool) -> None:
    """Only an untrained model's insensitive check is re-run; the others stand as they are."""
    model = _untrained()
    if trained:
        model[1].running_var.fill_(2.0)
    check = _twin(verdict)
    assert on_twin(check, model, torch.randn(4, 3, 6, 6), lambda t: pytest.fail("re-run")) is check
    blind = _blind()
    if trained:
        assert on_twin(blind, model, torch.randn(4, 3, 6, 6), lambda t: _twin("ok")) is blind
    assert on_twin(None, model, torch.randn(4, 3, 6, 6), lambda t: _twin("ok")) is None


def test_the_calibrated_twin_holds_the_batch_statistics() -> None:
    model, batch = _untrained(), torch.randn(8, 3, 6, 6)
    twin = calibrated_twin(model, batch)
    features = model[0](batch)
    assert torch.allclose(twin[1].running_mean, features.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(twin[1].running_var, features.var((0, 2, 3)), rtol=1e-4)
    assert not twin.training and not model.training


def test_accepted_insensitive_checks_are_returned_with_why() -> None:
    """What a manifest records: which checks were accepted as insensitive, and why."""
    blind, good = _blind(), _twin("ok")
    assert raise_unless_verified([good], accept_insensitive=True, where="x") == []
    (record,) = raise_unless_verified([good, blind], accept_insensitive=True, where="x")
    assert record["what"] == "onnx" and record["path"] == "model.onnx"
    assert record["verdict"] == "insensitive" and record["why"] == blind.cause
    assert record["sensitivity"] == pytest.approx(blind.sensitivity) and record["twin"] is None
    with pytest.raises(VerificationError, match="could not be verified"):
        raise_unless_verified([good, blind], accept_insensitive=False, where="x")
