"""One relative-error formula for every "does the transformed model still compute the same" check."""

from __future__ import annotations

import torch


def rel_err(got: torch.Tensor, want: torch.Tensor, *, floor: float = 1e-12) -> float:
    """``max|got - want| / max|want|``: the error as a share of the reference output's scale.

    Args:
        got: the transformed model's output.
        want: the reference output.
        floor: smallest denominator, so an all-zero reference does not divide by zero (float64
            comparisons pass a tinier one).
    """
    return float((got - want).abs().max()) / max(float(want.abs().max()), floor)
