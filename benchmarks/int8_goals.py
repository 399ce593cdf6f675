"""The INT8 goals on the demo, measured: pruned INT8 against pruned fp32 and against dense INT8.

Each repeat times the run's four ONNX graphs (``dense.onnx``, ``pruned.onnx``,
``dense.int8.onnx``, ``pruned.int8.onnx``) **interleaved** on ONNX Runtime's CPU provider, one
thread, at batch 1 and 32, and takes each ratio as the median of per-block ratios of the same
blocks, so a load change hits all four alike. Over ``--repeats`` it reports, per batch, the
median ratio and its range:

- pruned INT8 over pruned fp32 (goal: >= 1.5x at batch 32, not slower at batch 1);
- pruned INT8 over dense INT8 (goal: faster at both batches);
- pruned fp32 over dense fp32, and that divided by the MAC ratio;
- dense fp32 over pruned INT8 (what a user gains in all);

and the INT8 verdicts and accuracies the run recorded (goal: within 0.5 points of fp32).

    make demo
    PYTHONPATH=. python benchmarks/int8_goals.py --run runs/demo --repeats 5 --clock cpu \\
        --out benchmarks/results/int8_goals.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pipeline.bench.artefacts import Artefact, onnx_input
from pipeline.bench.interleave import block_ratio
from pipeline.bench.sweep import SweepConfig, measure_interleaved
from pipeline.bench.timing import Setting
from pipeline.core.atomic import write_json_atomic
from pipeline.core.environment import environment

GRAPHS = {
    ("dense", "fp32"): "dense.onnx",
    ("pruned", "fp32"): "pruned.onnx",
    ("dense", "int8"): "dense.int8.onnx",
    ("pruned", "int8"): "pruned.int8.onnx",
}
RATIOS = {  # name: (numerator graph, denominator graph): p50 of the first over the second
    "pruned int8 vs pruned fp32": (("pruned", "fp32"), ("pruned", "int8")),
    "pruned int8 vs dense int8": (("dense", "int8"), ("pruned", "int8")),
    "pruned fp32 vs dense fp32": (("dense", "fp32"), ("pruned", "fp32")),
    "dense fp32 to pruned int8": (("dense", "fp32"), ("pruned", "int8")),
}


def _artefacts(run: Path) -> list[Artefact]:
    found = []
    for (label, precision), name in GRAPHS.items():
        path = run / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: make the run with export.int8 enabled")
        shape, _ = onnx_input(path)
        found.append(Artefact(label, str(path), shape, None, path, precision=precision))
    return found


def repeat(artefacts: list[Artefact], cfg: SweepConfig, batch: int) -> dict[str, float]:
    """One interleaved timing of the four graphs: every ratio of :data:`RATIOS`."""
    rows = measure_interleaved(artefacts, Setting("onnxruntime", "cpu", "session"), cfg, batch)
    blocks = {(r.model, r.precision): r.blocks_ms for r in rows}
    return {name: block_ratio(blocks[a], blocks[b]).median for name, (a, b) in RATIOS.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    report = json.loads((args.run / "report.json").read_text())
    mac_ratio = report["dense"]["macs"] / report["pruned"]["macs"]
    cfg = SweepConfig(tuple(args.batches), 1, args.runs, args.warmup, args.clock)
    artefacts = _artefacts(args.run)
    measured: dict[str, dict[str, list[float]]] = {}
    for r in range(args.repeats):
        for batch in args.batches:
            for name, value in repeat(artefacts, cfg, batch).items():
                measured.setdefault(f"batch {batch}", {}).setdefault(name, []).append(value)
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    print("| batch | ratio | median | min | max |\n|---|---|---:|---:|---:|")
    for batch, ratios in measured.items():
        for name, values in ratios.items():
            print(f"| {batch} | {name} | {statistics.median(values):.2f}x | "
                  f"{min(values):.2f}x | {max(values):.2f}x |")  # fmt: skip
        fp32 = statistics.median(ratios["pruned fp32 vs dense fp32"])
        print(f"| {batch} | pruned fp32 speed-up ÷ MAC ratio {mac_ratio:.2f} | "
              f"{fp32 / mac_ratio:.2f} | | |")  # fmt: skip
    int8 = report.get("int8") or {}
    for label, record in (("pruned", int8), ("dense", int8.get("dense") or {})):
        if record:
            print(f"{label} INT8: {record['accuracy']:.2f}% vs fp32 {record['fp32_accuracy']:.2f}% "
                  f"({record['check']['verdict']})")  # fmt: skip
    if args.out:
        write_json_atomic(args.out, {
            "run": str(args.run), "args": {**vars(args), "run": str(args.run),
                                           "out": str(args.out)},
            "mac_ratio": mac_ratio, "ratios": measured, "int8": int8,
            "environment": environment(),
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
