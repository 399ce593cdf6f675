"""The ``recede`` argument parser: subcommands, their flags, and flag types that validate.

Every flag with a range is checked here, so a bad value exits 2 naming the flag, what was
expected and what was got, before anything is loaded.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

EXIT_OK, EXIT_VERIFY, EXIT_INPUT = 0, 1, 2


class UsageError(ValueError):
    """A command-line input is wrong; the message names the flag or file (exit 2)."""


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected N,C,H,W of positive integers such as 1,3,224,224, got {text!r}"
        )
    return shape


def _number(kind: type, low: float, high: float = math.inf, *, open_: str = ""):
    """An argparse type: a finite ``kind`` in [low, high]; ``open_`` holds "low"/"high" ends."""
    lo, hi = ("(" if "low" in open_ else "["), (")" if "high" in open_ else "]")
    wanted = f"{'an integer' if kind is int else 'a number'} in {lo}{low}, {high}{hi}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        inside = math.isfinite(value) and low <= value <= high
        if not inside or (value == low and lo == "(") or (value == high and hi == ")"):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def _threshold(text: str) -> str | float:
    if text in ("auto", "ratio"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', 'ratio' or a BN importance > 0 such as 0.05, got {text!r}"
        )
    return value


def _add_config(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("-c", "--config", help="YAML config (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. prune.ratio=0.6",
    )
    p.add_argument("--out", default=f"runs/{name}", help="output folder")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue training from the last checkpoint of an unfinished (or finished) run",
    )
    _add_force(p)


def _add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty --out that another command (or no recede command) wrote",
    )


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="source",
        metavar="DIR",
        help="a saved model folder, or a `recede train`/`recede run` folder",
    )
    p.add_argument(
        "--model",
        help="torchvision:<name>, timm:<name>, vgg, resnet20/56, or package.module:factory",
    )
    p.add_argument(
        "--input-shape", type=_input_shape, help="example input N,C,H,W, e.g. 1,3,224,224"
    )
    p.add_argument(
        "--num-classes",
        type=_number(int, 1),
        default=1000,
        help="classes for a freshly built model",
    )


def _add_prune(p: argparse.ArgumentParser) -> None:
    _add_model_source(p)
    p.add_argument(
        "--ratio",
        type=_number(float, 0.0, 1.0, open_="high"),
        default=0.5,
        help="fraction of prunable channel groups to drop",
    )
    p.add_argument(
        "--threshold",
        type=_threshold,
        default="ratio",
        help="'ratio' (default: use --ratio), 'auto' (valley of the importances) or a number",
    )
    p.add_argument(
        "--scope",
        choices=("global", "layer"),
        default="global",
        help="with --ratio: rank all groups together (global, default) or drop the ratio from "
        "every layer alike (layer, like Torch-Pruning's default)",
    )
    p.add_argument("--min-channels", type=_number(int, 1), default=4)
    p.add_argument(
        "--round-to",
        type=_number(int, 1),
        default=1,
        help="round kept widths to a multiple (e.g. 8)",
    )
    p.add_argument("--out", required=True, help="output folder")
    _add_force(p)


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a folder written by `recede prune` or `recede train`")
    p.add_argument(
        "--format",
        choices=("onnx", "onnx-fp16", "tensorrt", "all"),
        default="onnx",
        help="all: ONNX, FP16 ONNX and, where TensorRT and a GPU exist, an engine",
    )
    p.add_argument(
        "--out", help="release folder with the artefacts and manifest.json (default: DIR itself)"
    )
    _add_force(p)
    p.add_argument(
        "--opset", type=int, default=17, help="ONNX opset, 17 to the exporter's highest (20)"
    )
    p.add_argument(
        "--atol",
        type=_number(float, 0.0, open_="low"),
        default=None,
        help="absolute floor of the fp32 tolerance, which is 1e-4 of the output scale plus it",
    )
    p.add_argument("--no-slim", action="store_true", help="do not try onnxslim")
    p.add_argument("--fp16", action="store_true", help="TensorRT FP16 kernels")
    p.add_argument(
        "--int8",
        action="store_true",
        help="TensorRT INT8 kernels, calibrated on the training data named by the run's config.yaml",
    )
    p.add_argument("--max-batch", type=_number(int, 2, 4096), default=32)
    p.add_argument("--opt-batch", type=_number(int, 1, 4096), default=1)
    p.add_argument("--calib-batches", type=_number(int, 1, 10000), default=16)


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="a run, prune or train folder, a folder with model.pt, or an .onnx file",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=("torch", "onnxruntime", "tensorrt"),  # bench.BACKENDS
        default=["torch", "onnxruntime", "tensorrt"],
        help="backends to time where available (default: all)",
    )
    p.add_argument(
        "--devices",
        nargs="+",
        choices=("cpu", "cuda"),
        default=None,
        help="devices to time on (default: cpu, and cuda when a GPU is present)",
    )
    p.add_argument("--batches", type=_number(int, 1), nargs="+", default=[1, 32])
    p.add_argument(
        "--threads",
        type=_number(int, 1, 256),  # config.MAX_THREADS
        default=2,
        help="torch threads and ORT intra-op",
    )
    p.add_argument(
        "--runs",
        type=_number(int, 5),  # timing.QUICK_MIN_RUNS
        default=50,
        help="timed runs per row, in blocks interleaved across models; below 50 the rows are "
        "marked quick (a quick look, not figures to report)",
    )
    p.add_argument("--warmup", type=_number(int, 0), default=10, help="untimed runs per row")
    p.add_argument("--fp16", action="store_true", help="also time fp16 on CUDA")
    p.add_argument(
        "--copies",
        action="store_true",
        help="CUDA rows include host-to-device and back copies (default: device-resident input)",
    )
    p.add_argument("--json", metavar="PATH", help="write the rows and environment as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    p.add_argument("--plot", metavar="PATH", help="write a latency plot (PNG; needs matplotlib)")
    p.add_argument(
        "--reference",
        metavar="MODEL",
        help="the dense model speed-ups are against (default: the one a prune, export or run "
        "folder records)",
    )
    p.add_argument(
        "--compare",
        metavar="BASELINE.json",
        help="exit 1 when a row is slower than --max-slowdown x this baseline beyond the "
        "measured noise, twice",
    )
    p.add_argument(
        "--max-slowdown",
        type=_number(float, 1.0, open_="low"),
        default=1.2,  # latency_gate.DEFAULT_MAX_SLOWDOWN
        help="with --compare: the allowed p50 slowdown factor (default 1.2)",
    )
    p.add_argument(
        "--save-baseline", metavar="PATH", help="write this measurement as a --compare baseline"
    )


def build_parser(
    commands: dict[str, Callable[[argparse.Namespace], int]], description: str
) -> argparse.ArgumentParser:
    """Subcommands named by ``commands``; each handler's docstring is its help."""
    parser = argparse.ArgumentParser(prog="recede", description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {
        name: sub.add_parser(name, help=fn.__doc__, description=fn.__doc__)
        for name, fn in commands.items()
    }
    for name, p in parsers.items():
        p.set_defaults(handler=commands[name])
    _add_config(parsers["run"], "run")
    _add_config(parsers["train"], "train")
    _add_prune(parsers["prune"])
    _add_export(parsers["export"])
    _add_bench(parsers["bench"])
    _add_model_source(parsers["inspect"])
    parsers["inspect"].add_argument(
        "dir", nargs="?", help="a run folder to summarise instead of a model"
    )
    for name in ("inspect", "bench"):
        parsers[name].add_argument(
            "--force", action="store_true", help="use DIR even if its files changed since"
        )
    return parser
