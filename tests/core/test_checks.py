"""pipeline.core.checks: a verdict that says what the check could have caught."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core.checks import (
    MAX_REL_ERR,
    MIN_SENSITIVITY,
    Check,
    VerificationError,
    judge,
    raise_unless_verified,
)
from pipeline.core.tolerance import Tolerance, tolerance_for

RNG = np.random.default_rng(0)


def _ref(n: int = 4, spread: float = 1.0, offset: float = 0.0) -> np.ndarray:
    return offset + spread * RNG.standard_normal((n, 10))


def test_a_sensitive_check_within_the_bound_is_ok_and_states_its_figures() -> None:
    ref = _ref()
    check = judge("onnx", [(ref, ref + 1e-7)], tolerance_for("fp32"))
    assert check.verdict == "ok" and check.passed and check.cause == ""
    assert check.bound == pytest.approx(1e-4 * np.abs(ref).max() + 1e-6)
    assert check.input_effect == pytest.approx(np.abs(ref - np.roll(ref, 1, 0)).max())
    assert check.sensitivity > 1000 and "-> ok" in check.line()


def test_an_error_above_the_bound_fails() -> None:
    ref = _ref()
    check = judge("onnx", [(ref, ref + 1e-2)], tolerance_for("fp32"))
    assert check.verdict == "failed" and "above the bound" in check.cause


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_a_relative_error_of_one_never_passes_whatever_the_floor(precision) -> None:
    ref = _ref(spread=1e-5)  # outputs all near zero: the absolute floor dominates the bound
    lenient = Tolerance(1.0, 1.0, precision)  # a bound that would allow it
    check = judge("onnx-fp16", [(ref, np.zeros_like(ref))], lenient)
    assert check.max_rel_err == pytest.approx(1.0) and check.verdict == "failed"
    assert f"never allowed above {MAX_REL_ERR}" in check.cause


def test_near_constant_outputs_are_insensitive_not_ok() -> None:
    ref = _ref(spread=4e-6 / 3, offset=3.0)  # samples differ by a few 1e-6, bound is ~3e-4
    check = judge("onnx", [(ref, ref)], tolerance_for("fp32"), hint="HINT")
    assert check.max_abs_err == 0 and check.verdict == "insensitive" and not check.passed
    assert check.sensitivity < MIN_SENSITIVITY and check.cause.endswith("HINT")
    # and the reason is real: a model that ignored its input passes the bound
    constant = np.broadcast_to(ref.mean(0), ref.shape)
    assert judge("onnx", [(ref, constant)], tolerance_for("fp32")).max_abs_err <= check.bound


def test_a_single_sample_cannot_show_input_dependence() -> None:
    ref = _ref(n=1)
    assert judge("onnx", [(ref, ref)], tolerance_for("fp32")).verdict == "insensitive"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_fail(bad) -> None:
    ref = _ref()
    got = ref.copy()
    got[0, 0] = bad
    check = judge("onnx", [(ref, got)], tolerance_for("fp32"))
    assert check.verdict == "failed" and math.isinf(check.max_abs_err)


def test_a_shape_mismatch_fails() -> None:
    ref = _ref()
    assert judge("onnx", [(ref, ref[:, :5])], tolerance_for("fp32")).verdict == "failed"


def test_failure_wins_over_insensitivity_and_the_records_round_trip() -> None:
    ref = _ref(spread=1e-9, offset=1.0)
    check = judge("onnx", [(ref, ref + 1.0)], tolerance_for("fp32"))
    assert check.verdict == "failed"
    assert Check.from_dict(check.to_dict()) == check


def test_raise_unless_verified_names_each_check_and_respects_acceptance() -> None:
    ref = _ref(spread=1e-9, offset=1.0)
    blind = judge("onnx", [(ref, ref)], tolerance_for("fp32"), path="model.onnx")
    raise_unless_verified([blind], accept_insensitive=True, where="x")
    with pytest.raises(VerificationError, match=r"onnx \(model.onnx\) could not be verified"):
        raise_unless_verified([blind], accept_insensitive=False, where="x")
    failed = judge("fold", [(_ref(), _ref())], tolerance_for("fp32"))
    with pytest.raises(VerificationError, match=r"fold \(in memory\) failed verification"):
        raise_unless_verified([failed], accept_insensitive=True, where="x")
