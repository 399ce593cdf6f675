"""The ``recede`` argument parser: subcommands, their flags, and flag types that validate.

Every flag with a range is checked here, so a bad value exits 2 naming the flag, what was
expected and what was got, before anything is loaded.
"""

from __future__ import annotations

import argparse
import inspect
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
    p.add_argument(
        "-c",
        "--config",
        metavar="YAML",
        help="optional YAML config, e.g. configs/demo.yaml (default: none, the built-in "
        "defaults: digits, VGG-11, receding penalty)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one config key, applied after -c; repeatable, e.g. --set "
        "train.epochs=2 --set prune.ratio=0.6 (default: none)",
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


def _add_model_source(p: argparse.ArgumentParser, what: str) -> None:
    """The input: positional DIR (or its alias ``--from DIR``), or ``--model`` with a shape."""
    p.add_argument("source", nargs="?", metavar="DIR", help=f"{what} (default: none; or --model)")
    p.add_argument(
        "--from",
        dest="from_dir",
        metavar="DIR",
        help="the same as DIR, kept as an alias (default: none)",
    )
    p.add_argument(
        "--model",
        metavar="SPEC",
        help="build a fresh, untrained model instead of DIR: torchvision:<name>, timm:<name>, "
        "vgg, resnet20, resnet56, or package.module:factory (default: none)",
    )
    p.add_argument(
        "--input-shape",
        type=_input_shape,
        metavar="N,C,H,W",
        help="example input for --model, e.g. 1,3,224,224 (default: none; needed with --model)",
    )
    p.add_argument(
        "--num-classes",
        type=_number(int, 1),
        default=None,
        help="classes of the model --model builds (default: torchvision's own for the family: "
        "21 for its segmenters, 91 for its detectors, 1000 otherwise)",
    )


def resolve_input_folder(args: argparse.Namespace) -> None:
    """Fold ``--from DIR`` into the positional DIR (``args.source``); both at once must agree."""
    alias = getattr(args, "from_dir", None)
    if alias is None:
        return
    if args.source is not None and args.source != alias:
        raise UsageError(
            f"got the input folder twice, as DIR {args.source} and as --from {alias}; "
            "expected one: pass DIR alone (--from is an alias of it)"
        )
    args.source = alias


def _add_prune(p: argparse.ArgumentParser) -> None:
    _add_model_source(p, "a saved model folder, or a `recede train`/`recede run` folder")
    p.add_argument(
        "--ratio",
        type=_number(float, 0.0, 1.0, open_="high"),
        default=0.5,
        help="fraction of prunable channel groups to drop; a global cut inside tied "
        "importances (an untrained model) is refused: use --scope layer",
    )
    p.add_argument(
        "--threshold",
        type=_threshold,
        default="ratio",
        help="'ratio' (use --ratio), 'auto' (valley of the importances) or a number",
    )
    p.add_argument(
        "--scope",
        choices=("global", "layer"),
        default="global",
        help="with --ratio: rank all groups together (global) or drop the ratio from every "
        "layer alike (layer, like Torch-Pruning's default; for untrained models)",
    )
    p.add_argument(
        "--min-channels",
        type=_number(int, 1),
        default=4,
        help="every layer keeps at least this many output channels",
    )
    p.add_argument(
        "--round-to",
        type=_number(int, 1),
        default=8,
        help="round kept widths of layers at least 2 multiples wide up to a multiple: 8 keeps "
        "ONNX Runtime's CPU convolutions on their fast layout (1: no rounding)",
    )
    p.add_argument(
        "--no-exact-borders",
        dest="exact_borders",
        action="store_false",
        help="prune.exact_borders=false: absorb a removed channel's constant as it is at the "
        "example's size and report the error it leaves at borders and other sizes",
    )
    p.add_argument(
        "--allow-approximate",
        action="store_true",
        help="also remove groups whose constant a gate reads and whose shift is not zero, by "
        "zeroing the shift (the error is in report.json); without it they are kept",
    )
    p.add_argument("--out", required=True, help="output folder (required)")
    _add_force(p)
    p.add_argument(
        "--accept-insensitive",
        action="store_true",
        help="write the pruned model even when the removal check could not have seen a wrong "
        "model; report.json records it. Default: exit code 1 (a failed check always exits 1)",
    )
    _add_latency_target(p)


def _add_latency_target(p: argparse.ArgumentParser) -> None:
    """``recede prune --target-ms`` and the deployment it is measured on (``train.latency``)."""
    g = p.add_argument_group(
        "latency budget", "cut to a latency measured on a backend instead of --ratio/--threshold"
    )
    g.add_argument(
        "--target-ms",
        type=_number(float, 0.0, open_="low"),
        help="cut to this latency in ms, predicted by a latency model measured on the backend "
        "(cached per machine) and checked by timing the cut model; replaces --ratio, "
        "--threshold and --scope (default: none, cut by --ratio/--threshold)",
    )
    g.add_argument(
        "--backend", choices=("onnxruntime", "tensorrt"),
        help="with --target-ms: the backend timed (default: onnxruntime)",
    )  # fmt: skip
    g.add_argument(
        "--device", choices=("cpu", "cuda"), help="with --target-ms: the device (default: cpu)"
    )
    g.add_argument(
        "--precision", choices=("fp32", "int8"),
        help="with --target-ms: the precision (default: fp32; int8 is refused: timed in fp32 only)",
    )  # fmt: skip
    g.add_argument(
        "--batch", type=_number(int, 1), help="with --target-ms: the batch size (default: 1)"
    )
    g.add_argument(
        "--threads", type=_number(int, 1, 256),
        help="with --target-ms: ONNX Runtime intra-op threads (default: 1)",
    )  # fmt: skip
    g.add_argument(
        "--clock", choices=("wall", "cpu"),
        help="with --target-ms: how runs are timed, as `recede bench --clock` (default: cpu, "
        "one thread only; wall otherwise)",
    )  # fmt: skip


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dir",
        metavar="DIR",
        help="a folder written by `recede prune`, `recede train` or `recede run`",
    )
    p.add_argument(
        "--format",
        choices=("onnx", "onnx-fp16", "onnx-int8", "tensorrt", "all"),
        default="onnx",
        help="onnx-int8: a calibrated, verified INT8 (QDQ) graph; all: ONNX, FP16 ONNX, INT8 ONNX "
        "where there is calibration data and, where TensorRT and a GPU exist, an engine",
    )
    p.add_argument(
        "--out", help="release folder for the artefacts and manifest.json (default: DIR itself)"
    )
    _add_force(p)
    p.add_argument(
        "--opset", type=int, default=17, help="ONNX opset, from 17 to the exporter's highest (20)"
    )
    p.add_argument(
        "--atol",
        type=_number(float, 0.0, open_="low"),
        default=None,
        help="absolute floor of the fp32 tolerance, which is 1e-4 of the output scale plus it "
        "(default: none, the tolerance policy's own floor)",
    )
    p.add_argument("--no-slim", action="store_true", help="do not try onnxslim (default: try it)")
    p.add_argument("--fp16", action="store_true", help="TensorRT FP16 kernels")
    p.add_argument(
        "--int8",
        action="store_true",
        help="a TensorRT INT8 engine, built from the INT8 ONNX graph (explicit quantization)",
    )
    p.add_argument(
        "--max-batch",
        type=_number(int, 2, 4096),
        default=32,
        help="largest batch the TensorRT engine and the ONNX verification accept",
    )
    p.add_argument(
        "--opt-batch",
        type=_number(int, 1, 4096),
        default=1,
        help="batch TensorRT tunes its kernels for",
    )
    _add_export_int8(p)
    p.add_argument(
        "--require",
        choices=("tensorrt",),
        action="append",
        default=[],
        help="make a missing artefact fatal: `--format all --require tensorrt` exits 2 where "
        "no TensorRT engine can be built, instead of warning and skipping it",
    )
    p.add_argument(
        "--allow-slower",
        action="store_true",
        help="export a run's pruned model even when the run's latency table shows it slower "
        "than the dense one beyond noise (default: exit 1, nothing written)",
    )
    p.add_argument(
        "--accept-insensitive",
        action="store_true",
        help="write the release even when a check could not have seen a wrong model (its "
        "outputs barely depend on the input); the verdict `insensitive` stays in the manifest. "
        "Default: such an export fails with exit code 1",
    )


