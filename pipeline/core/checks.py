"""One verdict for every comparison of a transformed model with its reference, sensitivity included.

A comparison that cannot fail proves nothing. Each check here therefore reports, beside the
error and the bound it was held to, what it *could* have caught:

- **the bound** (``pipeline.core.tolerance``) is the smallest error the check catches;
- **the input effect** is how far the reference output moves when each sample's input is
  swapped for another sample's (``max|ref - roll(ref)|`` over the verification batch). A model
  that ignored its input, or answered for the wrong sample, would be off by about that much;
- **the sensitivity** is their ratio. Below :data:`MIN_SENSITIVITY` the check could not tell
  the model from one that ignores its input: the verdict is ``insensitive``, never ``ok``.

Verdicts: ``ok``; ``twin-ok`` (see below); ``failed`` (the error is above the bound, NaN or Inf, a shape differs, or the
error is at least :data:`MAX_REL_ERR` of the output scale, which no precision may reach: an
absolute floor, or a bound scaled by the model's own rounding, must never turn a 100% error into
a pass); ``insensitive`` (within the bound, but the bound could not have caught a wrong model).
A failed check wins over an insensitive one.

**One policy for an untrained model** (every BN at its initial statistics, mean 0 and variance
1): it gives nearly the same output for any input, so its own checks are ``insensitive`` by
nature. Every check (the removal of ``pipeline.prune``, the fold of ``pipeline.fold``, the ONNX
and fp16 ONNX exports) is then run again, by the same code, on a **calibrated twin**: a copy
whose BN statistics are those of the verification batch (:func:`calibrated_twin`), transformed
the same way (:func:`on_twin`). The twin's verdict decides:

- twin ``ok``: the verdict is ``twin-ok``: the transform is verified on this architecture, and
  the record says that the model itself could not be (``twin`` holds the twin's check);
- twin ``failed``: the verdict is ``failed`` (exit 1), with the twin's error as the cause; a
  comparison that failed is never reported as ``insensitive``;
- twin ``insensitive``: the verdict stays ``insensitive``, and the cause says why the twin could
  not see a wrong model either (for a deep untrained net, often that its calibrated copy is
  chaotic: its own float32 rounding is a large share of its output, ``pipeline.core.tolerance``).

Only untrained models get a twin: a trained model whose outputs ignore its input stays
``insensitive``.

The command line exits 1 (:class:`VerificationError`) on ``failed``, and on ``insensitive``
unless the user accepted unverifiable artefacts explicitly (``recede export
--accept-insensitive``, ``recede prune --accept-insensitive``, ``export.accept_insensitive:
true`` in a run config). A failed check is never accepted. :func:`raise_unless_verified`
returns the checks it accepted as insensitive, each with why, for the manifest and report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from pipeline.core.tolerance import Tolerance

MIN_SENSITIVITY = 2.0  # the input effect must be at least twice the bound
MAX_REL_ERR = 0.5  # an error of half the output scale fails at any precision and any floor


class VerificationError(RuntimeError):
    """An artefact disagrees with its reference, or its check could not have seen a wrong model
    (CLI exit code 1)."""


@dataclass(frozen=True)
class Check:
    """One comparison: what was compared, how far apart, what was allowed, what could be caught.

    Attributes:
        what: The artefact or transform: ``onnx``, ``onnx-fp16``, ``tensorrt``, ``fold``,
            ``removal``, or a run's ``dense``/``pruned`` ONNX.
        path: The artefact checked, relative to its folder ("" for an in-memory transform).
        precision: ``fp32``, ``fp16``, ``int8`` or ``fp64`` (transforms are checked in float64).
        max_abs_err: Largest absolute difference from the reference.
        max_rel_err: ``max_abs_err`` over the reference output's largest magnitude.
        bound: The largest error allowed: the smallest error this check catches.
        input_effect: How far the reference output moves between samples of the batch.
        verdict: ``ok``, ``failed`` or ``insensitive``.
        cause: Why the verdict is not ``ok`` ("" when it is).
        tolerance: The policy applied, as a dict.
        batch_sizes: Batch sizes compared.
        opset: The ONNX graph's default-domain opset (None for other artefacts).
        twin: For an untrained model, the check of its BN-calibrated twin (as a dict).
        output: For a model with several outputs, the one whose figures these are: the worst
            (``pipeline.core.output_checks``); "" for a model with one output.
        outputs: For a model with several outputs, every output's own check (as dicts).
    """

    what: str
    path: str
    precision: str
    max_abs_err: float
    max_rel_err: float
    bound: float
    input_effect: float
    verdict: str
    cause: str = ""
    tolerance: dict[str, Any] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = ()
    opset: int | None = None
    twin: dict[str, Any] | None = None  # the calibrated twin's check, for an untrained model
    output: str = ""  # the worst of several outputs, whose figures these are
    outputs: dict[str, dict[str, Any]] | None = None  # every output's own check

    @property
    def passed(self) -> bool:
        """``ok``, or ``twin-ok``; an insensitive check is not evidence."""
        return self.verdict in ("ok", "twin-ok")

    @property
    def sensitivity(self) -> float:
        """Input effect over bound: how many times the smallest caught error a wrong input moves
        the output (inf with a zero bound and some effect)."""
        if self.bound > 0:
            return self.input_effect / self.bound
        return math.inf if self.input_effect > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus the derived ``passed`` and ``sensitivity`` (JSON-ready)."""
        return {**asdict(self), "passed": self.passed, "sensitivity": self.sensitivity}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Check:
        """Inverse of :meth:`to_dict` (the derived keys are recomputed, not read)."""
        fields = {k: v for k, v in data.items() if k not in ("passed", "sensitivity")}
        return cls(**{**fields, "batch_sizes": tuple(fields.get("batch_sizes", ()))})

    def line(self) -> str:
        """One line for a terminal: error, bound, sensitivity, verdict and its cause."""
        text = (
            f"max abs err {self.max_abs_err:.2e} (bound {self.bound:.2e}, rel {self.max_rel_err:.2e}); "
            f"a wrong input moves the output by {self.input_effect:.2e} "
            f"({_times(self.sensitivity)} the bound) -> {self.verdict}"
        )
        if self.twin:
            twin = Check.from_dict(self.twin)
            text += (
                f" (a copy with BN statistics calibrated on the verification batch: err "
                f"{twin.max_abs_err:.2e}, bound {twin.bound:.2e}, a wrong input moves it "
                f"{_times(twin.sensitivity)} the bound: {twin.verdict})"
            )
        if self.output:
            text = f"output {self.output!r} (worst of {len(self.outputs or ())}): {text}"
        return f"{text}: {self.cause}" if self.cause else text


