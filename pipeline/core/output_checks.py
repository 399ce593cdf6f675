"""One verdict over a model's several outputs: each output judged alone, the worst one decides.

A detector returns boxes in pixels and scores in (0, 1); a segmenter a full-resolution map and
an auxiliary one. One bound relative to the largest value over all of them would let the small
outputs stray by the scale of the large ones, and one input effect over all of them would let a
constant head pass as long as another head moves. So every output (a leaf of
``pipeline.core.outputs``) gets its own :func:`pipeline.core.checks.judge`: its own error, bound
and wrong-input effect. The verdict is the worst of them (``failed`` over ``insensitive`` over
``twin-ok`` over ``ok``); the returned check carries that output's figures, its name
(``Check.output``) and every output's check (``Check.outputs``). A model with one output gets
exactly the check it always got.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pipeline.core.checks import Check, judge

if TYPE_CHECKING:
    import numpy as np

    from pipeline.core.tolerance import Tolerance

_RANK = {"failed": 3, "insensitive": 2, "twin-ok": 1, "ok": 0}

Arrays = dict[str, "np.ndarray"]


def worst(checks: dict[str, Check]) -> Check:
    """The check that decides the verdict of several outputs' ``checks`` (see module docstring).

    Among failed checks the one furthest over its bound; among the others the one with the least
    sensitivity (the weakest evidence). With one output its check is returned unchanged.
    """
    if len(checks) == 1:
        return next(iter(checks.values()))

    def badness(item: tuple[str, Check]) -> tuple[int, float]:
        c = item[1]
        over = c.max_abs_err / c.bound if c.bound > 0 else math.inf
        return _RANK.get(c.verdict, 3), over if c.verdict == "failed" else -c.sensitivity

    name, check = max(checks.items(), key=badness)
    return replace(
        check, output=name, outputs={n: c.to_dict() for n, c in checks.items()},
        cause=f"output {name!r}: {check.cause}" if check.cause else "",
    )  # fmt: skip


def _missing(what: str, want: Arrays, got: Arrays, tolerance: Tolerance, path: str) -> Check:
    """A failed check: the candidate's outputs are not the reference's."""
    cause = f"outputs differ: the reference has {sorted(want)}, the candidate {sorted(got)}"
    return Check(
        what, path, tolerance.precision, math.inf, math.inf, 0.0, 0.0, "failed", cause,
        tolerance.to_dict(),
    )  # fmt: skip


def judge_outputs(
    what: str,
    batches: list[tuple[Arrays, Arrays]],
    tolerance: Tolerance,
    *,
    path: str = "",
    hint: str = "",
    opset: int | None = None,
) -> Check:
    """Judge each named output over ``batches`` of (reference, candidate) arrays; the worst wins.

    Args:
        what: Name of the artefact or transform.
        batches: Per verification batch, the reference's and the candidate's outputs by name
            (``pipeline.core.outputs.as_arrays`` for PyTorch, the graph's output names for ONNX).
        tolerance: The policy for the candidate's precision.
        path: The artefact's path, for the record.
        hint: Added to an ``insensitive`` cause.
        opset: The ONNX opset, for the record.
    """
    for want, got in batches:
        if set(want) != set(got):
            return _missing(what, want, got, tolerance, path)
    names = list(batches[0][0]) if batches else []
    checks = {
        name: judge(
            what, [(want[name], got[name]) for want, got in batches], tolerance,
            path=path, hint=hint, opset=opset,
        )  # fmt: skip
        for name in names
    }
    return worst(checks)


def judge_trees(
    what: str, pairs: list[tuple[Any, Any]], tolerance: Tolerance, *, hint: str = ""
) -> Check:
    """:func:`judge_outputs` of PyTorch outputs: (reference tree, candidate tree) per batch."""
    from pipeline.core.outputs import as_arrays

    return judge_outputs(
        what, [(as_arrays(want), as_arrays(got)) for want, got in pairs], tolerance, hint=hint
    )
