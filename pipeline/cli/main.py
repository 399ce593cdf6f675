"""The ``recede`` command line: run, train, prune, export, bench, inspect.

Exit codes: 0 ok, 1 verification failed, 2 bad input (checked before any work where it can be,
and nothing is changed at the output paths). Each handler's docstring is its help. Only this
module configures logging or prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli.args import (  # noqa: F401
    EXIT_INPUT,
    EXIT_OK,
    EXIT_VERIFY,
    UsageError,
    resolve_input_folder,
)

if TYPE_CHECKING:
    from pipeline.models.zoo import ModelSpec
    from pipeline.prune.layer_table import LayerTable

logger = logging.getLogger("recede")


def _config(args: argparse.Namespace):
    """The resolved config; under torchrun also checked against the number of processes."""
    from pipeline.config import load_config
    from pipeline.core.distributed import check_batch

    cfg = load_config(args.config, args.set or ())
    check_batch(cfg.data.batch_size)
    return cfg


def _before_training(args: argparse.Namespace, cfg, *, bench: bool) -> None:
    """``--out`` and every value only training or later would use, checked before any work."""
    from pipeline.cli.preflight import check_before_training
    from pipeline.core.output_folders import check_out_folder

    check_out_folder(args.out, kind=args.command, force=args.force, flag="--out")
    check_before_training(cfg, bench=bench)


def cmd_run(args: argparse.Namespace) -> int:
    """Train with the polarising penalty, prune, fine-tune, fold, export, verify and time."""
    from pipeline.run.pipeline import run_pipeline

    if args.allow_slower:
        args.set = [*(args.set or ()), "export.allow_slower=true"]
    cfg = _config(args)
    _before_training(args, cfg, bench=True)
    report = run_pipeline(cfg, args.out, resume=args.resume, force=args.force)
    if report is None:  # a torchrun rank other than 0: it trained, rank 0 writes and reports
        return EXIT_OK
    print(Path(args.out, "report.md").read_text())
    from pipeline.bench.timing import noise_note

    if note := noise_note(report.latency):
        print(f"recede run: warning: {note}", file=sys.stderr)
    print(f"wrote {args.out} in {round(report.seconds, 1)} s: {report.outcome()}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    """Train only (with the configured penalty) and save the model as state dict + shapes."""
    from pipeline.core.distributed import is_main
    from pipeline.core.output_folders import staged_folder
    from pipeline.run.latency_budget import check_latency_deployment, latency_model_for_run
    from pipeline.train.stage import open_training, train_as_worker, train_into

    cfg = _config(args)
    check_latency_deployment(cfg)  # a latency budget's deployment, before any work
    _before_training(args, cfg, bench=False)
    out, data = open_training(cfg, args.out, kind="train", resume=args.resume, force=args.force)
    if not is_main():  # a torchrun rank other than 0 trains in step and writes nothing
        train_as_worker(cfg, data, out, resume=args.resume)
        return EXIT_OK
    latency = latency_model_for_run(cfg, data)  # None without train.target_cost latency
    start = "resume" if args.resume else "empty"
    with staged_folder(out, kind="train", start=start, keep_on_error=True) as stage:
        lm = latency[0] if latency else None
        _, logs = train_into(cfg, data, stage, "model", resume=args.resume, latency=lm)
        _save_latency_model(stage, latency)
    accuracy = logs[-1].accuracy if logs else float("nan")
    budget = f"; {_train_budget(cfg, logs, latency)}" if cfg.train.target or latency else ""
    print(f"trained {len(logs)} epochs, accuracy {accuracy:.4f}; model in {out / 'model'}{budget}")
    return EXIT_OK


def _build(args: argparse.Namespace, input_shape: tuple[int, ...]):
    """Build ``--model`` for one example of ``input_shape`` (C, H, W); returns (model, spec).

    A user factory's own exception (or sys.exit) becomes a UsageError naming the flag.
    """
    from pipeline.config import ModelConfig
    from pipeline.models.zoo import ModelError, ModelSpec, default_num_classes

    in_channels = input_shape[0]
    classes = args.num_classes if args.num_classes is not None else default_num_classes(args.model)
    spec = ModelSpec(ModelConfig(name=args.model), classes, in_channels, input_shape)
    try:
        model = spec.build()
    except ModelError as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    return model, spec


def _failed_check(err: AssertionError, model) -> str:
    """What a model's own shape assertion says: its message, else the asserting line of code
    with the sizes it names (timm's ``_assert(H % self.block_size == 0, '')`` has no message),
    and the model's default input size when it declares one (timm's ``pretrained_cfg``)."""
    import re
    import traceback

    frames = [
        f for f in traceback.walk_tb(err.__traceback__) if "assert" not in f[0].f_code.co_name
    ]
    said = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    if frames:  # the innermost frame that is not an assert helper (torch._assert, timm's)
        frame, lineno = frames[-1]
        line = traceback.FrameSummary(frame.f_code.co_filename, lineno, None).line or ""
        sizes = []
        for name in dict.fromkeys(re.findall(r"[A-Za-z_][\w.]*", line)):
            head, *attrs = name.split(".")
            value = frame.f_locals.get(head)
            for attr in attrs:
                value = getattr(value, attr, None)
            if isinstance(value, int) or (isinstance(value, tuple) and value):
                sizes.append(f"{name}={tuple(value) if isinstance(value, tuple) else value}")
        where = f"{Path(frame.f_code.co_filename).name}:{lineno}"
        said = f"{said + '; ' if said else ''}`{line}` failed ({where}{', ' if sizes else ''}"
        said += ", ".join(sizes) + ")"
    default = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return said + (f"; its default input size is {'x'.join(map(str, default))}" if default else "")


def _check_forward(model, example, what: str) -> None:
    """Run the model once, so an input it cannot take is reported before any work.

    A model that checks its own input with ``assert`` (timm's attention blocks want H and W a
    multiple of their block size) is reported the same way, with the failed check as it reads
    in the model's code, and never as an ``AssertionError`` traceback.
    """
    import torch

    from pipeline.core.outputs import OutputError, flatten

    try:
        with torch.no_grad():
            out = model(example)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as err:
        if isinstance(err, AssertionError):
            first = _failed_check(err, model)
        else:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise UsageError(
            f"{what}: the model cannot take an input of shape {tuple(example.shape)} "
            f"({type(err).__name__}: {first}); expected a shape it accepts, e.g. a larger "
            "H,W or the channel count it was built for"
        ) from None
    try:
        flatten(out)  # a tree of tensors, or refused before any work
    except OutputError as err:
        raise UsageError(f"{what}: {err}") from None


# The prune example is also the removal check's batch: one sample cannot show that the output
# depends on the input (the check's wrong-input effect is 0, so it is always insensitive), so it
# holds at least as many samples as an export verifies with.
VERIFY_BATCH = 4


def _load_model(args: argparse.Namespace, *, batch: int = 1):
    """(model, spec, example) from --from DIR or --model SPEC --input-shape; the example holds
    at least ``batch`` samples (the shape given is what the model is checked to accept)."""
    import torch

    from pipeline.models.checkpoint import SHAPES, load_pruned, model_folder

    if args.source:
        model, spec = load_pruned(args.source)
        shapes = model_folder(args.source) / SHAPES
        shape, what = (1, *spec.input_shape), f"--from {args.source} ({shapes}: spec.input_shape)"
    elif args.model and args.input_shape:
        shape, what = args.input_shape, f"--model {args.model} --input-shape"
        model, spec = _build(args, tuple(shape[1:]))
    else:
        raise UsageError(
            f"recede {args.command} needs --from DIR (a saved model, train or run folder) or "
            "--model SPEC with --input-shape N,C,H,W; got neither"
        )
    n, *sample = shape
    example = torch.randn(max(n, batch), *sample, generator=torch.Generator().manual_seed(0))
    _check_forward(model.eval(), example[:n], what)
    if n < batch:  # a model that takes the shape given but not a batch of that size
        _check_forward(model, example, f"{what} (at batch {batch}, to verify)")
    return model, spec, example


def _receded_below(args: argparse.Namespace) -> float | None:
    """``train.receded_below`` from the config.yaml beside a --from model, if there is one.

    With it the automatic threshold checks its cut against what training receded.
    """
    from pipeline.config import load_config
    from pipeline.models.checkpoint import model_folder

    if not args.source:
        return None
    config = model_folder(args.source).parent / "config.yaml"
    return load_config(config).train.receded_below if config.is_file() else None


def _prune_report(result, spec: ModelSpec, table: LayerTable, accepted: list) -> dict:
    """report.json of a prune: totals and per-layer rows from ``table``, groups, threshold, the
    removal check and the insensitive checks the user ``accepted``."""
    summary = result.report()
    check = result.removal.check
    return {
        "model": spec.model.name,
        "input_shape": [1, *result.input_shape],
        "params": {"before": table.before.params, "after": table.after.params},
        "macs": {"before": table.before.macs, "after": table.after.macs},
        "groups": {
            "total": summary.total,
            "prunable": summary.prunable,
            "dropped": summary.dropped,
            "exact": summary.exact,
            "approximate": summary.approximate,
            "approximate_rel_err": summary.approximate_rel_err,
            "held_back": summary.held_back,
        },
        "threshold": {"mode": summary.threshold_mode, "value": summary.threshold_value},
        "barriers": summary.barriers,
        "layers": [dataclasses.asdict(row) for row in table.rows],
        "verification": [check.to_dict()] if check else [],
        "accepted_insensitive": accepted,
    }


def _verified_removal(result, args: argparse.Namespace) -> list[dict]:
    """Print the removal check and enforce it as ``export`` does (exit 1 on ``failed``, and on
    ``insensitive`` without --accept-insensitive); returns the accepted insensitive checks."""
    from pipeline.core.checks import raise_unless_verified

    checks = [result.removal.check] if result.removal.check else []
    for check in checks:
        print(f"{check.what}: {check.precision}, {check.line()}")
    return raise_unless_verified(
        checks, accept_insensitive=args.accept_insensitive, where=f"{args.out} is left unchanged"
    )


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a model (a torchvision/factory spec, or a saved model, train or run folder), verify
    the removal, and print the per-layer table: channels kept, params and MACs before and after."""
    from pipeline.cli.latency import cut_to_latency, latency_flags
    from pipeline.config import PruneConfig
    from pipeline.core.atomic import write_json_atomic, write_text_atomic
    from pipeline.core.output_folders import check_out_folder, staged_folder
    from pipeline.models.checkpoint import save_pruned
    from pipeline.models.detection import kept_whole
    from pipeline.prune.layer_table import layer_table
    from pipeline.prune.stage import prune_model

    if args.scope == "layer" and args.threshold != "ratio":
        raise UsageError(
            f"--scope layer drops a ratio from every layer, so it needs --threshold ratio (the "
            f"default); got --threshold {args.threshold}. Drop --threshold or use --scope global"
        )
    deployment = latency_flags(args)  # None without --target-ms
    out = check_out_folder(args.out, kind="prune", force=args.force, flag="--out")
    model, spec, example = _load_model(args, batch=VERIFY_BATCH)
    cfg = PruneConfig(
        threshold=args.threshold,
        ratio=args.ratio,
        scope=args.scope,
        min_channels=args.min_channels,
        round_to=args.round_to,
        exact_borders=args.exact_borders,
        allow_approximate=args.allow_approximate,
    )
    latency = None
    if deployment is None:
        result = prune_model(model, example, cfg, receded_below=_receded_below(args))
    else:
        result, section, latency = cut_to_latency(args, model, example, cfg, deployment)
    table = layer_table(model, result.graph, result.input_shape, result.model, result.plan)
    print(table.render())
    accepted = _verified_removal(result, args)
    report = _prune_report(result, spec, table, accepted)
    report |= {"latency": section} if latency else {}
    whole = kept_whole(model)  # a detector's parts outside its graph (pipeline.models.detection)
    if whole:
        report["kept_whole"] = whole
    with staged_folder(out, kind="prune") as stage:
        save_pruned(result.model, stage, spec=spec)
        write_json_atomic(stage / "report.json", report)
        write_text_atomic(stage / "plan.json", result.plan.to_json())
        _save_latency_model(stage, latency and (latency, True))
    counts = result.report()
    print(
        f"pruned {spec.model.name}: {table.summary()}; dropped {counts.dropped} of "
        f"{counts.prunable} prunable channel groups; wrote {args.out}"
    )
    for b in result.graph.barriers:
        print(f"barrier: {b.op} at {b.module} (node {b.node})")
    for name, why in whole.items():
        print(f"kept whole: {name}: {why}")
    return EXIT_OK


