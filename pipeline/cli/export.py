"""``recede export``: every input checked first, then a verified release written as a unit.

Part of the command line (it prints, like ``pipeline.cli.main``); the work itself is
``pipeline.export.release.export_release``. Exit codes follow ``pipeline.cli.main``: bad input
(missing or damaged model folder, unwritable ``--out``, TensorRT or a GPU missing for
``--format tensorrt``, an impossible batch range, INT8 without calibration data or with
unusable data) is refused before anything is exported; a failed verification leaves the output
folder as it was.

``DIR`` may be a ``recede run`` folder: its **pruned** model is exported (``RUN/pruned``), the
model the run made to ship; ``RUN/trained`` names the dense one explicitly. INT8 samples come
from the run's data (the ``config.yaml`` beside the model folder: calibration and validation
from the training split, held-out samples from the test split) or from ``--calibration PATH``.
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


def _export_folder(path: str) -> Path:
    """The model folder ``DIR`` means: itself, a run folder's ``pruned/``, a train folder's
    ``model/``."""
    from pipeline.models.checkpoint import WEIGHTS, model_folder

    root = Path(path)
    if (root / WEIGHTS).is_file():
        return root
    if (root / "trained").is_dir() or (root / "pruned").is_dir():  # a `recede run` folder
        if (root / "pruned" / WEIGHTS).is_file():
            return root / "pruned"
        raise UsageError(
            f"DIR {root} is a `recede run` folder without its pruned model "
            f"({root / 'pruned' / WEIGHTS} is missing); finish the run (recede run --resume), "
            f"or export {root / 'trained'} to ship the dense model"
        )
    return model_folder(root)


def _int8_source(args: argparse.Namespace, folder: Path) -> tuple[tuple[str, Path] | None, str]:
    """Where INT8 samples come from (``("path", PATH)`` or ``("run", config.yaml)``), or None
    and why none can be had."""
    if args.calibration is not None:
        return ("path", Path(args.calibration)), ""
    config = folder.parent / "config.yaml"
    if config.is_file():
        return ("run", config), ""
    return None, (
        f"{folder} carries no data to calibrate on (no config.yaml beside it, as after `recede "
        "prune --model`); pass --calibration PATH, a .npy array of model inputs or a folder of "
        "images"
    )


def _int8_settings(args: argparse.Namespace, folder: Path) -> Any:
    """Defaults, then the run config's ``export.int8`` (when DIR belongs to a run), then the
    flags."""
    from pipeline.config import Int8Config, load_config
    from pipeline.export.int8_export import settings_from_config

    config = folder.parent / "config.yaml"
    base = load_config(config, ()).export.int8 if config.is_file() else Int8Config()
    return settings_from_config(
        base,
        method=args.int8_method,
        calibration_samples=args.calibration_samples,
        max_drop=args.int8_max_drop,
    )


def _options(args: argparse.Namespace, folder: Path, int8_reason: str) -> tuple[Any, list[str]]:
    """The release options and warnings (formats --format all skips)."""
    from pipeline.config import MIN_OPSET, exporter_max_opset
    from pipeline.export.release import ReleaseOptions, resolve_formats
    from pipeline.export.tensorrt import unavailable_reason

    top = exporter_max_opset()
    if not MIN_OPSET <= args.opset <= top:
        raise UsageError(
            f"--opset: expected an integer in [{MIN_OPSET}, {top}] (what this torch's ONNX "
            f"exporter emits), got {args.opset}; pass --opset {MIN_OPSET}"
        )
    reason = _tensorrt_reason(args, unavailable_reason)
    if args.format == "onnx-int8" and int8_reason:
        raise UsageError(f"--format onnx-int8: {int8_reason}")
    formats, warnings = resolve_formats(args.format, reason, int8_reason or None)
    _check_int8_engine(args, formats, reason, int8_reason)
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    try:
        options = ReleaseOptions(
            formats, args.opset, not args.no_slim, args.atol, precision,
            args.max_batch, args.opt_batch, min(4, args.max_batch - 1),
            _int8_settings(args, folder),
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(f"--opt-batch/--max-batch: {err}; lower --opt-batch") from None
    return options, [
        f"{w}; {_TRT_FIX}" if w.startswith("skipping TensorRT") else w for w in warnings
    ]


def _tensorrt_reason(args: argparse.Namespace, unavailable_reason: Any) -> str | None:
    """Why no engine can be built here (None: it can), after refusing what cannot run."""
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
    return reason


def _check_int8_engine(
    args: argparse.Namespace, formats: tuple[str, ...], trt_reason: str | None, int8_reason: str
) -> None:
    """``--int8`` asks for a TensorRT INT8 engine: refuse it where none can be built."""
    if not args.int8:
        return
    if "tensorrt" not in formats and args.format == "all":
        raise UsageError(
            f"--int8 asks for a TensorRT INT8 engine, and this machine cannot build one "
            f"({trt_reason}); drop --int8 (--format all still writes model.int8.onnx, the INT8 "
            f"graph ONNX Runtime runs), or {_TRT_FIX}"
        )
    if "tensorrt" not in formats:
        raise UsageError(
            f"--int8 builds a TensorRT INT8 engine, and --format {args.format} makes no "
            "TensorRT engine; pass --format tensorrt with --int8 (for an INT8 ONNX file: "
            "--format onnx-int8, without --int8)"
        )
    if int8_reason:
        raise UsageError(f"--int8: the engine is built from an INT8 graph, and {int8_reason}")


def _int8_samples(source: tuple[str, Path] | None, spec: ModelSpec, options: Any) -> Any:
    """Calibration, validation and held-out samples, read and checked before any work."""
    from pipeline.export.release import needs_int8

    if not needs_int8(options) or source is None:
        return None
    from pipeline.data.calibration import from_datasets, from_path

    kind, where = source
    count = options.int8.options.calibration_samples
    if kind == "path":
        return from_path(where, spec.input_shape, calibration=count, seed=0)
    from pipeline.config import load_config
    from pipeline.data.datasets import load_data

    cfg = load_config(where, ())
    data = load_data(cfg.data, seed=cfg.train.seed)
    if tuple(data.input_shape) != tuple(spec.input_shape):
        raise UsageError(
            f"{where} names data of shape {tuple(data.input_shape)}, and the model takes "
            f"{tuple(spec.input_shape)}; pass --calibration PATH with inputs of the model's shape"
        )
    section = cfg.export.int8
    return from_datasets(
        data.train.dataset, data.test.dataset, calibration=count,
        validation=section.validation_samples, heldout=section.verify_samples,
        seed=cfg.train.seed, name=cfg.data.name,
    )  # fmt: skip


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
    stage: Path, folder: Path, out: Path, loaded: tuple, options: Any, samples: Any, accept: bool
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
        model, spec.input_shape, stage, options, int8_samples=samples, latency_cost=_int8_cost(),
        classes=spec.num_classes,
    )  # fmt: skip
    for check in release.all_checks():
        print(
            f"{out / check.path if check.path else check.what}: {check.precision}, {check.line()}"
        )
    raise_unless_verified(
        release.all_checks(), accept_insensitive=accept, where=f"{out} is left unchanged"
    )
    metrics = {c.what: check_metrics(c) for c in release.all_checks()}
    write_manifest(
        stage,
        {name: stage / rel for name, rel in release.files.items()},
        config=_release_config(folder, out, spec, options),
        metrics=metrics,
        export=release.details,
        preprocessing=_preprocessing(folder),
    )
    return release


def _run_allowed_slower(folder: Path) -> bool:
    """Whether the run that made ``folder`` was told to ship a slower model
    (``export.allow_slower: true`` in its config.yaml): the same decision holds for its export."""
    from pipeline.config import ConfigError, load_config

    config = folder.parent / "config.yaml"
    try:
        return config.is_file() and load_config(config, ()).export.allow_slower
    except ConfigError:
        return False  # an unreadable config decides nothing here; the export checks it later


def _refuse_slower_run(folder: Path, allow: bool) -> None:
    """A run's pruned model whose own latency table (``RUN/report.json``) shows it slower than
    the dense model beyond noise is not exported unless ``--allow-slower`` (exit 1, nothing
    written); a folder without such a table has nothing to check here (``recede bench`` times
    it)."""
    import json

    from pipeline.bench.speed_gate import refuse_slower
    from pipeline.bench.timing import LatencyRow

    report = folder.parent / "report.json"
    if folder.name != "pruned" or not report.is_file():
        return
    try:
        rows = [LatencyRow.from_mapping(r) for r in json.loads(report.read_text())["latency"]]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a recede run report: no table to read
    where = f"the run's table is in {report}; nothing was written"
    flagged = refuse_slower(rows, allow=allow, where=where)
    if flagged:
        logger.warning("exporting a model slower than dense on %s (--allow-slower)",
                       "; ".join(flagged))  # fmt: skip


def _preprocessing(folder: Path) -> dict[str, Any] | None:
    """The input preprocessing the run's data config implies; None (unknown) without one."""
    from pipeline.config import load_config
    from pipeline.data.datasets import preprocessing

    config = folder.parent / "config.yaml"
    if not config.is_file():
        return None
    return preprocessing(load_config(config, ()).data)


