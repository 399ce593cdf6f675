"""The ``recede`` argument parser: subcommands, their flags, and flag types that validate.

Every flag with a range is checked here, so a bad value exits 2 naming the flag, what was
expected and what was got, before anything is loaded.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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
        "--model", help="torchvision:<name>, timm:<name>, vgg, resnet20/56, or package.module:factory"
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
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    p.add_argument("--opset", type=_number(int, 17, 30), default=17)
    p.add_argument(
        "--atol",
        type=_number(float, 0.0, open_="low"),
        default=1e-4,
        help="max abs error allowed vs PyTorch",
    )
    p.add_argument("--fp16", action="store_true", help="TensorRT FP16 engine")


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir")
    p.add_argument("--batches", type=_number(int, 1), nargs="+", default=[1, 32])
    p.add_argument("--threads", type=_number(int, 1), default=2)
    p.add_argument("--runs", type=_number(int, 50), default=50)  # bench.MIN_RUNS


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
    return parser