def _save_latency_model(stage: Path, latency) -> None:
    """A latency budget's model, copied into the staged folder (``inspect --latency-table``)."""
    if latency:
        from pipeline.core.atomic import write_json_atomic

        write_json_atomic(stage / "latency_model.json", latency[0].to_dict())


def _train_budget(cfg, logs, latency) -> str:
    """``recede train``'s budget outcome, in shares of MACs, groups or predicted latency."""
    from pipeline.run.latency_budget import training_budget
    from pipeline.train.stage import budget_summary

    if latency is None:
        return budget_summary(cfg, logs).outcome
    return training_budget(cfg, latency[0], logs).outcome


def cmd_export(args: argparse.Namespace) -> int:
    """Fold BN, export a saved model folder (a run folder: its pruned model) to ONNX, FP16 ONNX,
    calibrated INT8 ONNX and/or a TensorRT engine, verify each (INT8 by its agreement with fp32
    on held-out samples), and write a release manifest (into --out, or the folder itself)."""
    from pipeline.cli.export import export_command
    from pipeline.core.output_folders import check_replaceable
    from pipeline.models.checkpoint import model_folder

    folder = model_folder(args.dir).absolute()
    if args.out is None:  # in place: the model folder itself is swapped for its new version
        check_replaceable(folder, "DIR")
    elif folder in Path(args.out).absolute().parents:  # one without a marker, too
        raise UsageError(
            f"--out {args.out} is inside the model folder {folder} it exports; replacing that "
            f"folder would delete the release; expected a folder outside it; pass e.g. --out "
            f"{folder.parent / (folder.name + '-release')}"
        )
    return export_command(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time models (run, prune, export or train folders, model folders, .onnx files) on every
    backend and device available, interleaved, against the dense model: p50/p90/p99 with noise,
    speed-up with its spread, a batch sweep, GPU vs CPU; --compare gates on a baseline."""
    from pipeline.cli.bench import bench_command

    return bench_command(args)


def _print_graph(args: argparse.Namespace) -> None:
    from pipeline.graph.channel_graph import build_channel_graph
    from pipeline.prune.layer_table import layer_table

    model, spec, example = _load_model(args)
    graph = build_channel_graph(model, example)
    table = layer_table(model, graph, tuple(example.shape[1:]))
    print(table.render())
    shape = "x".join(str(n) for n in example.shape)
    print(f"{spec.model.name} ({spec.num_classes} classes, input {shape}): {table.summary()}")
    print(f"outputs: {_outputs_line(model, example)}")
    weight = {g.id for g in graph.weight_groups}
    print(
        f"{len(graph.layers)} layers, {len(graph.groups)} channel groups, "
        f"{len(graph.prunable_groups)} prunable, {len(weight)} weight-gated "
        "(no BN; removed only with --scope layer)"
    )
    reasons: dict[str, int] = {}
    for g in graph.groups:
        if not g.prunable and g.id not in weight:
            reasons[g.reason] = reasons.get(g.reason, 0) + 1
    for reason, n in sorted(reasons.items()):
        print(f"  {n} groups kept: {reason}")
    for b in graph.barriers:
        print(f"barrier: {b.op} at {b.module} (node {b.node})")


def _outputs_line(model, example) -> str:
    """Each output's name and shape (one per tensor the model returns, as ONNX will name it)."""
    import torch

    from pipeline.core.outputs import describe

    with torch.no_grad():
        return describe(model.eval()(example))


def _holds_model(path: str) -> bool:
    from pipeline.models.checkpoint import CheckpointError, model_folder

    try:
        model_folder(path)
    except CheckpointError:
        return False
    return True


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a model's per-layer table (channels, params, MACs), channel groups and barriers, or
    a `recede run` folder's report.

    DIR (or --from DIR) holding report.md is a run folder: its files are checked against its
    index (unless --force) and its report is printed. Any other DIR must hold a saved model (a
    prune, train or model folder), loaded and checked as `recede prune DIR` does. With
    --latency-table, DIR's latency model (a latency budget's run, train or prune folder).
    """
    if args.latency_table:
        from pipeline.cli.latency import print_latency_table

        if not args.source:
            raise UsageError("--latency-table needs DIR, a folder a latency budget wrote")
        print_latency_table(Path(args.source), args)
        return EXIT_OK
    if args.source and (Path(args.source) / "report.md").is_file():
        folder = Path(args.source)
        from pipeline.cli.bench import verify_unless_forced

        verify_unless_forced(folder, args)
        print((folder / "report.md").read_text())
        return EXIT_OK
    if args.source and not _holds_model(args.source):
        raise UsageError(
            f"{args.source} holds no report.md (so it is no `recede run` folder) and, in it or "
            "its model/ or trained/ subfolder, holds no saved model (model.pt with shapes.json); "
            "expected a folder from `recede run`, `recede prune` or `recede train`, or pass "
            "--model SPEC --input-shape N,C,H,W"
        )
    _print_graph(args)
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "train": cmd_train,
    "prune": cmd_prune,
    "export": cmd_export,
    "bench": cmd_bench,
    "inspect": cmd_inspect,
}


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli.args import build_parser as build

    return build(COMMANDS, __doc__.splitlines()[0])


def _input_errors() -> tuple[type[BaseException], ...]:
    """Bad input (exit 2). Every recede error class for bad input is a ValueError."""
    return (ValueError, FileNotFoundError, ImportError, PermissionError, NotADirectoryError)


def _own_import_failed(err: BaseException) -> bool:
    """An ImportError of recede's own module (a name that moved): a bug, never exit 2. A missing
    optional package (onnx, timm, tensorrt) or a user's factory module is the user's to fix."""
    name = getattr(err, "name", None) or ""
    return isinstance(err, ImportError) and (name == "pipeline" or name.startswith("pipeline."))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or argparse's exit code (2 for a bad flag, 0 for --help)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_INPUT


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def _interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C left: staging folders are removed on the way out, except one kept to resume
    (only ``run`` and ``train`` have ``--resume``, and only a folder with work in it is kept)."""
    from pipeline.core.output_folders import partial_folder

    out = getattr(args, "out", None)
    if out and partial_folder(out).is_dir() and hasattr(args, "resume"):
        return f"interrupted; {out} is unchanged, the unfinished {partial_folder(out)} is kept for --resume"
    if out and partial_folder(out).is_dir():  # Ctrl-C twice: the clean-up was cut short
        return f"interrupted; {out} is unchanged; the next write removes {partial_folder(out)}"
    return "interrupted; nothing was written"


