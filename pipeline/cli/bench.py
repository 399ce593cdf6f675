"""``recede bench``: open the models and their dense reference, time them, gate on a baseline.

The handler behind ``pipeline.cli.main.cmd_bench``. Outputs are checked before any timing: a path
inside a folder recede indexed is refused (exit 2), as a file added there would make the next
``recede bench`` of that folder refuse it as changed. So is a ``--compare`` baseline that is
invalid, noisy, or from another machine or model (:mod:`pipeline.bench.baseline`). ``--compare``
fails (exit 1) only on a slowdown beyond the measured noise that a second measurement confirms
(:mod:`pipeline.bench.latency_gate`). ``--save-baseline`` writes nothing when the gate failed
or a row is noisy or preempted (exit 1): such a baseline would pass a slow release or be refused.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli.args import UsageError

if TYPE_CHECKING:
    from pipeline.bench.artefacts import Artefact
    from pipeline.bench.sweep import SweepConfig
    from pipeline.bench.timing import Setting

logger = logging.getLogger("recede")


def verify_unless_forced(folder: Path, args: argparse.Namespace) -> None:
    """Refuse a recede folder whose files no longer match its index (``pipeline.core.integrity``);
    ``recede inspect`` uses it too."""
    from pipeline.core.integrity import verify_folder

    if not args.force:
        verify_folder(folder)
    else:
        logger.warning(
            "--force: %s is used UNCHECKED; its files may have been changed since recede "
            "wrote them",
            folder,
        )


def _open_bench_model(path: str, args: argparse.Namespace) -> list[Artefact]:
    """The artefacts one MODEL argument names; the one place ``bench`` opens a folder, after
    checking the folder's files against its index (unless ``--force``)."""
    from pipeline.bench.artefacts import open_artefacts

    verify_unless_forced(Path(path), args)
    return open_artefacts(path)


def _bench_settings(args: argparse.Namespace) -> list[Setting]:
    """The settings ``--backends``/``--devices``/``--fp16``/``--copies`` ask for that can run."""
    import torch

    from pipeline.bench.sweep import available_settings

    if args.devices and "cuda" in args.devices and not torch.cuda.is_available():
        raise UsageError(
            "--devices cuda needs a CUDA GPU, but torch.cuda.is_available() is False; "
            "drop the flag (CPU rows only) or run on a machine with an NVIDIA GPU"
        )
    return available_settings(
        backends=args.backends,
        devices=args.devices or ("cpu", "cuda"),
        fp16=args.fp16,
        copies=args.copies,
    )


def _indexed_folder(path: str) -> Path | None:
    """The folder holding ``path`` that recede indexed (``.recede.json``), if any."""
    from pipeline.core.integrity import MARKER

    return next((d for d in Path(path).absolute().parents if (d / MARKER).is_file()), None)


