"""Which kept widths ONNX Runtime's CPU kernels reward, fp32 and INT8: ``prune.round_to`` 1, 8,
16 and 32 on the same models at the same cut.

Each model is pruned per layer (``--scope layer``, ``--ratio``) four times, once per
``round_to``, from the same weights; each result is folded, exported to fp32 ONNX and quantized
to INT8 (calibrated on random inputs: only latency is measured here, and latency depends on
shapes, not weights). Then, per batch, the dense fp32 and INT8 graphs and every pruned graph are
timed **interleaved** on ONNX Runtime's CPU provider, one thread, CPU clock, so a load change
hits all alike; a repeat runs the whole interleaved timing again, and figures are medians over
repeats with their range. For each row: p50, speed-up over dense at the same precision, and that
speed-up divided by the MAC ratio (1.0: latency fell as much as the arithmetic did).

    python benchmarks/width_alignment.py --out benchmarks/results/width_alignment.json

Models: the demo VGG-11 (w0.5, 32 px), torchvision's MobileNetV3-Small (32 px) and MobileNetV2
(width 0.5, 32 px), untrained, 10 classes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench.artefacts import Artefact  # noqa: E402
from pipeline.bench.sweep import SweepConfig, measure_interleaved  # noqa: E402
from pipeline.bench.timing import Setting  # noqa: E402
from pipeline.config import ModelConfig, PruneConfig  # noqa: E402
from pipeline.core.atomic import write_json_atomic  # noqa: E402
from pipeline.core.environment import environment  # noqa: E402
from pipeline.export.int8 import Int8Options, preprocess, quantize_int8  # noqa: E402
from pipeline.export.onnx import export_onnx  # noqa: E402
from pipeline.fold.batchnorm import fold_bn  # noqa: E402
from pipeline.graph.costs import count_macs  # noqa: E402
from pipeline.models.zoo import build_model  # noqa: E402
from pipeline.prune.stage import prune_model  # noqa: E402

MODELS = {
    "vgg11-w0.5": (ModelConfig(name="vgg", depth=11, width=0.5), (1, 32, 32)),
    "mobilenet_v3_small": (ModelConfig(name="torchvision:mobilenet_v3_small"), (3, 32, 32)),
    "mobilenet_v2-w0.5": (ModelConfig(name="torchvision:mobilenet_v2", width=0.5), (3, 32, 32)),
}
ROUND_TO = (1, 8, 16, 32)


def _calibrated(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """BN statistics from random inputs, so the graph's ranges are not degenerate."""
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, *shape))
    return model.eval()


def _graphs(model, shape, label: str, tmp: Path) -> list[Artefact]:
    """The fp32 and INT8 ONNX graphs of ``model``, as timing artefacts."""
    example = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    folded, _ = fold_bn(model, example)
    fp32 = export_onnx(folded, example[:2], tmp / f"{label}.onnx")
    samples = np.random.default_rng(0).standard_normal((64, *shape)).astype(np.float32)
    prepared = preprocess(fp32, tmp / f"{label}.prep.onnx")
    int8 = quantize_int8(prepared, tmp / f"{label}.int8.onnx", samples, Int8Options()).path
    macs = count_macs(folded, shape)
    return [
        Artefact(label, str(fp32), shape, None, fp32, macs=macs),
        Artefact(label, str(int8), shape, None, int8, macs=macs, precision="int8"),
    ]


def _models(name: str, ratio: float, tmp: Path) -> list[Artefact]:
    spec, shape = MODELS[name]
    torch.manual_seed(0)
    dense = _calibrated(build_model(spec, num_classes=10, in_channels=shape[0]), shape)
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    artefacts = _graphs(dense, shape, "dense", tmp)
    for r in ROUND_TO:
        cfg = PruneConfig(threshold="ratio", ratio=ratio, scope="layer", round_to=r)
        pruned = prune_model(dense, example, cfg).model.eval()
        artefacts += _graphs(pruned, shape, f"round_to={r}", tmp)
    return artefacts


def _time(artefacts: list[Artefact], batch: int, runs: int) -> dict[tuple[str, str], float]:
    cfg = SweepConfig((batch,), threads=1, runs=runs, warmup=10, clock="cpu")
    rows = measure_interleaved(artefacts, Setting("onnxruntime", "cpu", "session"), cfg, batch)
    return {(r.model, r.precision): r.p50_ms for r in rows}


def measure(name: str, ratio: float, batches: list[int], repeats: int, runs: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="recede-widths-") as tmp:
        artefacts = _models(name, ratio, Path(tmp))
        macs = {(a.label, a.precision): a.macs for a in artefacts}
        rows = []
        for batch in batches:
            p50s = [_time(artefacts, batch, runs) for _ in range(repeats)]
            for label, precision in macs:
                dense = [t[("dense", precision)] for t in p50s]
                own = [t[(label, precision)] for t in p50s]
                gains = [d / o for d, o in zip(dense, own, strict=True)]
                mac_ratio = macs[("dense", precision)] / macs[(label, precision)]
                rows.append({
                    "model": name, "variant": label, "precision": precision, "batch": batch,
                    "p50_ms": statistics.median(own), "speedup": statistics.median(gains),
                    "speedup_range": [min(gains), max(gains)], "mac_ratio": mac_ratio,
                    "speedup_per_mac_ratio": statistics.median(gains) / mac_ratio,
                })  # fmt: skip
        return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--ratio", type=float, default=0.4, help="share of each layer's channels cut")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not 0 < args.ratio < 1 or args.repeats < 1 or args.runs < 5 or min(args.batches) < 1:
        p.error("expected 0 < --ratio < 1, --repeats >= 1, --runs >= 5, --batches >= 1")
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        rows += measure(name, args.ratio, args.batches, args.repeats, args.runs)
        print(json.dumps(rows[-1]), flush=True)
    write_json_atomic(args.out, {"rows": rows, "args": vars(args) | {"out": str(args.out)},
                                 "environment": environment()})  # fmt: skip
    for r in rows:
        lo, hi = r["speedup_range"]
        print(f"{r['model']:20s} {r['variant']:12s} {r['precision']:5s} b{r['batch']:<3d} "
              f"p50 {r['p50_ms']:8.3f} ms  speed-up {r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) "
              f"÷ MAC ratio {r['speedup_per_mac_ratio']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