def _recover_paths(args: argparse.Namespace) -> None:
    """Finish a swap a kill interrupted at any folder the command names, before it reads or
    judges it (``pipeline.core.folder_swap``); a file's folder counts (``bench rel/x.onnx``)."""
    from pipeline.core.output_folders import recover_interrupted_swap

    named = [getattr(args, n, None) for n in ("source", "dir", "out")]
    for path in filter(None, [*named, *(getattr(args, "models", None) or [])]):
        for folder in (Path(path), Path(path).absolute().parent):
            recover_interrupted_swap(folder)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recede`` console script; returns the exit code."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    from pipeline.core.progress import set_quiet

    set_quiet(args.quiet)  # bars only: log lines stay
    quiet = os.environ.get("RANK", "0") != "0"  # torchrun: rank 0 alone logs progress
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from pipeline.core.checks import VerificationError  # FoldError and ExactnessError are ones

    try:
        resolve_input_folder(args)
        _recover_paths(args)
        return args.handler(args)
    except VerificationError as err:
        print(f"recede {args.command}: verification failed: {err}", file=sys.stderr)
        return EXIT_VERIFY
    except _input_errors() as err:
        if _own_import_failed(err):
            raise  # a bug in recede, not the user's input: show it as one
        print(f"recede {args.command}: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"recede {args.command}: {_interrupted(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
