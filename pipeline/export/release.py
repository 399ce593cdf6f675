"""Export a saved model as a verified release: ONNX, FP16 and INT8 ONNX, a TensorRT engine.

One call writes every requested artefact into a folder, verifies each (fp32 and fp16 against
the float32 PyTorch model under the one tolerance policy, ``pipeline.core.tolerance``; INT8 by
its agreement with the fp32 graph on held-out samples, ``pipeline.export.int8_check``), and
returns the facts the release manifest records: paths relative to that folder, precisions,
errors and bounds, opset, quantization settings, builder flags and the input spec. Exporting the
same model twice gives byte-identical ONNX files: the trace input is seeded, the exporter is
deterministic and INT8 calibration samples are drawn with a fixed seed.

A TensorRT INT8 engine is built from the INT8 ONNX file (explicit quantization: TensorRT keeps
its Q/DQ scales), which is then quantized with symmetric activations, TensorRT's form, so one
file serves ONNX Runtime and TensorRT; TensorRT's implicit calibrator, deprecated since 10.1, is
not used.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.export.int8_export import Int8Settings

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.core.checks import Check
    from pipeline.data.calibration import Int8Samples
    from pipeline.export.int8_check import Int8Check
    from pipeline.export.int8_export import Int8Export, LatencyCost

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "tensorrt")
FILES = {
    "onnx": "model.onnx",
    "onnx-fp16": "model.fp16.onnx",
    "onnx-int8": "model.int8.onnx",
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
        int8: INT8 quantization, its accuracy bound and fallback (``onnx-int8`` and INT8
            engines).
    """

    formats: tuple[str, ...] = ("onnx",)
    opset: int = 17
    simplify: bool = True
    atol: float | None = None
    trt_precision: str = "fp32"
    max_batch: int = 32
    opt_batch: int = 1
    verify_batch: int = 4
    int8: Int8Settings = field(default_factory=Int8Settings)

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

    checks: tuple[Check | Int8Check, ...]  # one per artefact, ``what`` is its format
    files: dict[str, str]  # artefact name -> path relative to the release folder
    details: dict[str, Any]  # opset, builder flags, input spec, folding: for the manifest
    fold: Check | None = None  # the float64 folded-vs-unfolded check

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and (self.fold is None or self.fold.passed)

    def all_checks(self) -> list[Check | Int8Check]:
        """The fold check, then every artefact's."""
        return [*([self.fold] if self.fold else []), *self.checks]


def resolve_formats(
    choice: str, tensorrt_reason: str | None, int8_reason: str | None = None
) -> tuple[tuple[str, ...], list[str]]:
    """The formats ``--format choice`` means here, and a warning for each format ``all`` skips.

    Args:
        choice: ``--format``: one of :data:`FORMATS` or ``all``.
        tensorrt_reason: Why no TensorRT engine can be built here (None: it can).
        int8_reason: Why no INT8 ONNX can be made (None: it can; no calibration data, say).

    Raises:
        ValueError: ``choice`` names a format that cannot be made, or is unknown.
    """
    if choice == "all":
        skipped = {"tensorrt": tensorrt_reason, "onnx-int8": int8_reason}
        formats = tuple(f for f in FORMATS if skipped.get(f) is None)
        names = {"tensorrt": "TensorRT", "onnx-int8": "onnx-int8 (INT8 ONNX)"}
        return formats, [f"skipping {names[f]}: {why}" for f, why in skipped.items() if why]
    if choice == "tensorrt" and tensorrt_reason is not None:
        raise ValueError(f"--format tensorrt cannot run: {tensorrt_reason}")
    if choice == "onnx-int8" and int8_reason is not None:
        raise ValueError(f"--format onnx-int8 cannot run: {int8_reason}")
    if choice not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join((*FORMATS, 'all'))}, got {choice!r}")
    return (choice,), []


def needs_int8(options: ReleaseOptions) -> bool:
    """Whether the release quantizes: an INT8 ONNX file, or a TensorRT INT8 engine."""
    engine = "tensorrt" in options.formats and options.trt_precision == "int8"
    return "onnx-int8" in options.formats or engine


def verification_input(input_shape: tuple[int, ...], batch: int) -> torch.Tensor:
    """The seeded random batch every export traces and verifies with (same bytes every time)."""
    import torch

    return torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))


