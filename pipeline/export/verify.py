"""Fold, export and verify models side by side: what ``recede run`` does to its dense and
pruned models before timing them.

Each model is folded (``pipeline.fold``), written as ``<label>.onnx`` and checked against the
unfolded PyTorch model with ONNX Runtime under the one tolerance policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.export.onnx import OnnxVerification

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifiedExports:
    """Per label: the folded model, its ONNX file and the ONNX-vs-PyTorch check."""

    folded: dict[str, nn.Module]
    paths: dict[str, Path]
    checks: dict[str, OnnxVerification]


def export_and_verify(
    models: dict[str, nn.Module], batch: torch.Tensor, out: Path, *, opset: int, atol: float
) -> VerifiedExports:
    """Fold each model, export it to ``out/<label>.onnx`` and verify it on ``batch``.

    Args:
        models: Label (``"dense"``, ``"pruned"``) to model; each is read, not changed.
        batch: Verification input; its first two samples are the trace input.
        out: Folder for the ONNX files.
        opset: ONNX opset.
        atol: The fp32 floor of the tolerance (``pipeline.export.tolerance``).

    Returns:
        The folded models, ONNX paths and checks; a failed check is reported, not raised.
    """
    from pipeline.export.onnx import export_onnx, verify_onnx
    from pipeline.fold import fold_bn

    folded, paths, checks = {}, {}, {}
    for label, model in models.items():
        folded[label], fold = fold_bn(model.cpu().eval(), batch)
        paths[label] = export_onnx(folded[label], batch[:2], out / f"{label}.onnx", opset=opset)
        checks[label] = verify_onnx(paths[label], model, batch, atol=atol)
        logger.info(
            "%s: folded %d BNs (err %.2e); ONNX max abs err %.2e",
            label,
            len(fold.folded),
            fold.max_abs_err,
            checks[label].max_abs_err,
        )
    return VerifiedExports(folded, paths, checks)
