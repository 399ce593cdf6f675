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
absolute floor must never turn a 100% error into a pass); ``insensitive`` (within the bound,
but the bound could not have caught a wrong model). A failed check wins over an insensitive one.

An untrained model (every BN at its initial statistics, mean 0 and variance 1) gives nearly the
same output for any input, so its own check is ``insensitive`` by nature. There the export is
also checked on a **calibrated twin**: a copy whose BN statistics are those of the verification
batch, folded, exported and verified by the same code. When the twin's check is ``ok`` the
verdict is ``twin-ok``: the export path is verified on this architecture, and the record says
that the model itself could not be (``twin`` holds the twin's check). Only untrained models get
a twin: a trained model whose outputs ignore its input stays ``insensitive``.

The command line exits 1 (:class:`VerificationError`) on ``failed``, and on ``insensitive``
unless the user accepted unverifiable artefacts explicitly (``recede export
--accept-insensitive``, ``export.accept_insensitive: true`` in a run config); the verdict and
the figures are recorded in ``report.json`` and the release manifest either way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
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
        if self.verdict == "twin-ok" and self.twin:
            twin = Check.from_dict(self.twin)
            text += (
                f" (a copy with BN statistics calibrated on the verification batch: err "
                f"{twin.max_abs_err:.2e}, bound {twin.bound:.2e}, a wrong input moves it "
                f"{_times(twin.sensitivity)} the bound)"
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


def with_twin(check: Check, twin: Check) -> Check:
    """``check`` (insensitive, of an untrained model) judged with its calibrated twin's check."""
    from dataclasses import replace

    if twin.verdict != "ok":
        return replace(check, twin=twin.to_dict())
    cause = (
        "this model's own outputs barely depend on its input (untrained BN statistics), so the "
        "export was verified on its BN-calibrated twin"
    )
    return replace(check, verdict="twin-ok", cause=cause, twin=twin.to_dict())


def insensitivity_hint(model: nn.Module) -> str:
    """Why a model's outputs may not depend on its input: untrained BN statistics, or none known."""
    bns = untrained_bns(model)
    if bns:
        return (
            f"all {bns} BN layers hold their initial statistics (mean 0, var 1): the model "
            "looks untrained; train it, or recalibrate its BN statistics on real data"
        )
    return "the model's outputs barely depend on its input; verify on inputs it responds to"


def raise_unless_verified(checks: list[Check], *, accept_insensitive: bool, where: str) -> None:
    """Raise :class:`VerificationError` naming every failed check, and every insensitive one
    unless ``accept_insensitive``.

    Args:
        checks: The checks of one command.
        accept_insensitive: The user accepted artefacts whose check could not see a wrong model.
        where: What the user should know about the outputs (for example that a folder is left
            unchanged, or where the report is).
    """
    failed = [c for c in checks if c.verdict == "failed"]
    blind = [c for c in checks if c.verdict == "insensitive" and not accept_insensitive]
    if not failed and not blind:
        return
    lines = [f"{c.what} ({c.path or 'in memory'}) failed verification: {c.cause}" for c in failed]
    lines += [
        f"{c.what} ({c.path or 'in memory'}) could not be verified: {c.cause}; pass "
        "--accept-insensitive (export.accept_insensitive: true in a run config) to accept it"
        for c in blind
    ]
    raise VerificationError("; ".join(lines) + f"; {where}")
