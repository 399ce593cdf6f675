"""The quality grid's command line: every flag typed and range-checked as it is parsed.

A grid trains for minutes to hours, so a value that could only fail later (``--seeds 0``, a
share of MACs kept outside (0, 1), ``--batch-size 0``, ``--threads -1``) is refused by argparse
itself: exit 2, naming the flag, what was expected and what was got. The checks that need the
file system (``--out``, the results file ``--resume`` reads) are :func:`check_out` and
:func:`check_results`; ``benchmarks/quality.py`` runs them before any training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path


class SetupError(Exception):
    """A dependency, data set, output path or results file is unusable; exit 2 before any
    training."""


def _checked(kind: type, ok: Callable[[float], bool], wanted: str) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` when ``ok`` holds for it, else an argparse error
    saying ``wanted``."""

    def parse(text: str):
        try:
            value = kind(text)
            finite = math.isfinite(value)  # an int past float's range overflows
        except (ValueError, OverflowError):
            value, finite = math.nan, False
        if not (finite and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


COUNT = _checked(int, lambda v: v >= 1, "an integer >= 1")
NONNEGATIVE = _checked(int, lambda v: v >= 0, "an integer >= 0")
SHARE = _checked(float, lambda v: 0 < v < 1, "a share of the dense MACs in (0, 1), e.g. 0.3")
STRENGTH = _checked(float, lambda v: v > 0, "a finite strength > 0, e.g. 1e-4")


def build_parser(
    description: str, models: Sequence[str], methods: Sequence[str], variants: Sequence[str]
) -> argparse.ArgumentParser:
    """The parser; ``None`` defaults are resolved by the mode (``--quick`` or the full grid)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="digits, VGG, 1 seed, 30%% MACs kept")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--data", choices=("digits", "fashion_mnist", "cifar10"), help="default fashion_mnist"
    )
    p.add_argument("--image-size", type=COUNT, help="default 28 (16 with --quick)")
    p.add_argument("--batch-size", type=COUNT, help="default 128 (64 with --quick)")
    p.add_argument("--train-limit", type=COUNT, default=None, help="first N training images")
    p.add_argument("--models", nargs="+", choices=sorted(models), help="default vgg resnet20")
    p.add_argument("--methods", nargs="+", choices=tuple(methods))
    p.add_argument("--macs-kept", nargs="+", type=SHARE, help="shares of dense MACs kept (0.3 0.1)")
    p.add_argument("--seeds", type=COUNT, help="seeds 0..N-1 (default 2; 1 with --quick)")
    p.add_argument("--epochs", type=COUNT, help="training epochs (default 3; 6 with --quick)")
    p.add_argument(
        "--finetune-epochs", type=NONNEGATIVE, help="fine-tune epochs after the cut (default 1)"
    )
    p.add_argument(
        "--variant",
        default="default",
        choices=sorted(variants),
        help="the receding configuration the grid uses",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    p.add_argument("--resume", action="store_true", help="skip cells already in --out")
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize each cell to INT8, verify it on the test set and time dense/pruned "
        "fp32/INT8 interleaved (default on; --no-int8 skips it)",
    )
    p.add_argument(
        "--threads", type=COUNT, default=None, help="torch CPU threads (default: torch's)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--starts",
        nargs="+",
        type=STRENGTH,
        help="instead of the grid: the cliff check from these starting strengths",
    )
    mode.add_argument(
        "--ablation",
        nargs="*",
        choices=sorted(variants),
        help="instead of the grid: the receding factors (all when none named)",
    )
    return p


def check_out(out: Path) -> None:
    """``--out`` must name a JSON file (new or existing) in a folder that exists or can be
    made, and that this process may write; nothing is created here.

    Raises:
        SetupError: naming ``--out``, what it is and how to fix it.
    """
    if out.is_dir():
        raise SetupError(
            f"--out {out}: a folder; expected a results file, e.g. {out / 'quality.json'}"
        )
    if out.exists() and not out.is_file():
        raise SetupError(f"--out {out}: not a regular file; expected a results file path")
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise SetupError(
            f"--out {out}: {folder} is not a writable folder, so the results could not be "
            "written; expected a path in a folder you may write to"
        )


_CELL_KEYS = ("model", "method", "kept", "seed")


def _cells_problem(results: object) -> str | None:
    """What makes ``results`` no quality results object, or None."""
    if not isinstance(results, dict):
        return f"expected a JSON object, got {type(results).__name__}"
    for section in ("cells", "ablation", "sweep"):
        cells = results.get(section, [])
        if not isinstance(cells, list):
            return f"expected {section!r} to be a list, got {type(cells).__name__}"
        bad = [
            i
            for i, c in enumerate(cells)
            if not isinstance(c, dict) or any(k not in c for k in _CELL_KEYS)
        ]
        if bad:
            return f"{section}[{bad[0]}] is not a cell with {', '.join(_CELL_KEYS)}"
    if not isinstance(results.get("grids", []), list):
        return "expected 'grids' to be a list"
    return None


def check_results(out: Path, flag: str) -> None:
    """The results file a run will extend (``--resume``, ``--ablation``, ``--starts``) must be
    one this script wrote; a missing file starts empty.

    Raises:
        SetupError: naming ``flag`` and the file.
    """
    if not out.is_file():
        return
    try:
        results = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problem = f"not UTF-8 JSON ({type(err).__name__}: {str(err)[:120]})"
    else:
        problem = _cells_problem(results)
    if problem:
        raise SetupError(
            f"{flag} reads {out}: {problem}; expected the results this script writes; move the "
            "file away to start afresh, or pass another --out"
        )
