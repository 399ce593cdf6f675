"""``recede export``: every input checked first, then a verified release written as a unit.

Part of the command line (it prints, like ``pipeline.cli.main``); the work itself is
``pipeline.export.release.export_release``. Exit codes follow ``pipeline.cli.main``: bad input
(missing or damaged model folder, unwritable ``--out``, TensorRT or a GPU missing for
``--format tensorrt``, an impossible batch range) is refused before anything is exported;
a failed verification leaves the output folder as it was.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli.args import EXIT_OK, UsageError

if TYPE_CHECKING:
    from pipeline.models.zoo import ModelSpec

logger = logging.getLogger("recede")

_TRT_FIX = "install it with pip install 'recede[tensorrt]' on a machine with an NVIDIA GPU"


def _out_folder(args: argparse.Namespace, folder: Path) -> Path:
    from pipeline.core.output_folders import check_out_folder, check_writable

    if args.out is None:  # in place, as before --out existed
        for place in (folder, folder.parent):
            check_writable(place, "DIR")
        return folder.absolute()
    out = check_out_folder(args.out, kind="export", force=args.force, flag="--out")
    source = folder.absolute()
    if out == source or out in source.parents:
        raise UsageError(
            f"--out {args.out} would replace the model folder {folder} it exports; expected a "
            "separate folder; pick another --out"
        )
    return out


def _options(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The release options and a warning (TensorRT skipped by --format all)."""
    from pipeline.config import MIN_OPSET, exporter_max_opset
    from pipeline.export.release import ReleaseOptions, resolve_formats
    from pipeline.export.tensorrt import unavailable_reason

    top = exporter_max_opset()
    if not MIN_OPSET <= args.opset <= top:
        raise UsageError(
            f"--opset: expected an integer in [{MIN_OPSET}, {top}] (what this torch's ONNX "
            f"exporter emits), got {args.opset}; pass --opset {MIN_OPSET}"
        )

    required = "tensorrt" in (args.require or [])
    if required and args.format not in ("tensorrt", "all"):
        raise UsageError(
            f"--require tensorrt asks for an engine, and --format {args.format} builds none; "
            "pass --format all (or tensorrt), or drop --require"
        )
    reason = unavailable_reason() if args.format in ("tensorrt", "all") else None
    if required and reason is not None:
        raise UsageError(
            f"--require tensorrt: this machine cannot build a TensorRT engine ({reason}); "
            f"{_TRT_FIX}, or drop --require tensorrt"
        )
    if args.format == "tensorrt" and reason is not None:
        raise UsageError(
            f"--format tensorrt needs the tensorrt package and a CUDA GPU, and this machine "
            f"lacks one ({reason}); {_TRT_FIX}, or pass --format onnx (or all)"
        )
    formats, warning = resolve_formats(args.format, reason)
    if args.int8 and "tensorrt" not in formats:  # only a TensorRT engine has INT8 kernels
        raise UsageError(
            f"--int8 builds TensorRT INT8 kernels, and --format {args.format} makes no TensorRT "
            "engine; pass --format tensorrt (or all) with --int8, or drop --int8"
        )
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    try:
        options = ReleaseOptions(
            formats, args.opset, not args.no_slim, args.atol, precision,
            args.max_batch, args.opt_batch, min(4, args.max_batch - 1),
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(f"--opt-batch/--max-batch: {err}; lower --opt-batch") from None
    return options, warning and f"{warning}; {_TRT_FIX}"


def _calibration(args: argparse.Namespace, folder: Path, spec: ModelSpec, options: Any) -> Any:
    """INT8 calibration batches from the training data the run's config.yaml names."""
    if options.trt_precision != "int8" or "tensorrt" not in options.formats:
        return None
    from pipeline.config import load_config
    from pipeline.data.datasets import load_data
    from pipeline.export.calibration import CalibrationFeed

    config = folder.parent / "config.yaml"
    if not config.is_file():
        raise UsageError(
            f"--int8 calibrates on the training data named by the run's config.yaml, and "
            f"{config} does not exist; export a model folder of `recede run` or `recede train`, "
            "or drop --int8"
        )
    cfg = load_config(config, ())
    data = load_data(cfg.data, seed=cfg.train.seed)
    size = min(8, options.max_batch)
    return CalibrationFeed(data.train, size, spec.input_shape, max_batches=args.calib_batches)


def _release_config(folder: Path, out: Path, spec: ModelSpec, options: Any) -> dict[str, Any]:
    """The resolved configuration: model spec, export options, source, the run's config."""
    from dataclasses import asdict

    import yaml

    from pipeline.core.integrity import file_sha256
    from pipeline.models.checkpoint import SHAPES, WEIGHTS

    config = folder.parent / "config.yaml"
    return {
        "source": {
            "path": Path(os.path.relpath(folder.absolute(), out)).as_posix(),
            "weights_sha256": file_sha256(folder / WEIGHTS),
            "shapes_sha256": file_sha256(folder / SHAPES),
        },
        "spec": spec.to_dict(),
        "export": asdict(options),
        "run": yaml.safe_load(config.read_text()) if config.is_file() else None,
    }


def _write(
    stage: Path, folder: Path, out: Path, loaded: tuple, options: Any, calibration, accept: bool
) -> Any:
    """Export, verify and write the manifest into ``stage``; returns the release.

    A failed check, or an insensitive one unless ``accept``, raises ``VerificationError``
    before the manifest is written, so ``out`` stays as it was.
    """
    from pipeline.core.checks import raise_unless_verified
    from pipeline.export.manifest import MANIFEST_NAME, write_manifest
    from pipeline.export.release import FILES, export_release

    model, spec = loaded
    for name in (*FILES.values(), MANIFEST_NAME):  # nothing stale from an earlier export
        (stage / name).unlink(missing_ok=True)
    release = export_release(
        model, spec.input_shape, stage, options, calibration=calibration
    )
    for check in release.all_checks():
        print(
            f"{out / check.path if check.path else check.what}: {check.precision}, {check.line()}"
        )
    raise_unless_verified(
        release.all_checks(), accept_insensitive=accept, where=f"{out} is left unchanged"
    )
    metrics = {
        c.what: {
            "max_abs_err": c.max_abs_err, "bound": c.bound, "input_effect": c.input_effect,
            "sensitivity": c.sensitivity, "verdict": c.verdict,
        }
        for c in release.all_checks()
    }  # fmt: skip
    write_manifest(
        stage,
        {name: stage / rel for name, rel in release.files.items()},
        config=_release_config(folder, out, spec, options),
        metrics=metrics,
        export=release.details,
    )
    return release


def export_command(args: argparse.Namespace) -> int:
    """Export a saved model folder (ONNX, FP16 ONNX, TensorRT), verify each, write a manifest."""
    from pipeline.core.output_folders import staged_folder
    from pipeline.models.checkpoint import load_pruned, model_folder

    folder = model_folder(args.dir)
    model, spec = load_pruned(folder)  # a damaged folder is refused here, naming the file
    out = _out_folder(args, folder)
    options, warning = _options(args)
    calibration = _calibration(args, folder, spec, options)
    if warning:
        logger.warning("%s", warning)
    in_place = out == folder.absolute()
    kind, start = ("prune", "copy") if in_place else ("export", "empty")
    with staged_folder(out, kind=kind, start=start) as stage:
        release = _write(
            stage, folder, out, (model, spec), options, calibration, args.accept_insensitive
        )
    print(f"{out / 'manifest.json'}: {len(release.files)} artefacts")
    return EXIT_OK
