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


def float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype of ``model``'s parameters (float32 when mixed or none).

    Removal (``pipeline.prune.remove``) and folding (``pipeline.fold.batchnorm``) compute and check in float64
    and cast the result back to this dtype: the transforms are exact in arithmetic, but in
    float32 the corrections and checks carry rounding of the size of the intermediate
    activations, which in a deep untrained net (timm's ``mobileone_s0``) reached 1.7e-4 of the
    output scale and failed an exact removal (2e-13 in float64). The float32 result is then the
    exactly transformed model, rounded once, and the checks tell a real approximation from
    rounding.
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32
