"""Export a saved model as a verified release: ONNX, FP16 ONNX, a TensorRT engine, and what they are.

One call writes every requested artefact into a folder, verifies each against the float32
PyTorch model under the one tolerance policy (``pipeline.core.tolerance``), and returns the
facts the release manifest records: paths relative to that folder, precisions, errors and
bounds, opset, builder flags and the input spec. Exporting the same model twice gives
byte-identical ONNX files: the trace input is seeded and the exporter is deterministic.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.core.checks import Check
    from pipeline.export.calibration import CalibrationFeed

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "onnx-fp16", "tensorrt")
FILES = {
    "onnx": "model.onnx",
    "onnx-fp16": "model.fp16.onnx",
    "tensorrt": "model.engine",
    "timing_cache": "model.timing.cache",
}
TRT_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ReleaseOptions:
    """What to export and how; validated on construction.

    Attributes:
        formats: Any of :data:`FORMATS` (a TensorRT engine is built from the float32 ONNX,
            which is then exported too).
        opset: ONNX default-domain opset.
        simplify: Try onnxslim, keeping its graph only if ONNX Runtime gives the same outputs.
        atol: Absolute floor of the fp32 tolerance (None: the policy's default).
        trt_precision: ``fp32``, ``fp16`` or ``int8`` kernels for the engine.
        max_batch: Largest batch of the engine's optimisation profile.
        opt_batch: Batch the engine's kernels are tuned for.
        verify_batch: Batch size of the seeded random verification input.
    """

    formats: tuple[str, ...] = ("onnx",)
    opset: int = 17
    simplify: bool = True
    atol: float | None = None
    trt_precision: str = "fp32"
    max_batch: int = 32
    opt_batch: int = 1
    verify_batch: int = 4

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"formats must be some of {', '.join(FORMATS)}, got {self.formats}")
        if self.trt_precision not in TRT_PRECISIONS:
            raise ValueError(
                f"trt_precision must be one of {', '.join(TRT_PRECISIONS)}, "
                f"got {self.trt_precision!r}"
            )
        if not 1 <= self.opt_batch <= self.max_batch or self.verify_batch + 1 > self.max_batch:
            raise ValueError(
                f"expected 1 <= opt_batch <= max_batch and verify_batch < max_batch, got "
                f"opt_batch={self.opt_batch}, max_batch={self.max_batch}, "
                f"verify_batch={self.verify_batch}"
            )


@dataclass(frozen=True)
class Release:
    """What :func:`export_release` wrote and verified."""

    checks: tuple[Check, ...]  # one per artefact, ``what`` is its format
    files: dict[str, str]  # artefact name -> path relative to the release folder
    details: dict[str, Any]  # opset, builder flags, input spec, folding: for the manifest
    fold: Check | None = None  # the float64 folded-vs-unfolded check

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and (self.fold is None or self.fold.passed)

    def all_checks(self) -> list[Check]:
        """The fold check, then every artefact's."""
        return [*([self.fold] if self.fold else []), *self.checks]


def resolve_formats(choice: str, tensorrt_reason: str | None) -> tuple[tuple[str, ...], str | None]:
    """The formats ``--format choice`` means here, and a warning when ``all`` skips TensorRT.

    Raises:
        ValueError: ``choice`` is ``tensorrt`` and ``tensorrt_reason`` says why it cannot run.
    """
    if choice == "all":
        if tensorrt_reason is None:
            return FORMATS, None
        return FORMATS[:2], f"skipping TensorRT: {tensorrt_reason}"
    if choice == "tensorrt" and tensorrt_reason is not None:
        raise ValueError(f"--format tensorrt cannot run: {tensorrt_reason}")
    if choice not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join((*FORMATS, 'all'))}, got {choice!r}")
    return (choice,), None


def verification_input(input_shape: tuple[int, ...], batch: int) -> torch.Tensor:
    """The seeded random batch every export traces and verifies with (same bytes every time)."""
    import torch

    return torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))


