"""One relative-error formula for every "does the transformed model still compute the same" check."""

from __future__ import annotations

import math
from typing import Any

import torch


def rel_err(got: Any, want: Any, *, floor: float = 1e-12) -> float:
    """``max|got - want| / max|want|``: the error as a share of the reference output's scale.

    For a model with several outputs (tuples, lists, dicts of tensors: ``pipeline.core.outputs``)
    the largest such error over its outputs, each against its own scale; outputs that do not
    match (names, shapes) give ``inf``.

    Args:
        got: the transformed model's output.
        want: the reference output.
        floor: smallest denominator, so an all-zero reference does not divide by zero (float64
            comparisons pass a tinier one).
    """
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        return _tree_rel_err(got, want, floor)
    return float((got - want).abs().max()) / max(float(want.abs().max()), floor)


def _tree_rel_err(got: Any, want: Any, floor: float) -> float:
    from pipeline.core.outputs import flatten

    mine, theirs = flatten(got), flatten(want)
    if list(mine) != list(theirs) or any(mine[n].shape != theirs[n].shape for n in mine):
        return math.inf
    return max(rel_err(mine[n], theirs[n], floor=floor) if mine[n].numel() else 0.0 for n in mine)


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
