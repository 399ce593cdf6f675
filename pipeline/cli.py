"""The ``recede`` command line: run, train, prune, export, bench, inspect.

Exit codes: 0 ok, 1 verification failed, 2 bad input (checked before any work where it can be,
and nothing is changed at the output paths). Each handler's docstring is its help. Only this
module configures logging or prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger("recede")

EXIT_OK, EXIT_VERIFY, EXIT_INPUT = 0, 1, 2


class UsageError(ValueError):
    """A command-line input is wrong; the message names the flag or file (exit 2)."""


def _config(args: argparse.Namespace):
    """The resolved config; under torchrun also checked against the number of processes."""
    from pipeline.config import load_config
    from pipeline.distributed import check_batch

    cfg = load_config(args.config, args.set or ())
    check_batch(cfg.data.batch_size)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    """Train with the polarising penalty, prune, fine-tune, fold, export, verify and time."""
    from pipeline.run import run_pipeline

    cfg = _config(args)
    report = run_pipeline(cfg, args.out, resume=args.resume, force=args.force)
    if report is None:  # a torchrun rank other than 0: it trained, rank 0 writes and reports
        return EXIT_OK
    print(Path(args.out, "report.md").read_text())
    print(f"wrote {args.out} in {report['seconds']} s")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    """Train only (with the configured penalty) and save the model as state dict + shapes."""
    from pipeline.atomic import check_out_folder, staged_folder, write_text_atomic
    from pipeline.checkpoint import save_pruned
    from pipeline.config import dump_config
    from pipeline.data import load_data
    from pipeline.distributed import is_main
    from pipeline.resume import check_resume_config
    from pipeline.run import build_and_train, model_spec, train_as_worker
    from pipeline.train import seed_everything

    cfg = _config(args)
    out = check_out_folder(args.out, kind="train", force=args.force, flag="--out")
    if args.resume:
        check_resume_config(cfg, out)
    data = load_data(cfg.data, seed=cfg.train.seed)
    if not is_main():  # a torchrun rank other than 0 trains in step and writes nothing
        train_as_worker(cfg, data, out, resume=args.resume)
        return EXIT_OK
    start = "resume" if args.resume else "empty"
    with staged_folder(out, kind="train", start=start, keep_on_error=True) as stage:
        write_text_atomic(stage / "config.yaml", dump_config(cfg))
        seed_everything(cfg.train.seed)
        model, logs = build_and_train(cfg, data, stage / "checkpoints", resume=args.resume)
        save_pruned(model, stage / "model", spec=model_spec(cfg, data))
    accuracy = logs[-1].accuracy if logs else float("nan")
    print(f"trained {len(logs)} epochs, accuracy {accuracy:.4f}; model in {out / 'model'}")
    return EXIT_OK


def _build(args: argparse.Namespace, in_channels: int):
    """Build ``--model``; a user factory's own exception becomes a UsageError naming it."""
    from pipeline.config import ModelConfig
    from pipeline.models import ModelError, build_model

    cfg = ModelConfig(name=args.model)
    try:
        model = build_model(cfg, num_classes=args.num_classes, in_channels=in_channels)
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - user code may raise anything; name it, exit 2
        raise UsageError(
            f"--model {args.model}: building it raised {type(err).__name__}: {err}; expected "
            f"an nn.Module built with num_classes={args.num_classes}, "
            f"in_channels={in_channels}; fix the factory or the flags"
        ) from None
    spec = {
        "model": {"name": args.model, "width": cfg.width, "depth": cfg.depth},
        "num_classes": args.num_classes,
        "in_channels": in_channels,
        "bounded_bn": False,
    }
    return model, spec


def _check_forward(model, example, what: str) -> None:
    """Run the model once, so an input it cannot take is reported before any work."""
    import torch

    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise UsageError(
            f"{what}: the model cannot take an input of shape {tuple(example.shape)} "
            f"({type(err).__name__}: {first}); expected a shape it accepts, e.g. a larger "
            "H,W or the channel count it was built for"
        ) from None


