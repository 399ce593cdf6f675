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
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.core.checks import Check

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
    from pipeline.core.checks import untrained_bns, with_twin
    from pipeline.export.onnx import export_onnx, verify_onnx

    settings = {"opset": opset, "simplify": simplify, "half": half}
    path = export_onnx(folded, batch[:2], path, **settings)
    check = verify_onnx(path, model, batch, atol=None if half else atol, what=what)
    if check.verdict != "insensitive" or not untrained_bns(model):
        return check
    twin = calibrated_twin(model, batch)
    with tempfile.TemporaryDirectory(prefix="recede-twin-") as tmp:
        from pipeline.fold.batchnorm import fold_bn

        twin_path = export_onnx(
            fold_bn(twin, batch)[0], batch[:2], Path(tmp, path.name), **settings
        )
        twin_check = verify_onnx(twin_path, twin, batch, atol=None if half else atol, what=what)
    return with_twin(check, replace(twin_check, path=""))


@torch.no_grad()
def calibrated_twin(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose BN running statistics are exactly those of ``batch``.

    Only the BN layers run in training mode (dropout stays off) and ``momentum=None`` makes the
    statistics the batch's own; the copy is returned in eval mode. ``model`` is not changed.
    """
    twin = copy.deepcopy(model).cpu().eval()
    bns = [m for m in twin.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    twin(batch.cpu().float())
    return twin.eval()


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