def check_metrics(check: Any) -> dict[str, Any]:
    """What the manifest's ``metrics`` keeps of a check: error, bound, effect and verdict (for
    INT8: accuracies, agreement, drop and bound)."""
    if hasattr(check, "measured"):  # an INT8 check (pipeline.export.int8_check.Int8Check)
        m = check.measured
        return {
            "fp32_accuracy": m.fp32_accuracy, "accuracy": m.int8_accuracy,
            "agreement": m.agreement, "max_logit_error": m.max_logit_error, "drop": m.drop,
            "max_drop": check.max_drop, "sensitivity": check.sensitivity,
            "verdict": check.verdict,
        }  # fmt: skip
    return {
        "max_abs_err": check.max_abs_err, "bound": check.bound,
        "input_effect": check.input_effect, "sensitivity": check.sensitivity,
        "verdict": check.verdict,
    }  # fmt: skip


def _single_output_engine(
    args: argparse.Namespace, model: Any, spec: ModelSpec, options: Any, warnings: list[str]
) -> tuple[Any, list[str]]:
    """A TensorRT engine is verified with one output (``TrtRunner``): refuse one for a model
    with several (``--format tensorrt``), or leave it out of ``--format all`` with a warning."""
    from dataclasses import replace

    if "tensorrt" not in options.formats:
        return options, warnings
    import torch

    from pipeline.core.outputs import flatten

    with torch.no_grad():
        names = list(flatten(model.eval()(torch.zeros(1, *spec.input_shape))))
    if len(names) == 1:
        return options, warnings
    why = (
        f"the model has {len(names)} outputs ({', '.join(names[:6])}) and recede verifies "
        "TensorRT engines with one output only"
    )
    if args.format != "all" or args.int8 or "tensorrt" in (args.require or []):
        raise UsageError(f"--format {args.format}: {why}; pass --format onnx (or all)")
    formats = tuple(f for f in options.formats if f != "tensorrt")
    return replace(options, formats=formats), [*warnings, f"skipping TensorRT: {why}"]


