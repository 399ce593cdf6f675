"""INT8 verification of a graph with several outputs: decisions by agreement, the rest element-wise.

A one-output graph is a classifier or a segmenter, judged by agreement with the fp32 graph
(``pipeline.export.int8_check``). A graph with several outputs (a segmenter's ``out`` and
``aux``, a detector's features and heads) mixes two kinds:

- **decision outputs**: a class axis at position 1, i.e. rank >= 2 and ``classes`` entries on
  axis 1 (the model's ``num_classes``): a classifier's ``[N, classes]`` logits or a segmenter's
  ``[N, classes, H, W]`` map. What matters is the decision, so each is judged by agreement
  exactly as a one-output graph is (accuracy against labels whose shape is the output's without
  its class axis, else agreement with the fp32 decisions), with the same wrong-model
  sensitivity;
- **every other output** (boxes, box deltas, objectness, feature maps, detection logits whose
  class axis is last): there is no decision to agree on, so it is compared element-wise with
  the fp32 graph under the ``int8`` tolerance policy (``pipeline.core.tolerance``: 10% of the
  output's scale plus 1e-3), and the check could have failed only if the wrong INT8 model (the
  same fault as for decisions: every weight layer's per-channel scales off by 2x) is off by at
  least :data:`~pipeline.core.checks.MIN_SENSITIVITY` times that bound on the same samples;
  otherwise the output is ``insensitive``.

The verdict is the worst over the outputs (``pipeline.core.output_checks.worst``), naming the
output. The fallback (``pipeline.export.int8_fallback``) is steered by the decision outputs
only (:func:`decision_agreement`); a graph without one is quantized once and judged.

:func:`verify_int8` is the check of any INT8 graph, one output or several; it lives here, above
``pipeline.export.int8_check``, so that imports run one way.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.checks import MIN_SENSITIVITY, Check

if TYPE_CHECKING:
    import numpy as np

    from pipeline.export.int8_check import Agreement, Int8Check

logger = logging.getLogger(__name__)

Arrays = dict[str, "np.ndarray"]
_RANK = {"failed": 3, "insensitive": 2, "ok": 0}


def decision_outputs(outputs: Arrays, classes: int | None) -> list[str]:
    """The outputs judged by agreement: a one-output graph's only output; else those with
    ``classes`` entries on axis 1."""
    if len(outputs) == 1:
        return list(outputs)
    return [n for n, a in outputs.items() if classes and a.ndim >= 2 and a.shape[1] == classes]


def _labels_for(output: np.ndarray, labels: np.ndarray | None) -> np.ndarray | None:
    """``labels`` when they name one class per decision of ``output`` (its shape less axis 1)."""
    if labels is None or labels.shape != (output.shape[0], *output.shape[2:]):
        return None
    return labels


def decision_agreement(
    reference: Arrays, got: Arrays, labels: np.ndarray | None, classes: int | None
) -> Agreement | None:
    """The worst agreement (largest drop) over the decision outputs; None without one."""
    from pipeline.export.int8_check import agreement

    found = [
        agreement(reference[n], got[n], _labels_for(reference[n], labels))
        for n in decision_outputs(reference, classes)
    ]
    return max(found, key=lambda a: a.drop, default=None)


def elementwise_check(
    what: str, path: str, reference: np.ndarray, got: np.ndarray, wrong: np.ndarray
) -> Check:
    """One non-decision output against fp32 under the ``int8`` policy, sensitive only if the
    wrong INT8 model's output would have failed it by :data:`MIN_SENSITIVITY` times."""
    import numpy as np

    from pipeline.core.checks import judge
    from pipeline.core.tolerance import tolerance_for

    policy = tolerance_for("int8")
    check = judge(what, [(reference, got)], policy, path=path)
    if wrong.shape != reference.shape or not np.isfinite(wrong).all():
        return check  # a wrong model with another shape or NaN would have failed: sensitive
    missed = float(np.abs(wrong - reference).max(initial=0.0))
    if check.verdict == "ok" and missed < MIN_SENSITIVITY * check.bound:
        cause = (
            f"a wrong INT8 model (every weight layer's per-channel scales off by 2x) is off by "
            f"only {missed:.3g}, less than {MIN_SENSITIVITY:g}x the bound {check.bound:.3g}, so "
            "a wrong model would pass too; verify a trained model on inputs it responds to"
        )
        return replace(check, verdict="insensitive", cause=cause)
    return check


