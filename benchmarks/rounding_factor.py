"""How far ONNX Runtime lands from the exact answer, against PyTorch's own float32 rounding.

The fp32 export bound is ``ROUNDING_FACTOR`` times ``measured_rounding`` (see
``pipeline.core.tolerance``). This measures the ratio it relies on, on deep nets whose BNs
amplify rounding: random conv-BN-ReLU chains with BN statistics calibrated on the verification
batch (the calibrated twin of an untrained model is such a net). For each it prints ONNX
Runtime's distance from the float64 answer over PyTorch's plain float32 run's, and over the
dithered estimate (the largest of the plain run and ``DITHERS`` runs one ulp off).

    python benchmarks/rounding_factor.py                  # 16 chains, 50 layers, 16 wide, 4x4
    python benchmarks/rounding_factor.py --seeds 32 --depth 40
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn


def chain(depth: int, width: int, seed: int) -> nn.Sequential:
    """``depth`` conv-BN-ReLU layers and a linear head, weights drawn from ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.BatchNorm2d(width)]
        layers.append(nn.ReLU())
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))


def ratios(net: nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
    """(ONNX Runtime's relative error, its ratio to the plain run's, to the dithered estimate)."""
    import onnxruntime as ort

    from pipeline.core.checks import calibrated_twin
    from pipeline.core.tolerance import measured_rounding
    from pipeline.export.onnx import export_onnx
    from pipeline.fold.batchnorm import fold_bn

    twin = calibrated_twin(net, x)
    folded = fold_bn(twin, x)[0]
    plain = measured_rounding(folded, x, dithers=0)
    dithered = measured_rounding(folded, x)
    with tempfile.TemporaryDirectory() as tmp:
        session = ort.InferenceSession(str(export_onnx(folded, x[:2], Path(tmp, "m.onnx"))))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        exact = twin.double()(x.double()).numpy()
    err = float(np.abs(got - exact).max() / np.abs(exact).max())
    return err, err / plain, err / dithered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(4, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    rows = [ratios(chain(args.depth, args.width, seed), x) for seed in range(args.seeds)]
    print("| seed | ONNX Runtime vs exact | / plain rounding | / dithered rounding |")
    print("|---:|---:|---:|---:|")
    for seed, (err, plain, dithered) in enumerate(rows):
        print(f"| {seed} | {err:.2e} | {plain:.2f} | {dithered:.2f} |")
    _, plain, dithered = zip(*rows, strict=True)
    print(
        f"max {max(plain):.2f} (median {np.median(plain):.2f}) of the plain run's rounding, "
        f"max {max(dithered):.2f} (median {np.median(dithered):.2f}) of the dithered estimate"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