def _add_export_int8(p: argparse.ArgumentParser) -> None:
    """``recede export``'s INT8 flags (``--format onnx-int8``, and the engine's QDQ graph)."""
    p.add_argument(
        "--calibration",
        metavar="PATH",
        help="INT8 calibration data for a folder that carries none: a .npy array of model "
        "inputs [N, C, H, W] or a folder of images (default: the run's training split)",
    )
    p.add_argument(
        "--calibration-samples",
        type=_number(int, 1, 1_000_000),
        default=None,
        help="samples that calibrate INT8 (default: export.int8.calibration_samples, 512)",
    )
    p.add_argument(
        "--int8-method",
        choices=("minmax", "entropy", "percentile"),
        default=None,
        help="INT8 calibration method (default: export.int8.method, minmax)",
    )
    p.add_argument(
        "--int8-max-drop",
        type=_number(float, 0.0, 100.0),
        default=None,
        metavar="POINTS",
        help="largest INT8 accuracy drop, in points, on held-out samples (default: 0.5)",
    )


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
    p.add_argument(
        "--batches",
        type=_number(int, 1),
        nargs="+",
        default=[1, 32],
        help="batch sizes to sweep, e.g. 1 8 32 128",
    )
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
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="how CPU rows are timed: wall (elapsed, what a user waits) or cpu (the thread's CPU "
        "time, what a run costs; a speed-up that survives a loaded machine; needs --threads 1)",
    )
    p.add_argument("--fp16", action="store_true", help="also time fp16 on CUDA")
    p.add_argument(
        "--copies",
        action="store_true",
        help="CUDA rows include host-to-device and back copies (default: device-resident input)",
    )
    p.add_argument(
        "--json", metavar="PATH", help="write the rows and environment as JSON (default: none)"
    )
    p.add_argument(
        "--markdown", metavar="PATH", help="write the tables as Markdown (default: none)"
    )
    p.add_argument(
        "--plot", metavar="PATH", help="write a latency plot (PNG; needs matplotlib; default: none)"
    )

    p.add_argument(
        "--reference",
        metavar="MODEL",
        help="the dense model speed-ups are against (default: the one a prune, export or run "
        "folder records)",
    )
    _add_bench_gate(p)