def _export_onnx_formats(
    folded: nn.Module, model: nn.Module, out: Path, batch: torch.Tensor, options: ReleaseOptions
) -> list[Check]:
    from pipeline.export.verify import export_checked

    wanted = [f for f in ("onnx", "onnx-fp16") if f in options.formats]
    if ("tensorrt" in options.formats or needs_int8(options)) and "onnx" not in wanted:
        wanted.insert(0, "onnx")  # the engine and the INT8 graph are made from it
    checks = []
    for fmt in wanted:
        check = export_checked(
            folded, model, batch, out / FILES[fmt], opset=options.opset, what=fmt,
            half=fmt == "onnx-fp16", simplify=options.simplify, atol=options.atol,
        )  # fmt: skip
        checks.append(replace(check, path=FILES[fmt]))  # relative to the release folder
    return checks


def _int8_settings(options: ReleaseOptions) -> Int8Settings:
    """The INT8 settings, symmetric when a TensorRT engine is built from the INT8 graph."""
    settings = options.int8
    if "tensorrt" in options.formats and options.trt_precision == "int8":
        return replace(settings, options=replace(settings.options, symmetric=True))
    return settings


def _export_int8(
    out: Path,
    options: ReleaseOptions,
    samples: Int8Samples,
    cost: LatencyCost | None,
    classes: int | None = None,
) -> Int8Export:
    from pipeline.export.int8_export import export_int8

    done = export_int8(
        out / FILES["onnx"], out / FILES["onnx-int8"], samples, _int8_settings(options),
        what="onnx-int8", latency_cost=cost, classes=classes,
    )  # fmt: skip
    return replace(done, check=replace(done.check, path=FILES["onnx-int8"]))


def _build_and_check_engine(
    model: nn.Module,
    out: Path,
    batch: torch.Tensor,
    options: ReleaseOptions,
    int8: tuple[Int8Export, Int8Samples] | None,
) -> Check | Int8Check:
    from pipeline.export.tensorrt import build_engine, verify_engine, verify_engine_int8

    source = FILES["onnx-int8"] if int8 is not None else FILES["onnx"]
    engine = build_engine(
        out / source, out / FILES["tensorrt"], fp16=options.trt_precision in ("fp16", "int8"),
        max_batch=options.max_batch, opt_batch=options.opt_batch,
        timing_cache=out / FILES["timing_cache"],
    )  # fmt: skip
    if int8 is not None:
        done, samples = int8
        check = verify_engine_int8(
            engine, out / FILES["onnx"], samples, done.check, max_drop=options.int8.max_drop
        )
    else:
        check = verify_engine(engine, model, batch, precision=options.trt_precision)
    return replace(check, path=engine.name)


def export_release(
    model: nn.Module,
    input_shape: tuple[int, ...],
    out: str | Path,
    options: ReleaseOptions,
    *,
    int8_samples: Int8Samples | None = None,
    latency_cost: LatencyCost | None = None,
    classes: int | None = None,
) -> Release:
    """Fold BN, write every requested artefact into ``out`` and verify each against ``model``.

    Args:
        model: The (pruned) float32 model; it is not changed.
        input_shape: Per-sample shape ``(C, H, W)``.
        out: Folder to write into (the caller stages it; files are written atomically).
        options: Formats, opset, precision, batch range, INT8 settings.
        int8_samples: Calibration, validation and held-out samples for INT8
            (``pipeline.data.calibration``).
        latency_cost: Times INT8 layers kept in float against the all-INT8 graph.
        classes: The model's class count: of several outputs, those with a class axis are
            judged by agreement in INT8, the others element-wise (``pipeline.export.int8_outputs``).

    Raises:
        ValueError: INT8 was asked for without samples.
        FoldError: Folding BN changed the outputs beyond tolerance.
    """
    from pipeline.fold.batchnorm import fold_bn

    if needs_int8(options) and int8_samples is None:
        raise ValueError("an INT8 graph or engine needs calibration samples; pass int8_samples=")
    out, shape = Path(out), tuple(int(d) for d in input_shape)
    batch = verification_input(shape, options.verify_batch)
    folded, fold = fold_bn(model, batch)
    checks: list[Check | Int8Check] = list(_export_onnx_formats(folded, model, out, batch, options))
    detector, withheld = _whole_detector(model, shape, out, options)
    checks += detector
    int8 = (
        _export_int8(out, options, int8_samples, latency_cost, classes)
        if needs_int8(options)
        else None
    )
    if int8 is not None and "onnx-int8" in options.formats:
        checks.append(int8.check)
    if "tensorrt" in options.formats:
        pair = (int8, int8_samples) if int8 is not None else None
        checks.append(_build_and_check_engine(model, out, batch, options, pair))
    files = {c.what: c.path for c in checks}
    if int8 is not None and "onnx-int8" not in files:  # the engine's source is shipped too
        files["onnx-int8"] = FILES["onnx-int8"]
    if "tensorrt" in files:
        files["timing_cache"] = FILES["timing_cache"]
    details = _details(options, shape, files, fold, checks, int8)
    details["withheld"] = withheld
    return Release(tuple(checks), files, details, fold.check)


