"""Prune every torchvision classifier with BatchNorm and tabulate the result as markdown.

Runs ``check_model`` from ``tests/prune/test_torchvision_coverage.py`` (the check the test suite
asserts) on each model: half of the prunable channel groups dropped at random, pruned vs masked
output (float64), ONNX Runtime vs PyTorch on the pruned model (float32), and how far a 1% change
of one channel in each third of the network moves the output; then the untrained model through
the command line (``recede prune --scope layer``, ``recede export``: exit codes and verdicts,
``tests/prune/cli_coverage.py``). Writes the table to ``docs/torchvision_coverage.md``.

    python benchmarks/coverage_table.py                       # all 58 models (recede installed)
    python benchmarks/coverage_table.py --fast                # the default test subset (12)
    python benchmarks/coverage_table.py resnet18 googlenet    # a few
    python benchmarks/coverage_table.py --timm                # timm's BN CNN families, beside
                                                              # Torch-Pruning (timm_coverage.py)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from _checks import load_check  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "prune" / "test_torchvision_coverage.py"


def _load_check():
    sys.path.insert(0, str(ROOT / "tests"))  # the check imports tests/sensitivity.py
    return load_check(CHECK, "torchvision_coverage")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _row(r, fast: bool, cli) -> str:
    kept = 100.0 * r.params_after / r.params_before
    first, middle, last = r.sensitivity
    lost = r.loss_sensitivity
    failures = [*r.failures(), *([] if cli.ok() else ["CLI"])]
    return (
        f"| {r.model}{'' if fast else ' (slow)'} | {r.input_size} | "
        f"{r.params_before / 1e6:.2f} | {r.params_after / 1e6:.2f} | {kept:.0f}% | "
        f"{r.prunable} / {r.groups} | {r.dropped} | {r.barriers} | "
        f"{r.prune_rel_err:.1e} | {r.onnx_rel_err:.1e} | {r.onnx_tolerance():.0e} | "
        f"{first:.1e} / {middle:.1e} / {last:.1e} | {lost[0]:.0e} / {lost[1]:.0e} | "
        f"{r.seconds:.1f} | {cli.cell()} | {'; '.join(failures) or 'pass'} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: all with BatchNorm)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "torchvision_coverage.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="only the default test subset")
    parser.add_argument("--timm", action="store_true", help="timm families beside Torch-Pruning")
    parser.add_argument("--resume", action="store_true", help="--timm: run only models not listed")
    parser.add_argument(
        "--reuse-baseline",
        action="store_true",
        help="--timm: keep the Torch-Pruning cells of models already in the table (its side does "
        "not depend on recede's code) and rerun only recede's",
    )
    args = parser.parse_args()
    if args.timm:
        from timm_coverage import timm_main

        return timm_main(
            args.models, fast=args.fast, resume=args.resume, reuse_baseline=args.reuse_baseline
        )
    check = _load_check()
    names = args.models or [n for n in check.BN_MODELS if not args.fast or n in check.FAST]
    lines = [
        "| model | input | params before (M) | params after (M) | params kept | prunable / groups "
        "| dropped | barriers | pruned vs masked | ONNX vs PyTorch | ONNX bound | 1% channel: first "
        "/ middle / last third | lost channel: first / middle | time (s) | CLI untrained: prune "
        "/ export | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    failures = 0
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            size = check.INPUT_SIZE.get(name, check.DEFAULT_SIZE)
            cli = check.cli_untrained(f"torchvision:{name}", size, Path(tmp))
            try:
                result = check.check_model(name, Path(tmp), seed=args.seed)
                line = _row(result, name in check.FAST, cli)
                failures += bool(result.failures()) or not cli.ok()
            except Exception as err:  # report every model, then fail at the end
                line = f"| {name} |{' |' * 13} {cli.cell()} | ERROR: {type(err).__name__}: {err} |"
                failures += 1
            print(line, flush=True)
            lines.append(line)
    total = time.perf_counter() - start
    cli_ok = sum(check.CliResult.cell_ok(_cells(line)[-2]) for line in lines[2:])
    cpu = platform.processor() or platform.machine()
    header = [
        "# torchvision coverage",
        "",
        "Every torchvision classifier that contains `nn.BatchNorm2d` (58 models), untrained, with",
        "random BN scale and shift and BN statistics calibrated on random data (made-up statistics",
        "left the mobile nets blind to their input: halving stem filters moved their output by",
        "3e-8 to 5e-6, so the old 1e-4 check could not fail). Half of the prunable channel groups",
        "are dropped at random (`select_groups(ratio=0.5)`, `min_channels=1`), the masked model is",
        "recalibrated, and the pruned model is made from it. Errors are max abs errors divided by",
        f"max |output|. *pruned vs masked* is compared in float64 (must be <= {check.PRUNE_TOL:g});",
        f"*ONNX vs PyTorch* in float32 must be within the *ONNX bound*: {check.ONNX_TOL:g}, or",
        f"{check.NOISE_FACTOR:g} times PyTorch's own float32 error against float64 where that is",
        "larger (the deep random efficientnets amplify rounding: PyTorch itself is 1e-3 off).",
        "*lost channel* is the same measure for losing one channel, the mistake a pruner or",
        "exporter makes; it must exceed the ONNX bound in the first two thirds.",
        "*1% channel* is how far scaling one kept BN channel by 1.01 moves the masked model's",
        "output (median over the live ones of ten channels of the BN at 1/6, 1/2 and 5/6 of the",
        "network; live: changing it changes the output on the example at all): the",
        "smallest error each check could see. It must exceed the pruning tolerance in all three",
        "thirds and the ONNX tolerance in the first two. In the last third it can be as small as",
        "fp32 rounding in ONNX Runtime, so the ONNX check does not show that a 1% error in one",
        "late channel would be caught (a dropped or swapped channel would be).",
        "*CLI untrained* is the model as a new user meets it: untrained (BN at its initial",
        "statistics), `recede prune --model torchvision:NAME --input-shape 1,3,S,S --scope layer`,",
        "then `recede export` of the result, each in its own process: the two exit codes and the",
        "verdict of every check (removal, fold, ONNX; `twin-ok`: verified on the BN-calibrated",
        "copy, as the untrained model cannot see a wrong one). The goal: exit 0 / 0, or a refusal",
        "(exit 2) that says why; never exit 1 or a traceback.",
        "ONNX: `pipeline.export.onnx.export_onnx` (opset 17, dynamic batch, onnxslim) on the",
        "pruned model, checked with `verify_onnx` at batch 2 and 3. *time* covers build,",
        "calibration, graph, prune, the checks, export and verification (wall clock; it varies",
        "with machine load). Models marked (slow) run only under `pytest -m slow`; VGG needs",
        "224 px only for ONNX (the exporter supports adaptive_avg_pool2d only when 7 divides the",
        "feature size).",
        "",
        f"Command: `python benchmarks/coverage_table.py{' --fast' if args.fast else ''}` "
        f"({len(names)} models, {total:.0f} s total; torch {torch.__version__}, {cpu}, "
        f"{torch.get_num_threads()} threads; load average {load_start:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; {time.strftime('%Y-%m-%d')}).",
        "",
        f"Untrained through the command line: {cli_ok} of {len(names)} exit 0 / 0 or are "
        "refused with exit 2 saying why.",
        "",
    ]
    if args.fast:
        header[-1:-1] = [
            "Only the default fast subset was regenerated (the full 58 took 1093 s before BN",
            "calibration and the float64 check were added, on 2 shared cores); the slow models are not listed until a full run.",
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {args.out}; {failures} failing of {len(names)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