def _add_bench_gate(p: argparse.ArgumentParser) -> None:
    """``recede bench``'s release-gate flags: ``--compare`` a baseline, or save one."""
    p.add_argument(
        "--compare",
        metavar="BASELINE.json",
        help="exit 1 when a row is slower than --max-slowdown x this baseline beyond the "
        "measured noise, twice (default: no gate)",
    )
    p.add_argument(
        "--max-slowdown",
        type=_number(float, 1.0, open_="low"),
        default=None,  # latency_gate.DEFAULT_MAX_SLOWDOWN, 1.2
        help="with --compare: the allowed p50 slowdown factor (default 1.2)",
    )
    p.add_argument(
        "--allow-other-machine",
        action="store_true",
        help="with --compare: compare with a baseline measured on another machine (CPU, cores, "
        "OS, GPU) and say what differs (default: exit 2)",
    )
    p.add_argument(
        "--allow-other-model",
        action="store_true",
        help="with --compare: compare rows whose model differs from the baseline's (sha256 of "
        "the weights or ONNX, input shape), e.g. a retrained release, and say which (default: "
        "exit 2)",
    )
    p.add_argument(
        "--save-baseline",
        metavar="PATH",
        help="write this measurement as a --compare baseline (default: none written)",
    )


EXIT_CODES = """exit codes:
  0    ok
  1    verification failed: a fold, removal or export check disagrees with PyTorch beyond
       tolerance or could not have seen a wrong model (insensitive); bench --compare: a
       latency regression beyond the noise
  2    bad input: a flag, config key, file or folder; the message names it, what was expected,
       what was got and how to fix it, and nothing is left at the output path
  130  interrupted (Ctrl-C): the output path is unchanged (an unfinished training run keeps
       its .partial folder for --resume)"""