def _whole_detector(
    model: nn.Module, shape: tuple[int, ...], out: Path, options: ReleaseOptions
) -> tuple[list[Check], list[dict[str, Any]]]:
    """A detector's whole pipeline as ``detector.onnx`` beside its trunk, where torch's exporter
    can export it (``pipeline.export.detector``); nothing for other models. Returns the
    shipped artefact's check, and the withheld one's (with why) when its check did not pass.

    ``detector.onnx`` is an extra beside the release's artefact, the trunk (``model.onnx``,
    which holds every pruned layer and is verified like any model): it adds torchvision's
    unpruned decoding, NMS and ROI heads as torch's exporter writes them. Where its check is not
    ``ok`` or ``twin-ok``, it is **withheld**: deleted, named in a warning and in the manifest
    (``export.withheld``, with its check), and the export goes on, since everything it ships is
    verified. Measured causes (docs/torchvision_coverage.md): ONNX Runtime's RoiAlign is another
    implementation than torchvision's (on the conditioned twin of an unpruned Faster R-CNN v2,
    whose box head has BNs, scores came 1.3e-3 apart, 3.6e-3 of their scale, against a bound of
    about 1e-3 of it), and on an untrained twin the pasted masks and the keypoints' heatmap
    argmax flip between near-ties.
    """
    from pipeline.models.detection import DetectorTrunk

    if not isinstance(model, DetectorTrunk) or "onnx" not in options.formats:
        return [], []
    from pipeline.export.detector import FILE, export_detector

    check = export_detector(model, (shape[1], shape[2]), out, opset=options.opset)
    if check is None:
        return [], []
    if check.passed:
        return [check], []
    (out / FILE).unlink(missing_ok=True)
    why = (
        f"{FILE} withheld: its check is {check.verdict}; the release ships the verified "
        "trunk (model.onnx) without it"
    )
    logger.warning("%s: %s", why, check.line())
    return [], [{**check.to_dict(), "withheld": why}]


def _details(
    options: ReleaseOptions,
    shape: tuple[int, ...],
    files: dict[str, str],
    fold: Any,
    checks: list[Check | Int8Check],
    int8: Int8Export | None,
) -> dict[str, Any]:
    """What the manifest records of an export (besides hashes and the config)."""
    dtypes = {"onnx-fp16": "float16"}
    return {
        "opset": options.opset,
        "options": asdict(options),
        "builder_flags": _builder_flags(options) if "tensorrt" in files else None,
        "input": {
            "name": "input",
            "shape": ["batch", *shape],
            "batch_range": [1, options.max_batch],
            "dtype": {f: dtypes.get(f, "float32") for f in files if f in FORMATS},
        },
        "folded_bns": len(fold.folded),
        "fold_rel_err": fold.max_rel_err,
        "fold": fold.check.to_dict() if fold.check else None,
        "int8": int8.record() if int8 is not None else None,
        "verification": [c.to_dict() for c in checks],
    }


def _builder_flags(options: ReleaseOptions) -> dict[str, Any]:
    return {
        "fp16": options.trt_precision in ("fp16", "int8"),
        "int8": options.trt_precision == "int8",
        "quantization": "explicit (Q/DQ from model.int8.onnx)"
        if options.trt_precision == "int8"
        else None,
        "profile": {"min": 1, "opt": options.opt_batch, "max": options.max_batch},
        "timing_cache": FILES["timing_cache"],
    }
