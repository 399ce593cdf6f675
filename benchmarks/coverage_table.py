"""Prune every torchvision classifier with BatchNorm and tabulate the result as markdown.

Runs ``check_model`` from ``tests/test_torchvision_coverage.py`` (the check the test suite
asserts) on each model: half of the prunable channel groups dropped at random, pruned vs masked
output, and ONNX Runtime vs PyTorch on the pruned model. Writes the table to
``docs/torchvision_coverage.md``.

    python benchmarks/coverage_table.py                       # all 58 models (recede installed)
    python benchmarks/coverage_table.py resnet18 googlenet    # a few
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "test_torchvision_coverage.py"


def _load_check():
    """Import the test module by path, so the table comes from the very check pytest runs."""
    spec = importlib.util.spec_from_file_location("torchvision_coverage", CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row(r, fast: bool) -> str:
    kept = 100.0 * r.params_after / r.params_before
    ok = r.prune_rel_err <= 1e-4 and r.onnx_rel_err <= 1e-4
    return (
        f"| {r.model}{'' if fast else ' (slow)'} | {r.input_size} | "
        f"{r.params_before / 1e6:.2f} | {r.params_after / 1e6:.2f} | {kept:.0f}% | "
        f"{r.prunable} / {r.groups} | {r.dropped} | {r.barriers} | "
        f"{r.prune_rel_err:.1e} | {r.onnx_rel_err:.1e} | {r.seconds:.1f} | "
        f"{'pass' if ok else 'FAIL'} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: all with BatchNorm)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "torchvision_coverage.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    check = _load_check()
    names = args.models or list(check.BN_MODELS)
    lines = [
        "| model | input | params before (M) | params after (M) | params kept | prunable / groups "
        "| dropped | barriers | pruned vs masked | ONNX vs PyTorch | time (s) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    failures = 0
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                result = check.check_model(name, Path(tmp), seed=args.seed)
                line = _row(result, name in check.FAST)
                failures += line.endswith("FAIL |")
            except Exception as err:  # report every model, then fail at the end
                line = f"| {name} | | | | | | | | | | | ERROR: {type(err).__name__}: {err} |"
                failures += 1
            print(line, flush=True)
            lines.append(line)
    total = time.perf_counter() - start
    cpu = platform.processor() or platform.machine()
    header = [
        "# torchvision coverage",
        "",
        "Every torchvision classifier that contains `nn.BatchNorm2d` (58 models), untrained, with",
        "random BN scale, shift and running stats. Half of the prunable channel groups are dropped",
        "at random (`select_groups(ratio=0.5)`, `min_channels=1`). *pruned vs masked* and *ONNX vs",
        "PyTorch* are max abs errors divided by max(1, max |output|); both must be <= 1e-4.",
        "ONNX: `pipeline.export.onnx.export_onnx` (opset 17, dynamic batch, onnxslim) on the",
        "pruned model, checked with `verify_onnx` at batch 2 and 3. *time* covers build, graph,",
        "prune, both forwards, export and verification (wall clock; it varies with machine load).",
        "Models marked (slow) run only under `pytest -m slow`; VGG needs 224 px only for ONNX",
        "(the exporter supports adaptive_avg_pool2d only when 7 divides the feature size).",
        "",
        f"Command: `python benchmarks/coverage_table.py` ({len(names)} models, "
        f"{total:.0f} s total; torch {torch.__version__}, {cpu}, "
        f"{torch.get_num_threads()} threads; load average {load_start:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {args.out}; {failures} failing of {len(names)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