SET_HELP = """config (run, train):
  -c YAML is optional: without it the built-in defaults are used (see configs/ and the
  README's configuration table). --set KEY=VALUE overrides one key and is repeatable; values
  are parsed as YAML and applied in order after the file, e.g.
    recede run -c configs/demo.yaml --set train.epochs=2 --set prune.threshold=ratio"""


def help_text(action: argparse.Action) -> str:
    """A flag's help as ``--help`` shows it: its text, then its default unless the text names it.

    Switches (default False) show "(default: off)"; a list default is shown as typed (``1 32``).
    A default of None is not appended: such a flag's text says in words what happens without
    it, and ``tests/cli/test_cli_help.py`` checks that it does.
    """
    text = action.help or ""
    if action.default is argparse.SUPPRESS or action.default is None or "default" in text:
        return text
    if action.default is False:
        return f"{text} (default: off)"
    shown = action.default
    if isinstance(shown, (list, tuple)):
        shown = " ".join(str(v) for v in shown)
    return f"{text} (default: {shown})".replace("%", "%%")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs and descriptions keep their line breaks; each flag's help ends with its default
    (``help_text``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return help_text(action)


def version() -> str:
    """The installed package's version (its metadata), or ``pipeline.__version__`` from a
    source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("recede")
    except PackageNotFoundError:
        from pipeline import __version__

        return __version__


def _epilog(name: str | None) -> str:
    return f"{EXIT_CODES}\n\n{SET_HELP}" if name in (None, "run", "train") else EXIT_CODES


def _add_verbosity(p: argparse.ArgumentParser, *, default: object) -> None:
    """-v and -q, on the top-level parser (default False) and on every subcommand (default
    SUPPRESS, so a flag given before the subcommand is not reset by its parser)."""
    off = " (default: off)" if default is argparse.SUPPRESS else ""  # help_text adds it for False
    p.add_argument(
        "-v", "--verbose", action="store_true", default=default, help=f"debug logging{off}"
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help=f"no progress bars (log lines stay; also RECEDE_QUIET=1){off}",
    )


def build_parser(
    commands: dict[str, Callable[[argparse.Namespace], int]], description: str
) -> argparse.ArgumentParser:
    """Subcommands named by ``commands``; each handler's docstring is its help."""
    parser = argparse.ArgumentParser(
        prog="recede", description=description, epilog=_epilog(None), formatter_class=HelpFormatter
    )
    _add_verbosity(parser, default=False)
    parser.add_argument(
        "--version", action="version", version=f"recede {version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {
        name: sub.add_parser(
            name,
            help=inspect.cleandoc(fn.__doc__).split("\n\n")[0],
            description=inspect.cleandoc(fn.__doc__),
            epilog=_epilog(name),
            formatter_class=HelpFormatter,
        )
        for name, fn in commands.items()
    }
    for name, p in parsers.items():
        p.set_defaults(handler=commands[name])
        _add_verbosity(p, default=argparse.SUPPRESS)  # after the command too: run -q ...
    _add_config(parsers["run"], "run")
    parsers["run"].add_argument(
        "--allow-slower",
        action="store_true",
        help="write the run and exit 0 even when its latency table shows the pruned model slower "
        "than the dense one beyond noise (export.allow_slower: true); such rows stay flagged",
    )
    _add_config(parsers["train"], "train")
    _add_prune(parsers["prune"])
    _add_export(parsers["export"])
    _add_bench(parsers["bench"])
    _add_model_source(
        parsers["inspect"],
        "a `recede run` folder (its report) or a saved model, train or prune folder",
    )
    for name in ("inspect", "bench"):
        parsers[name].add_argument(
            "--force", action="store_true", help="use DIR even if its files changed since"
        )
    parsers["inspect"].add_argument(
        "--latency-table",
        action="store_true",
        help="print the latency model a latency budget used (DIR/latency_model.json): "
        "deployment, calibration, held-out error and every layer's table",
    )
    return parser
