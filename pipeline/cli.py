"""The ``recede`` command line: run, train, prune, export, bench, inspect.

Exit codes: 0 ok, 1 verification failed, 2 bad input. Each handler's docstring is its help.
Only this module configures logging or prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger("recede")

EXIT_OK, EXIT_VERIFY, EXIT_INPUT = 0, 1, 2


def _config(args: argparse.Namespace):
    from pipeline.config import load_config

    return load_config(args.config, args.set or ())


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"--input-shape expects N,C,H,W such as 1,3,224,224, got {text!r}"
        )
    return shape


def cmd_run(args: argparse.Namespace) -> int:
    """Train with the polarising penalty, prune, fine-tune, fold, export, verify and time."""
    from pipeline.run import run_pipeline

    cfg = _config(args)
    report = run_pipeline(cfg, args.out)
    print(Path(args.out, "report.md").read_text())
    print(f"wrote {args.out} in {report['seconds']} s")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    """Train only (with the configured penalty) and save the model as state dict + manifest."""
    from pipeline.atomic import write_text_atomic
    from pipeline.checkpoint import save_pruned
    from pipeline.config import dump_config
    from pipeline.data import load_data
    from pipeline.run import build_and_train, model_spec
    from pipeline.train import seed_everything

    cfg = _config(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out, "config.yaml"), dump_config(cfg))
    seed_everything(cfg.train.seed)
    data = load_data(cfg.data, seed=cfg.train.seed)
    model, logs = build_and_train(cfg, data, Path(args.out) / "checkpoints")
    save_pruned(model, Path(args.out) / "model", spec=model_spec(cfg, data))
    print(
        f"trained {len(logs)} epochs, accuracy {logs[-1].accuracy if logs else float('nan'):.4f}; "
        f"model in {Path(args.out) / 'model'}"
    )
    return EXIT_OK


def _load_for_prune(args: argparse.Namespace):
    """(model, spec, example) from --from DIR or --model SPEC --input-shape."""
    import torch

    from pipeline.checkpoint import load_pruned
    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    if args.source:
        model, spec = load_pruned(args.source)
        shape = (1, *spec["input_shape"])
    else:
        if not args.model or not args.input_shape:
            raise ValueError(
                "recede prune needs --from DIR (a trained model) or --model SPEC with --input-shape N,C,H,W"
            )
        shape = args.input_shape
        mcfg = ModelConfig(name=args.model)
        model = build_model(mcfg, num_classes=args.num_classes, in_channels=shape[1]).eval()
        spec = {
            "model": {"name": args.model, "width": mcfg.width, "depth": mcfg.depth},
            "num_classes": args.num_classes,
            "in_channels": shape[1],
            "bounded_bn": False,
            "input_shape": list(shape[1:]),
        }
    return model.eval(), spec, torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a model (a torchvision/factory spec, or a trained model folder) and save it."""
    from pipeline.atomic import write_json_atomic, write_text_atomic
    from pipeline.bench import count_macs, count_params
    from pipeline.checkpoint import save_pruned
    from pipeline.config import PruneConfig
    from pipeline.run import prune_model

    model, spec, example = _load_for_prune(args)
    threshold = "ratio" if args.threshold is None else args.threshold
    cfg = PruneConfig(
        threshold=threshold if threshold in ("auto", "ratio") else float(threshold),
        ratio=args.ratio,
        min_channels=args.min_channels,
        round_to=args.round_to,
    )
    result = prune_model(model, example, cfg)
    out = Path(args.out)
    save_pruned(result.model, out, spec=spec)
    shape = tuple(example.shape[1:])
    report = {
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
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "plan.json", result.plan.to_json())
    print(json.dumps({k: report[k] for k in ("params", "macs", "groups")}, indent=1))
    for b in result.graph.barriers:
        print(f"barrier: {b.op} at {b.module} (node {b.node})")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Fold BN, export a saved model folder to ONNX (or a TensorRT engine) and verify it."""
    import torch

    from pipeline.checkpoint import load_pruned
    from pipeline.export.onnx import export_onnx, verify_onnx
    from pipeline.fold import fold_bn

    model, spec = load_pruned(args.dir)
    batch = torch.randn(4, *spec["input_shape"], generator=torch.Generator().manual_seed(0))
    folded, fold = fold_bn(model, batch)
    path = export_onnx(folded, batch[:2], Path(args.dir) / "model.onnx", opset=args.opset)
    check = verify_onnx(path, model, batch, atol=args.atol)
    print(
        f"{path}: opset {check.opset}, folded {len(fold.folded)} BNs, ONNX Runtime max abs err "
        f"{check.max_abs_err:.2e} (rel {check.max_rel_err:.2e}) -> {'ok' if check.passed else 'FAILED'}"
    )
    if args.format == "tensorrt":
        from pipeline.export.tensorrt import build_engine

        print(f"engine: {build_engine(path, Path(args.dir) / 'model.engine', fp16=args.fp16)}")
    return EXIT_OK if check.passed else EXIT_VERIFY


def cmd_bench(args: argparse.Namespace) -> int:
    """Time a saved model folder with PyTorch and ONNX Runtime (p50/p90/p99)."""
    from pipeline.bench import latency_table
    from pipeline.checkpoint import load_pruned
    from pipeline.fold import fold_bn

    model, spec = load_pruned(args.dir)
    import torch

    folded, _ = fold_bn(model, torch.randn(2, *spec["input_shape"]))
    onnx = Path(args.dir) / "model.onnx"
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
            f"{r.backend:12s} {r.device:5s} batch {r.batch:3d} threads {r.threads}: p50 {r.p50_ms:.3f} ms "
            f"p90 {r.p90_ms:.3f} ms p99 {r.p99_ms:.3f} ms"
        )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a model's channel groups and barriers, or a run folder's report."""
    if args.dir:
        print(
            Path(args.dir, "report.md").read_text()
            if Path(args.dir, "report.md").exists()
            else Path(args.dir, "report.json").read_text()
        )
        return EXIT_OK
    from pipeline.channel_graph import build_channel_graph

    model, _, example = _load_for_prune(args)
    graph = build_channel_graph(model, example)
    print(
        f"{len(graph.layers)} layers, {len(graph.groups)} channel groups, {len(graph.prunable_groups)} prunable"
    )
    reasons: dict[str, int] = {}
    for g in graph.groups:
        if not g.prunable:
            reasons[g.reason] = reasons.get(g.reason, 0) + 1
    for reason, n in sorted(reasons.items()):
        print(f"  {n} groups kept: {reason}")
    for b in graph.barriers:
        print(f"barrier: {b.op} at {b.module} (node {b.node})")
    return EXIT_OK


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. prune.ratio=0.6",
    )


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from", dest="source", metavar="DIR", help="a saved model folder (from `recede train`)"
    )
    p.add_argument(
        "--model", help="torchvision:<name>, vgg, resnet20/56, or package.module:factory"
    )
    p.add_argument(
        "--input-shape", type=_input_shape, help="example input N,C,H,W, e.g. 1,3,224,224"
    )
    p.add_argument(
        "--num-classes", type=int, default=1000, help="classes for a freshly built model"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recede", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": cmd_run,
        "train": cmd_train,
        "prune": cmd_prune,
        "export": cmd_export,
        "bench": cmd_bench,
        "inspect": cmd_inspect,
    }
    parsers = {
        name: sub.add_parser(name, help=fn.__doc__, description=fn.__doc__)
        for name, fn in commands.items()
    }
    for name, p in parsers.items():
        p.set_defaults(handler=commands[name])
    for name in ("run", "train"):
        _add_config(parsers[name])
        parsers[name].add_argument("--out", default=f"runs/{name}", help="output folder")
    p = parsers["prune"]
    _add_model_source(p)
    p.add_argument(
        "--ratio", type=float, default=0.5, help="fraction of prunable channel groups to drop"
    )
    p.add_argument("--threshold", help="'auto' (valley of the importance distribution) or a number")
    p.add_argument("--min-channels", type=int, default=4)
    p.add_argument(
        "--round-to", type=int, default=1, help="round kept widths to a multiple (e.g. 8)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p = parsers["export"]
    p.add_argument("dir", help="a folder written by `recede prune` or `recede train`")
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--atol", type=float, default=1e-4, help="max abs error allowed vs PyTorch")
    p.add_argument("--fp16", action="store_true", help="TensorRT FP16 engine")
    p = parsers["bench"]
    p.add_argument("dir")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=50)
    p = parsers["inspect"]
    _add_model_source(p)
    p.add_argument("dir", nargs="?", help="a run folder to summarise instead of a model")
    return parser


def _input_errors() -> tuple[type[BaseException], ...]:
    from pipeline.channel_graph import GraphError
    from pipeline.config import ConfigError
    from pipeline.data import DataError
    from pipeline.models import ModelError
    from pipeline.prune import PruneError
    from pipeline.threshold import NotBimodalError

    return (
        ConfigError,
        DataError,
        ModelError,
        GraphError,
        PruneError,
        NotBimodalError,
        FileNotFoundError,
        ValueError,
        ImportError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recede`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
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