def _export_onnx_formats(
    folded: nn.Module, model: nn.Module, out: Path, batch: torch.Tensor, options: ReleaseOptions
) -> list[Check]:
    from dataclasses import replace

    from pipeline.export.verify import export_checked

    wanted = [f for f in ("onnx", "onnx-fp16") if f in options.formats]
    if "tensorrt" in options.formats and "onnx" not in wanted:
        wanted.insert(0, "onnx")  # the engine is built from it
    checks = []
    for fmt in wanted:
        check = export_checked(
            folded, model, batch, out / FILES[fmt], opset=options.opset, what=fmt,
            half=fmt == "onnx-fp16", simplify=options.simplify, atol=options.atol,
        )  # fmt: skip
        checks.append(replace(check, path=FILES[fmt]))  # relative to the release folder
    return checks


def _build_and_check_engine(
    model: nn.Module, out: Path, batch: torch.Tensor, options: ReleaseOptions, calibration
) -> Check:
    from dataclasses import replace

    from pipeline.export.tensorrt import build_engine, verify_engine

    engine = build_engine(
        out / FILES["onnx"], out / FILES["tensorrt"],
        fp16=options.trt_precision in ("fp16", "int8"),
        int8=calibration if options.trt_precision == "int8" else None,
        max_batch=options.max_batch, opt_batch=options.opt_batch,
        timing_cache=out / FILES["timing_cache"],
    )  # fmt: skip
    check = verify_engine(engine, model, batch, precision=options.trt_precision)
    return replace(check, path=engine.name)


def export_release(
    model: nn.Module,
    input_shape: tuple[int, ...],
    out: str | Path,
    options: ReleaseOptions,
    *,
    calibration: CalibrationFeed | None = None,
) -> Release:
    """Fold BN, write every requested artefact into ``out`` and verify each against ``model``.

    Args:
        model: The (pruned) float32 model; it is not changed.
        input_shape: Per-sample shape ``(C, H, W)``.
        out: Folder to write into (the caller stages it; files are written atomically).
        options: Formats, opset, precision, batch range.
        calibration: Batches for an INT8 engine (``trt_precision="int8"``).

    Raises:
        ValueError: INT8 was asked for without calibration data.
        FoldError: Folding BN changed the outputs beyond tolerance.
    """
    from pipeline.fold.batchnorm import fold_bn

    if "tensorrt" in options.formats and options.trt_precision == "int8" and calibration is None:
        raise ValueError("an INT8 engine needs calibration batches; pass calibration=")
    out, shape = Path(out), tuple(int(d) for d in input_shape)
    batch = verification_input(shape, options.verify_batch)
    folded, fold = fold_bn(model, batch)
    checks = _export_onnx_formats(folded, model, out, batch, options)
    if "tensorrt" in options.formats:
        checks.append(_build_and_check_engine(model, out, batch, options, calibration))
    files = {c.what: c.path for c in checks}
    if "tensorrt" in files:
        files["timing_cache"] = FILES["timing_cache"]
    details = {
        "opset": options.opset,
        "options": asdict(options),
        "builder_flags": _builder_flags(options) if "tensorrt" in files else None,
        "input": {
            "name": "input",
            "shape": ["batch", *shape],
            "batch_range": [1, options.max_batch],
            "dtype": {
                f: "float16" if f == "onnx-fp16" else "float32" for f in files if f in FORMATS
            },
        },
        "folded_bns": len(fold.folded),
        "fold_rel_err": fold.max_rel_err,
        "fold": fold.check.to_dict() if fold.check else None,
        "verification": [c.to_dict() for c in checks],
    }
    return Release(tuple(checks), files, details, fold.check)


def _builder_flags(options: ReleaseOptions) -> dict[str, Any]:
    return {
        "fp16": options.trt_precision in ("fp16", "int8"),
        "int8": options.trt_precision == "int8",
        "profile": {"min": 1, "opt": options.opt_batch, "max": options.max_batch},
        "timing_cache": FILES["timing_cache"],
    }
