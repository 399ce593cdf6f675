"""The one export-and-verify path: fold, write ONNX, check it against PyTorch, judge the checks.

``recede run`` (dense and pruned models side by side) and ``recede export`` (a release) both
come through here, so the same model gives the same :class:`pipeline.core.checks.Check` records,
the same log lines and the same failure messages from either command:

- :func:`export_checked` writes one ONNX file (float32 or float16) of a folded model and
  verifies it with ONNX Runtime against the unfolded model;
- :func:`export_and_verify` does that for several labelled models (``recede run``);
- :func:`pipeline.core.checks.raise_unless_verified` turns failed (and, unless accepted,
  insensitive) checks into one :class:`pipeline.core.checks.VerificationError` (exit code 1).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.core.checks import Check
    from pipeline.core.tolerance import Tolerance

logger = logging.getLogger(__name__)


def export_checked(
    folded: nn.Module,
    model: nn.Module,
    batch: torch.Tensor,
    path: Path,
    *,
    opset: int,
    what: str,
    half: bool = False,
    simplify: bool = True,
    atol: float | None = None,
) -> Check:
    """Write ``folded`` to ``path`` as ONNX and verify it against the unfolded ``model``.

    The reference is ``model`` computed in float64: the exact answer, not another float32
    rounding of it. The export is held to a bound that scales with PyTorch's own rounding of
    ``folded`` in the export's precision (``pipeline.core.tolerance``). An untrained model whose check could
    not see a wrong model is exported and verified again on its calibrated twin
    (``pipeline.core.checks.on_twin``), as its fold is.

    Args:
        folded: The BN-folded model to export (``pipeline.fold.batchnorm.fold_bn``).
        model: The model it was folded from: the reference.
        batch: Verification input; its first two samples are the trace input.
        path: The ONNX file to write.
        opset: ONNX opset.
        what: Name of the check (``onnx``, ``onnx-fp16``, ``dense``, ``pruned``).
        half: Export in float16 (judged by the fp16 tolerance).
        simplify: Try onnxslim (kept only when it changes no output).
        atol: The fp32 floor of the tolerance (None: the policy's default; ignored for fp16).
    """
    from pipeline.core.checks import on_twin
    from pipeline.export.onnx import export_onnx, verify_onnx

    settings = {"opset": opset, "simplify": simplify, "half": half}

    def checked(folded: nn.Module, reference: nn.Module, path: Path) -> Check:
        exported = export_onnx(folded, batch[:2], path, **settings)
        tolerance = export_tolerance(folded, batch, half=half, atol=atol)
        return verify_onnx(exported, Float64(reference), batch, tolerance=tolerance, what=what)

    def on_the_twin(twin: nn.Module) -> Check:
        from pipeline.fold.batchnorm import fold_bn

        with tempfile.TemporaryDirectory(prefix="recede-twin-") as tmp:
            return checked(fold_bn(twin, batch)[0], twin, Path(tmp, path.name))

    return on_twin(checked(folded, model, path), model, batch, on_the_twin)


def export_tolerance(
    folded: nn.Module, batch: torch.Tensor, *, half: bool, atol: float | None
) -> Tolerance:
    """The bound an export of ``folded`` is held to: the fp32 (or fp16) policy, scaled by
    PyTorch's own rounding of ``folded`` in that precision on the batches ``verify_onnx`` runs
    (``batch`` and, for a dynamic batch axis, one sample more).

    The rounding is measured against ``folded``'s own float64 run, never against the model it
    was folded from: a wrong fold must not widen the bound it is judged by.
    """
    from pipeline.core.tolerance import measured_rounding, tolerance_for

    precision = "fp16" if half else "fp32"
    inputs = torch.cat([batch, batch[:1].flip(-1)]).cpu()  # every sample verify_onnx runs
    rounding = measured_rounding(folded, inputs, precision=precision)
    return tolerance_for(precision, atol=None if half else atol, rounding=rounding)


class Float64(nn.Module):
    """A float64 copy of a model that takes and returns float32: the exact answer an artefact
    is compared with (its float32 output is the float64 one rounded once, 6e-8 of its scale)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).cpu().double().eval()

    def forward(self, x: torch.Tensor) -> Any:
        from pipeline.core.outputs import map_leaves

        return map_leaves(lambda t: t.float(), self.model(x.double()))  # a tree of outputs too


@dataclass(frozen=True)
class VerifiedExports:
    """Per label: the folded model, its ONNX file, and the fold and ONNX-vs-PyTorch checks."""

    folded: dict[str, nn.Module]
    paths: dict[str, Path]
    checks: dict[str, Check]
    fold_checks: dict[str, Check]

    def all_checks(self) -> list[Check]:
        """Fold checks, then ONNX checks, labelled (``dense fold``, ``pruned``)."""
        folds = [replace(c, what=f"{label} fold") for label, c in self.fold_checks.items()]
        return [*folds, *self.checks.values()]


def export_and_verify(
    models: dict[str, nn.Module], batch: torch.Tensor, out: Path, *, opset: int, atol: float
) -> VerifiedExports:
    """Fold each model, export it to ``out/<label>.onnx`` and verify it on ``batch``.

    Args:
        models: Label (``"dense"``, ``"pruned"``) to model; each is read, not changed.
        batch: Verification input; its first two samples are the trace input.
        out: Folder for the ONNX files.
        opset: ONNX opset.
        atol: The fp32 floor of the tolerance (``pipeline.core.tolerance``).

    Returns:
        The folded models, ONNX paths and checks; a failed or insensitive check is reported,
        not raised (the caller decides, see :func:`pipeline.core.checks.raise_unless_verified`).
    """
    from pipeline.fold.batchnorm import fold_bn

    folded, paths, checks, folds = {}, {}, {}, {}
    for label, model in models.items():
        folded[label], fold = fold_bn(model.cpu().eval(), batch)
        folds[label] = fold.check
        path = out / f"{label}.onnx"
        checks[label] = export_checked(
            folded[label], model, batch, path, opset=opset, what=label, atol=atol
        )
        paths[label] = path
        logger.info("%s: folded %d BNs; ONNX %s", label, len(fold.folded), checks[label].line())
    return VerifiedExports(folded, paths, checks, folds)