def _load_model(args: argparse.Namespace):
    """(model, spec, example) from --from DIR or --model SPEC --input-shape."""
    import torch

    from pipeline.checkpoint import load_pruned

    if args.source:
        model, spec = load_pruned(args.source)
        shape, what = (1, *spec["input_shape"]), f"--from {args.source}"
    elif args.model and args.input_shape:
        shape, what = args.input_shape, f"--model {args.model} --input-shape"
        model, spec = _build(args, shape[1])
        spec["input_shape"] = list(shape[1:])
    else:
        raise UsageError(
            f"recede {args.command} needs --from DIR (a saved model, train or run folder) or "
            "--model SPEC with --input-shape N,C,H,W; got neither"
        )
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    _check_forward(model.eval(), example, what)
    return model, spec, example


def _prune_report(model, result, spec: dict, example) -> dict:
    from pipeline.bench import count_macs, count_params

    shape = tuple(example.shape[1:])
    return {
        "model": spec["model"]["name"],
        "input_shape": list(example.shape),
        "params": {"before": count_params(model), "after": count_params(result.model)},
        "macs": {"before": count_macs(model, shape), "after": count_macs(result.model, shape)},
        "groups": {
            "total": len(result.graph.groups),
            "prunable": len(result.importances),
            "dropped": len(result.plan.dropped_groups),
        },
        "threshold": {"mode": result.plan.threshold_mode, "value": result.plan.threshold_value},
        "barriers": [b.__dict__ for b in result.graph.barriers],
    }


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a model (a torchvision/factory spec, or a saved model, train or run folder)."""
    from pipeline.atomic import (
        check_out_folder,
        staged_folder,
        write_json_atomic,
        write_text_atomic,
    )
    from pipeline.checkpoint import save_pruned
    from pipeline.config import PruneConfig
    from pipeline.run import prune_model

    out = check_out_folder(args.out, kind="prune", force=args.force, flag="--out")
    model, spec, example = _load_model(args)
    cfg = PruneConfig(
        threshold=args.threshold,
        ratio=args.ratio,
        min_channels=args.min_channels,
        round_to=args.round_to,
    )
    result = prune_model(model, example, cfg)
    report = _prune_report(model, result, spec, example)
    with staged_folder(out, kind="prune") as stage:
        save_pruned(result.model, stage, spec=spec)
        write_json_atomic(stage / "report.json", report)
        write_text_atomic(stage / "plan.json", result.plan.to_json())
    print(json.dumps({k: report[k] for k in ("params", "macs", "groups")}, indent=1))
    for b in result.graph.barriers:
        print(f"barrier: {b.op} at {b.module} (node {b.node})")
    return EXIT_OK


def _check_tensorrt() -> None:
    from pipeline.export.tensorrt import tensorrt_available

    if not tensorrt_available():
        raise UsageError(
            "--format tensorrt needs the tensorrt package and a CUDA GPU, and this machine "
            "lacks one; install it with pip install 'recede[tensorrt]' on a machine with an "
            "NVIDIA GPU, or pass --format onnx"
        )


def cmd_export(args: argparse.Namespace) -> int:
    """Fold BN, export a saved model folder to ONNX (or a TensorRT engine) and verify it."""
    import torch

    from pipeline.atomic import check_writable, staged_folder
    from pipeline.checkpoint import load_pruned, model_folder
    from pipeline.export.onnx import export_onnx, verify_onnx
    from pipeline.fold import fold_bn
    from pipeline.run import VerificationError

    folder = model_folder(args.dir)
    model, spec = load_pruned(folder)
    for place in (folder, folder.parent):
        check_writable(place, "DIR")
    if args.format == "tensorrt":
        _check_tensorrt()
    batch = torch.randn(4, *spec["input_shape"], generator=torch.Generator().manual_seed(0))
    folded, fold = fold_bn(model, batch)
    with staged_folder(folder, kind="prune", start="copy") as stage:
        (stage / "model.engine").unlink(missing_ok=True)  # it was built from the old ONNX
        path = export_onnx(folded, batch[:2], stage / "model.onnx", opset=args.opset)
        check = verify_onnx(path, model, batch, atol=args.atol)
        if not check.passed:
            raise VerificationError(
                f"ONNX Runtime differs from PyTorch by {check.max_abs_err:.2e} > --atol "
                f"{args.atol:.0e}; {folder} is left unchanged"
            )
        if args.format == "tensorrt":
            from pipeline.export.tensorrt import build_engine

            build_engine(path, stage / "model.engine", fp16=args.fp16)
    print(
        f"{folder / 'model.onnx'}: opset {check.opset}, folded {len(fold.folded)} BNs, ONNX "
        f"Runtime max abs err {check.max_abs_err:.2e} (rel {check.max_rel_err:.2e}) -> ok"
    )
    return EXIT_OK


def _check_onnx(path: Path) -> None:
    """Refuse an ONNX file that onnx cannot read, before timing anything."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as err:  # noqa: BLE001 - protobuf and onnx raise several unrelated types
        raise UsageError(
            f"{path} is not a valid ONNX model ({type(err).__name__}: {str(err)[:200]}); "
            f"re-create it with `recede export {path.parent}` or delete it"
        ) from None