def _times(ratio: float) -> str:
    return "inf x" if math.isinf(ratio) else f"{ratio:.3g}x"


def input_effect(reference: np.ndarray) -> float:
    """``max|ref - ref rolled by one sample|``: the output change a swapped input causes.

    Zero for a batch of one sample, and for an output with no axes at all (a 0-d tensor, such
    as a batch mean: there is no sample to swap; :func:`judge` compares it across batches).
    """
    import numpy as np

    if reference.ndim == 0 or reference.shape[0] < 2:
        return 0.0
    moved = np.abs(reference - np.roll(reference, 1, axis=0)).max(initial=0.0)
    return float(moved) if np.isfinite(moved) else 0.0


def judge(
    what: str,
    pairs: list[tuple[np.ndarray, np.ndarray]],
    tolerance: Tolerance,
    *,
    path: str = "",
    hint: str = "",
    opset: int | None = None,
) -> Check:
    """Compare each ``(reference, got)`` pair of output arrays and give the verdict.

    Args:
        what: Name of the artefact or transform.
        pairs: Reference and candidate outputs, one pair per verification batch.
        tolerance: The policy for the candidate's precision.
        path: The artefact's path, for the record.
        hint: Added to an ``insensitive`` cause: what may explain it (see :func:`insensitivity_hint`).
        opset: The ONNX opset, for the record.
    """
    import numpy as np

    err, scale, effect = 0.0, 0.0, 0.0
    scalars = [float(r) for r, _ in pairs if np.ndim(r) == 0]  # no sample axis: across batches
    if len(scalars) > 1 and all(map(math.isfinite, scalars)):
        effect = max(scalars) - min(scalars)
    for ref, got in pairs:
        ref64 = np.asarray(ref, dtype=np.float64)
        scale = max(scale, float(np.abs(ref64).max(initial=0.0)))
        effect = max(effect, input_effect(ref64))
        if np.shape(got) != ref64.shape:
            err, shape_cause = math.inf, f"output shape {np.shape(got)} != {ref64.shape}"
            break
        diff = float(np.abs(np.asarray(got, dtype=np.float64) - ref64).max(initial=0.0))
        err = max(err, diff if math.isfinite(diff) else math.inf)  # NaN must fail
    else:
        shape_cause = ""
    bound = tolerance.bound(scale)
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    if tolerance.effective_rtol > tolerance.rtol:  # the bound is this model's own rounding
        hint = (
            f"the bound is {tolerance.effective_rtol / tolerance.rounding:g}x this model's own "
            f"{tolerance.precision} rounding ({tolerance.rounding:.1e} of its output scale), which "
            f"no {tolerance.precision} check can see through{'; ' + hint if hint else ''}"
        )
    verdict, cause = _verdict(err, bound, rel, effect, shape_cause, hint)
    return Check(
        what, path, tolerance.precision, err, rel, bound, effect, verdict, cause,
        tolerance.to_dict(), tuple(int(np.shape(r)[0]) if np.ndim(r) else 1 for r, _ in pairs), opset,
    )  # fmt: skip