def _int8_cost() -> Any:
    from pipeline.bench.int8_cost import fallback_latency

    return fallback_latency


def export_command(args: argparse.Namespace) -> int:
    """Export a saved model folder (ONNX, FP16 or INT8 ONNX, TensorRT), verify each, write a
    manifest."""
    from pipeline.core.output_folders import staged_folder
    from pipeline.models.checkpoint import load_pruned

    folder = _export_folder(args.dir)
    model, spec = load_pruned(folder)  # a damaged folder is refused here, naming the file
    _refuse_slower_run(folder, args.allow_slower or _run_allowed_slower(folder))
    out = _out_folder(args, folder)
    source, int8_reason = _int8_source(args, folder)
    options, warnings = _options(args, folder, int8_reason)
    options, warnings = _single_output_engine(args, model, spec, options, warnings)
    samples = _int8_samples(source, spec, options)  # read and checked before any work
    for warning in warnings:
        logger.warning("%s", warning)
    in_place = out == folder.absolute()
    kind, start = ("prune", "copy") if in_place else ("export", "empty")
    with staged_folder(out, kind=kind, start=start) as stage:
        release = _write(
            stage, folder, out, (model, spec), options, samples, args.accept_insensitive
        )
    print(f"{out / 'manifest.json'}: {len(release.files)} artefacts")
    return EXIT_OK