def worst_int8(checks: dict[str, Int8Check | Check]) -> Int8Check | Check:
    """The check that decides: failed over insensitive over ok; then the one furthest over its
    bound (failed) or with the least sensitivity. Names the output when there are several."""
    if len(checks) == 1:
        return next(iter(checks.values()))

    def badness(item: tuple[str, Any]) -> tuple[int, float]:
        c = item[1]
        if c.verdict != "failed":
            return _RANK.get(c.verdict, 3), -c.sensitivity
        over = c.measured.drop if hasattr(c, "measured") else c.max_abs_err
        return 3, over / c.bound if c.bound > 0 else math.inf

    name, check = max(checks.items(), key=badness)
    return replace(
        check, output=name, outputs={n: c.to_dict() for n, c in checks.items()},
        cause=f"output {name!r}: {check.cause}" if check.cause else "",
    )  # fmt: skip


def judge_outputs_int8(
    what: str,
    path: str,
    outputs: tuple[Arrays, Arrays, Arrays],
    labels: np.ndarray | None,
    *,
    wrong_model: str,
    max_drop: float,
    classes: int | None,
) -> Int8Check | Check:
    """Each output of the module docstring judged alone; the worst decides.

    Args:
        what: Name of the check.
        path: The INT8 graph.
        outputs: fp32, INT8 and wrong-INT8 outputs on the held-out samples, by name.
        labels: True labels of the samples, or None.
        wrong_model: What the wrong model is, for the record.
        max_drop: Accuracy points a decision output may lose.
        classes: The model's class count (which outputs are decisions).
    """
    from pipeline.export.int8_check import agreement, judge_int8

    reference, got, wrong = outputs
    if set(got) != set(reference):
        got = {n: got.get(n, reference[n][:0]) for n in reference}  # a missing one fails
    decisions = decision_outputs(reference, classes)
    checks: dict[str, Int8Check | Check] = {}
    for name, ref in reference.items():
        if name in decisions:
            truth = _labels_for(ref, labels)
            measured = agreement(ref, got[name], truth)
            missed = agreement(ref, wrong.get(name, ref[:0]), truth)
            checks[name] = judge_int8(what, path, measured, missed, wrong_model, max_drop)
        else:
            checks[name] = elementwise_check(what, path, ref, got[name], wrong.get(name, ref))
    return worst_int8(checks)


def verify_int8(
    int8: str | Path,
    fp32: str | Path,
    samples: np.ndarray,
    labels: np.ndarray | None,
    *,
    max_drop: float,
    what: str = "onnx-int8",
    classes: int | None = None,
) -> Int8Check | Check:
    """Run the check of ``pipeline.export.int8_check``'s docstring on held-out ``samples`` (and their ``labels``).

    A graph with several outputs is judged per output (``pipeline.export.int8_outputs``):
    decisions by agreement, the others element-wise; the worst output decides.

    Args:
        int8: The QDQ graph.
        fp32: The fp32 graph it was quantized from.
        samples: Held-out inputs, disjoint from the calibration samples.
        labels: Their true classes, or None to judge by agreement with fp32.
        max_drop: The largest accuracy drop allowed, in points.
        what: Name of the check (``onnx-int8``, or a run's ``dense-int8``/``pruned-int8``).
        classes: The model's class count: which outputs of several are decisions.
    """
    from pipeline.export.int8_check import (
        _all_float,
        agreement,
        corrupt_weight_scales,
        judge_int8,
        run_onnx_outputs,
    )

    references, got = run_onnx_outputs(fp32, samples), run_onnx_outputs(int8, samples)
    reference = next(iter(references.values()))
    measured = agreement(reference, next(iter(got.values())), labels)
    with tempfile.TemporaryDirectory(prefix="recede-int8-wrong-") as tmp:
        wrong_path = Path(tmp) / "wrong.onnx"
        wrong_model = corrupt_weight_scales(int8, wrong_path)
        if wrong_model is None:  # every weight layer is float: not an INT8 graph
            return _all_float(what, str(int8), measured, max_drop)
        wrongs = run_onnx_outputs(wrong_path, samples)
    if len(references) > 1:
        check = judge_outputs_int8(
            what, str(int8), (references, got, wrongs), labels, wrong_model=wrong_model,
            max_drop=max_drop, classes=classes,
        )  # fmt: skip
    else:
        wrong = agreement(reference, next(iter(wrongs.values())), labels)
        check = judge_int8(what, str(int8), measured, wrong, wrong_model, max_drop)
    (logger.info if check.passed else logger.warning)("%s: %s", what, check.line())
    return check