def _verdict(
    err: float, bound: float, rel: float, effect: float, shape_cause: str, hint: str
) -> tuple[str, str]:
    if shape_cause:
        return "failed", shape_cause
    if not math.isfinite(err):
        return "failed", "NaN or Inf in the output"
    if err > bound:
        return "failed", f"error {err:.2e} above the bound {bound:.2e}"
    if rel >= MAX_REL_ERR:
        return (
            "failed",
            f"error is {rel:.2f} of the output scale (never allowed above {MAX_REL_ERR})",
        )
    if effect < MIN_SENSITIVITY * bound:
        cause = (
            f"the reference output moves by only {effect:.2e} between different inputs, less than "
            f"{MIN_SENSITIVITY:g}x the bound {bound:.2e}, so a model that ignored its input would "
            "pass too"
        )
        return "insensitive", f"{cause}; {hint}" if hint else cause
    return "ok", ""


def untrained_bns(model: nn.Module) -> int:
    """How many BN layers the model has when every one holds its initial statistics, else 0."""
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    fresh = [
        m
        for m in bns
        if m.running_mean is not None
        and bool((m.running_mean == 0).all())
        and bool((m.running_var == 1).all())
    ]
    return len(bns) if bns and len(fresh) == len(bns) else 0


def calibrating_bns_(model: nn.Module) -> nn.Module:
    """Put every BN of ``model`` in place into calibration: statistics reset, ``momentum=None``
    (the next forward passes' own cumulative statistics), training mode; returns ``model``."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    return model


def calibrated_twin(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose BN running statistics are exactly those of ``batch``.

    Only the BN layers run in training mode (dropout stays off) and ``momentum=None`` makes the
    statistics the batch's own; the copy is returned in eval mode. ``model`` is not changed.
    """
    import copy

    import torch

    from pipeline.core.numerics import float_dtype

    twin = calibrating_bns_(copy.deepcopy(model).cpu().eval())
    with torch.no_grad():
        twin(batch.cpu().to(float_dtype(twin)))
    return twin.eval()