def _check_bench_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that are folders, unwritable, or inside a folder recede indexed:
    a file added there would make every later ``recede bench`` of that folder refuse it as
    changed (refusing is simpler and safer than rewriting another command's index)."""
    from pipeline.core.output_folders import check_writable

    for flag in ("--json", "--markdown", "--plot", "--save-baseline"):
        path = getattr(args, flag.lstrip("-").replace("-", "_"))
        if path is not None and Path(path).is_dir():
            raise UsageError(f"{flag} {path}: a folder, expected a file path; add a file name")
        if path is not None and (indexed := _indexed_folder(path)) is not None:
            raise UsageError(
                f"{flag} {path}: inside {indexed}, a folder recede wrote and indexed; a file "
                f"added there makes later `recede bench {indexed}` refuse it as changed; "
                f"expected a path outside it, e.g. {Path(path).name} in another folder"
            )
        if path is not None:  # the folder it goes into: an existing file is replaced
            check_writable(Path(path).absolute().parent, flag)


def _write_bench_outputs(
    args: argparse.Namespace, report: dict, text: str, *, baseline: bool
) -> None:
    """Write ``--json``, ``--markdown``, ``--plot`` and, when ``baseline``, ``--save-baseline``."""
    import importlib.util

    from pipeline.core.atomic import write_json_atomic, write_text_atomic

    for path in (args.json, args.save_baseline if baseline else None):
        if path:
            write_json_atomic(path, report)
    if args.markdown:
        write_text_atomic(args.markdown, text)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(f"--plot {args.plot}: skipped, matplotlib is not installed (pip install matplotlib)")
    elif args.plot:
        from pipeline.run.plots import plot_latency

        plot_latency(report["rows"], args.plot)


def _bench_artefacts(args: argparse.Namespace, settings: list[Setting]) -> list[Artefact]:
    """The MODELs' artefacts, the dense reference first: ``--reference MODEL``, else the dense
    model a prune, export or run's pruned/ folder came from (``artefacts.dense_reference``).

    Raises:
        UsageError: No MODEL can run under ``settings`` (timing the reference alone is no
            answer to anything).
    """
    from pipeline.bench.artefacts import dense_reference, unique_labels
    from pipeline.bench.sweep import runnable

    artefacts = [a for path in args.models for a in _open_bench_model(path, args)]
    if not any(runnable(a, s) for a in artefacts for s in settings):
        raise UsageError(nothing_to_time(args.backends, args.devices, artefacts, settings))
    if args.reference:
        reference = _open_bench_model(args.reference, args)
    elif not any(a.label == "dense" for a in artefacts):
        found = dense_reference(args.models[0], artefacts[0])
        reference = [] if found is None else [found]
    else:
        reference = []
    return unique_labels([*reference, *artefacts])


def _why_not(backend: str, devices: list[str], artefacts: list[Artefact], settings: list) -> str:
    """Why ``backend`` times nothing here: no setting of it can run, or no MODEL has what it
    needs."""
    from pipeline.export.tensorrt import tensorrt_available

    if not any(s.backend == backend for s in settings):
        if backend == "tensorrt" and "cuda" not in devices:
            return "tensorrt runs on CUDA only, and --devices has no cuda"
        if backend == "tensorrt":
            return "tensorrt needs a CUDA GPU and the tensorrt package" + (
                "" if tensorrt_available() else " (not usable here)"
            )
        return f"{backend} has no usable provider on --devices {' '.join(devices)} here"
    if backend == "torch":
        return "torch needs a model folder (model.pt); these MODELs are .onnx files only"
    return (
        f"{backend} needs an .onnx file, and these MODELs have none "
        "(export one with `recede export MODEL`)"
    )


def nothing_to_time(
    backends: list[str], devices: list[str] | None, artefacts: list[Artefact], settings: list
) -> str:
    """The refusal when no MODEL runs under any setting: why each backend given times
    nothing, and only fixes that differ from the flags given (a backend not yet in
    ``--backends`` that would time these MODELs here, else another MODEL)."""
    from pipeline.bench.sweep import available_settings, runnable

    devices = list(devices or ("cpu", "cuda"))
    reasons = "; ".join(_why_not(b, devices, artefacts, settings) for b in backends)
    others = [
        b
        for b in ("torch", "onnxruntime")
        if b not in backends
        and any(
            runnable(a, s)
            for a in artefacts
            for s in available_settings(backends=[b], devices=devices)
        )
    ]
    fix = (
        f"add {' '.join(others)} to --backends (--backends {' '.join([*backends, *others])})"
        if others
        else "pass a MODEL that has what they need: a model folder with model.pt for torch, "
        "an .onnx file for onnxruntime and tensorrt"
    )
    return (
        f"nothing to time: --backends {' '.join(backends)} on --devices {' '.join(devices)} "
        f"cannot run on these MODELs here: {reasons}; {fix}"
    )


def _timed(artefacts: list[Artefact], settings: list[Setting], cfg: SweepConfig) -> dict:
    """One sweep as a bench report; a CUDA graph that replays wrongly fails verification."""
    from pipeline.bench.backends import ReplayMismatchError
    from pipeline.bench.sweep import bench_report, sweep
    from pipeline.core.checks import VerificationError

    try:
        return bench_report(sweep(artefacts, settings, cfg), artefacts, cfg)
    except ReplayMismatchError as err:
        raise VerificationError(str(err)) from None


def bench_command(args: argparse.Namespace) -> int:
    """``recede bench`` (see ``pipeline.cli.main.cmd_bench``): check the outputs and the baseline,
    open the models and their dense reference, time them interleaved, gate, write."""
    from pipeline.bench.artefacts import check_batches
    from pipeline.bench.baseline import check_against, identity, load_baseline, planned_rows, stamp
    from pipeline.bench.sweep import SweepConfig, bench_markdown
    from pipeline.bench.timing import LatencyRow, noise_note
    from pipeline.cli.gate import baseline_refusal, check_gate_flags, gate, gate_verdict

    _check_bench_outputs(args)
    check_gate_flags(args)
    try:
        cfg = SweepConfig(tuple(args.batches), args.threads, args.runs, args.warmup, args.clock)
    except ValueError as err:
        raise UsageError(f"--clock {args.clock} --threads {args.threads}: {err}") from None
    baseline = load_baseline(args.compare) if args.compare else None  # before opening models
    settings = _bench_settings(args)
    artefacts = _bench_artefacts(args, settings)
    check_batches(artefacts, tuple(args.batches))
    identities = {a.label: identity(a) for a in artefacts}
    allowed: list[str] = []
    if baseline is not None:  # another machine or model is refused before any timing
        planned = planned_rows(artefacts, settings, cfg, identities)
        allow = {"allow_machine": args.allow_other_machine, "allow_model": args.allow_other_model}
        allowed = check_against(baseline, planned, args.compare, **allow)

    def timed() -> dict:
        return stamp(_timed(artefacts, settings, cfg), identities)

    report = timed()
    if baseline is not None:
        report = gate(args, report, timed, baseline, allowed)
    text = bench_markdown(report)
    print(text)
    note = noise_note([LatencyRow.from_mapping(r) for r in report["rows"]])
    if note:
        print(f"recede bench: warning: {note}", file=sys.stderr)
    refusal = baseline_refusal(args, report)
    _write_bench_outputs(args, report, text, baseline=refusal is None)
    return gate_verdict(report, refusal)