def _verify_unless_forced(folder: Path, args: argparse.Namespace) -> None:
    """Refuse a recede folder whose files no longer match its index (``pipeline.integrity``)."""
    from pipeline.integrity import verify_folder

    if not args.force:
        verify_folder(folder)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time a saved model folder with PyTorch and ONNX Runtime (p50/p90/p99)."""
    import torch

    from pipeline.bench import latency_table
    from pipeline.checkpoint import load_pruned, model_folder
    from pipeline.fold import fold_bn

    folder = model_folder(args.dir)
    _verify_unless_forced(folder, args)
    model, spec = load_pruned(folder)
    onnx = folder / "model.onnx"
    if onnx.exists():
        _check_onnx(onnx)
    folded, _ = fold_bn(model, torch.randn(2, *spec["input_shape"]))
    rows = latency_table(
        {"pruned": folded},
        {"pruned": onnx} if onnx.exists() else {},
        tuple(spec["input_shape"]),
        batches=args.batches,
        threads=args.threads,
        runs=args.runs,
    )
    for r in rows:
        print(
            f"{r.backend:12s} {r.device:5s} batch {r.batch:3d} threads {r.threads}: "
            f"p50 {r.p50_ms:.3f} ms p90 {r.p90_ms:.3f} ms p99 {r.p99_ms:.3f} ms"
        )
    return EXIT_OK


def _print_graph(args: argparse.Namespace) -> None:
    from pipeline.channel_graph import build_channel_graph

    model, _, example = _load_model(args)
    graph = build_channel_graph(model, example)
    print(
        f"{len(graph.layers)} layers, {len(graph.groups)} channel groups, "
        f"{len(graph.prunable_groups)} prunable"
    )
    reasons: dict[str, int] = {}
    for g in graph.groups:
        if not g.prunable:
            reasons[g.reason] = reasons.get(g.reason, 0) + 1
    for reason, n in sorted(reasons.items()):
        print(f"  {n} groups kept: {reason}")
    for b in graph.barriers:
        print(f"barrier: {b.op} at {b.module} (node {b.node})")


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a model's channel groups and barriers, or a run folder's report."""
    if args.dir:
        folder = Path(args.dir)
        _verify_unless_forced(folder, args)
        for name in ("report.md", "report.json"):
            if (folder / name).is_file():
                print((folder / name).read_text())
                return EXIT_OK
        raise UsageError(
            f"{folder} holds no report.md or report.json; expected a folder from `recede run` "
            "or `recede prune`; for a model's groups pass --from DIR or --model SPEC"
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
    from pipeline.cli_args import build_parser as build

    return build(COMMANDS, __doc__.splitlines()[0])


def _input_errors() -> tuple[type[BaseException], ...]:
    """Bad input (exit 2). Every recede error class for bad input is a ValueError."""
    return (ValueError, FileNotFoundError, ImportError, PermissionError, NotADirectoryError)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or argparse's exit code (2 for a bad flag, 0 for --help)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recede`` console script; returns the exit code."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    quiet = os.environ.get("RANK", "0") != "0"  # torchrun: rank 0 alone logs progress
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from pipeline.fold import FoldError
    from pipeline.run import VerificationError

    try:
        return args.handler(args)
    except (VerificationError, FoldError) as err:
        print(f"recede {args.command}: verification failed: {err}", file=sys.stderr)
        return EXIT_VERIFY
    except _input_errors() as err:
        print(f"recede {args.command}: error: {err}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