def on_twin(
    check: Check | None,
    model: nn.Module,
    batch: torch.Tensor,
    recheck: Callable[[nn.Module], Check | None],
) -> Check | None:
    """The one policy for every check: ``check`` as it is, unless it is ``insensitive`` and
    ``model`` untrained; then ``recheck`` (the same transform and comparison, run on the
    :func:`calibrated_twin` of ``model`` on ``batch``) decides, see :func:`with_twin`.

    Args:
        check: The check of ``model`` itself (None: nothing was checked, and nothing is).
        model: The model the transform was applied to (the reference).
        batch: The verification batch (at least 2 samples), which also calibrates the twin.
        recheck: Applies the transform to the twin and returns its check (None: not checked).
    """
    if check is None or check.verdict != "insensitive" or not untrained_bns(model):
        return check
    twin = recheck(calibrated_twin(model, batch))
    return check if twin is None else with_twin(check, twin)


def with_twin(check: Check, twin: Check) -> Check:
    """``check`` (insensitive, of an untrained model) judged by its calibrated twin's check:
    ``twin-ok`` when the twin's is ok, ``failed`` when it failed, else ``insensitive``."""
    record = replace(twin, path="").to_dict()
    if twin.verdict == "ok":
        cause = (
            "this model's own outputs barely depend on its input (untrained BN statistics), so "
            "it was verified on its BN-calibrated twin"
        )
        return replace(check, verdict="twin-ok", cause=cause, twin=record)
    if twin.verdict == "failed":
        cause = (
            f"on its BN-calibrated twin (its own outputs barely depend on its input): {twin.cause}"
        )
        return replace(check, verdict="failed", cause=cause, twin=record)
    cause = (
        f"{check.cause}; its BN-calibrated twin could not see a wrong model either: {twin.cause}"
    )
    return replace(check, cause=cause, twin=record)


def insensitivity_hint(model: nn.Module) -> str:
    """Why a model's outputs may not depend on its input: untrained BN statistics, or none known."""
    bns = untrained_bns(model)
    if bns:
        return (
            f"all {bns} BN layers hold their initial statistics (mean 0, var 1): the model "
            "looks untrained; train it, or recalibrate its BN statistics on real data"
        )
    return "the model's outputs barely depend on its input; verify on inputs it responds to"


def raise_unless_verified(
    checks: list[Check], *, accept_insensitive: bool, where: str
) -> list[dict[str, Any]]:
    """Raise :class:`VerificationError` naming every failed check, and every insensitive one
    unless ``accept_insensitive``; return the insensitive checks accepted, each with why.

    A failed check is never accepted, whatever ``accept_insensitive`` says.

    Args:
        checks: The checks of one command.
        accept_insensitive: The user accepted artefacts whose check could not see a wrong model.
        where: What the user should know about the outputs (for example that a folder is left
            unchanged, or where the report is).

    Returns:
        One record per accepted insensitive check (:func:`acceptance`), for the manifest or
        report (empty when every check passed).
    """
    failed = [c for c in checks if c.verdict == "failed"]
    insensitive = [c for c in checks if c.verdict == "insensitive"]
    blind = [] if accept_insensitive else insensitive
    if failed or blind:
        lines = [
            f"{c.what} ({c.path or 'in memory'}) failed verification: {c.cause}" for c in failed
        ]
        lines += [
            f"{c.what} ({c.path or 'in memory'}) could not be verified: {c.cause}; pass "
            "--accept-insensitive (export.accept_insensitive: true in a run config) to accept it"
            for c in blind
        ]
        if failed and accept_insensitive:
            lines.append("--accept-insensitive never accepts a failed check")
        raise VerificationError("; ".join(lines) + f"; {where}")
    return [acceptance(c) for c in insensitive]


def acceptance(check: Check) -> dict[str, Any]:
    """Why an insensitive check was accepted: the check, its figures and its cause (JSON-ready)."""
    return {
        "what": check.what,
        "path": check.path,
        "verdict": check.verdict,
        "accepted": "insensitive: accepted by the user (--accept-insensitive or "
        "export.accept_insensitive)",
        "why": check.cause,
        "input_effect": check.input_effect,
        "bound": check.bound,
        "sensitivity": check.sensitivity,
        "twin": None if check.twin is None else check.twin.get("verdict"),
    }
