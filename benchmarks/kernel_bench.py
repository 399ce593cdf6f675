"""Benchmark the kernel ops and whole training steps: ``python benchmarks/kernel_bench.py``.

It lives in ``benchmarks/`` because it builds models with ``pipeline`` (bounded BN, fused
BN+ReLU), and ``kernels/`` imports nothing from ``pipeline/``.

Training steps (both devices): forward, cross-entropy, backward, the receding penalty over every
bounded-BN logit, SGD step; for each case, ``eager`` (torch reference BN and penalty), ``triton``
(the ``recede::`` custom ops, BN+ReLU fused where the graph allows) and ``compile``
(``torch.compile`` of the Triton model), with the median of ``--steps`` steps after
``--warmup`` and the penalty path's median time and share of the step. Cases: ``vgg10`` (the
launch-bound 10-conv CNN, 32 px, batch 64), ``resnet50`` (torchvision, 224 px, batch 64) and
``vgg16`` (CIFAR VGG-16, 32 px, batch 256), the last two GPU-bound. ``--device cpu`` runs the
torch variants only (Triton compiles for CUDA), by default on ``vgg10`` at a small size.
On CUDA also ``triton.testing.do_bench`` of each op, Triton against torch eager. Prints
markdown tables. Never run as a test (a smoke test runs it at tiny sizes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout is importable without install
    sys.path.insert(0, str(ROOT))

from kernels.bounded_bn import bounded_batch_norm  # noqa: E402
from kernels.ista_shrink import ista_shrink_  # noqa: E402
from kernels.l1_penalty import l1_penalty_  # noqa: E402
from kernels.polarization_penalty import polarization_penalty_  # noqa: E402
from kernels.receding_penalty import receding_penalty_  # noqa: E402

# VGG-style widths, "M" = 2x2 max-pool: 10 conv layers, 1472 BN channels.
VGG10 = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M", 256, 256)
# BN widths of a ResNet-50 (53 layers, ~26.5k channels): the per-op penalty workload on CUDA.
RESNET50_BN = (
    [64]
    + [64, 64, 256] * 3
    + [256]
    + [128, 128, 512] * 4
    + [512]
    + [256, 256, 1024] * 6
    + [1024]
    + [512, 512, 2048] * 3
    + [2048]
)


CASES = {"vgg10": (64, 32), "resnet50": (64, 224), "vgg16": (256, 32)}  # batch, image size
VARIANTS = ("eager", "triton", "compile")


def build_cnn(num_classes: int = 10) -> nn.Sequential:
    """The 10-conv VGG-style CNN of :data:`VGG10`: conv, BN, ReLU per layer (plain BN)."""
    layers: list[nn.Module] = []
    channels = 3
    for width in VGG10:
        if width == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
        layers.append(nn.ReLU(inplace=True))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def _build(case: str) -> nn.Module:
    if case == "vgg10":
        return build_cnn()
    if case == "vgg16":
        from pipeline.models.zoo import VGG

        return VGG(16, 10, 3, 1.0)
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=1000)


def bounded_model(case: str, backend: str, example: torch.Tensor) -> nn.Module:
    """``case`` with bounded BN on ``backend``, on ``example``'s device; BN+ReLU fused for
    Triton (the pairs torch.fx finds; ResNet-50's shared ReLUs stay separate)."""
    from pipeline.layers.bn import convert_to_bounded_bn_
    from pipeline.layers.bounded_bn import BoundedBatchNorm2d
    from pipeline.train.fuse_relu import fuse_bn_relu_

    torch.manual_seed(0)
    model = _build(case)
    convert_to_bounded_bn_(model)
    for m in model.modules():
        if isinstance(m, BoundedBatchNorm2d):
            m.backend = backend
    model.to(example.device).train()
    if backend == "triton":
        fuse_bn_relu_(model, example)
    return model.train()


def _logits(model: nn.Module) -> list[torch.Tensor]:
    from pipeline.layers.bounded_bn import BoundedBatchNorm2d

    return [m.weight for m in model.modules() if isinstance(m, BoundedBatchNorm2d)]


def _penalty_ops(backend: str) -> dict[str, Callable[[list[torch.Tensor]], object]]:
    """Each op as it runs once per step, over one tensor per BN layer."""
    return {
        "receding_penalty_": lambda ps: receding_penalty_(ps, strength=1e-4, backend=backend),
        "l1_penalty_": lambda ps: l1_penalty_(ps, strength=1e-4, backend=backend),
        "polarization_penalty_": lambda ps: polarization_penalty_(
            ps, strength=1e-4, backend=backend
        ),
        "ista_shrink_": lambda ps: ista_shrink_(
            ps, lrs=[0.01] * len(ps), lambdas=[1.0] * len(ps), rho=1e-4, backend=backend
        ),
    }


def median_ms(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms over ``steps`` calls after ``warmup``, synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def step_timing(case: str, variant: str, shape: tuple[int, int], opts: argparse.Namespace) -> dict:
    """One row: median step time, and the penalty path's time and share, for one variant."""
    device = torch.device(opts.device)
    batch, size = shape
    x = torch.randn(batch, 3, size, size, device=device)
    backend = "triton" if variant != "eager" and device.type == "cuda" else "torch"
    model = bounded_model(case, backend, x)
    y = torch.randint(0, 10, (batch,), device=device)
    run = torch.compile(model, backend=opts.compile_backend) if variant == "compile" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    logits = _logits(model)

    def penalty() -> None:
        receding_penalty_(logits, strength=1e-4, backend=backend)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), y).backward()
        penalty()
        opt.step()

    step_ms = median_ms(step, opts.steps, opts.warmup, device)
    penalty_ms = median_ms(penalty, opts.steps, opts.warmup, device)
    row = {"case": f"{case} b{batch} {size}px", "variant": variant, "step": step_ms}
    return {**row, "penalty": penalty_ms, "share": 100.0 * penalty_ms / step_ms}


def step_timings(opts: argparse.Namespace) -> list[dict]:
    """Rows of :func:`step_timing` per case and variant, with the speed-up over eager."""
    rows = []
    for case in opts.cases:
        batch, size = CASES[case]
        shape = (opts.batch_size or batch, opts.image_size or size)
        case_rows = [step_timing(case, v, shape, opts) for v in opts.variants]
        eager = next((r["step"] for r in case_rows if r["variant"] == "eager"), None)
        for row in case_rows:
            row["speedup"] = None if eager is None else eager / row["step"]
        rows += case_rows
    return rows


def cuda_op_timings() -> list[dict]:
    """``do_bench`` medians (ms), torch eager against Triton, per op and per training step."""
    from triton.testing import do_bench

    def bench(fn: Callable[[], object]) -> float:
        return do_bench(fn, return_mode="median")

    rows = []
    params = [torch.randn(n, device="cuda", requires_grad=True) for n in RESNET50_BN]
    torch_ops, triton_ops = _penalty_ops("torch"), _penalty_ops("triton")
    for name in torch_ops:
        rows.append(
            {
                "op": f"{name} (ResNet-50 BN sizes)",
                "torch": bench(lambda n=name: torch_ops[n](params)),
                "triton": bench(lambda n=name: triton_ops[n](params)),
            }
        )
    x = torch.randn(64, 128, 32, 32, device="cuda", requires_grad=True)
    logit = torch.zeros(128, device="cuda", requires_grad=True)
    shift, stats = torch.zeros_like(logit, requires_grad=True), torch.zeros(2, 128, device="cuda")
    dy = torch.randn_like(x)

    def bn(backend: str) -> Callable[[], None]:
        return lambda: bounded_batch_norm(
            x,
            logit,
            shift,
            stats[0],
            stats[1],
            training=True,
            momentum=0.1,
            eps=1e-5,
            relu=True,
            backend=backend,
        ).backward(dy)

    rows.append(
        {
            "op": "bounded BN + ReLU fwd+bwd (64x128x32x32)",
            "torch": bench(bn("torch")),
            "triton": bench(bn("triton")),
        }
    )
    return rows


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; ``columns`` are ``(key, header, format)``; ``None`` prints as a dash."""
    lines = [
        "| " + " | ".join(h for _, h, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        cells = ["-" if row[k] is None else format(row[k], f) for k, _, f in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the benchmark for the device, print markdown tables."""
    parser = argparse.ArgumentParser(prog="python benchmarks/kernel_bench.py", description=__doc__)
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default)
    parser.add_argument(
        "--cases", type=lambda v: v.split(","), default=None, help="of " + ",".join(CASES)
    )
    parser.add_argument("--variants", type=lambda v: v.split(","), default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="override every case's")
    parser.add_argument("--image-size", type=int, default=None, help="override every case's")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (cuda 50, cpu 5)")
    parser.add_argument("--warmup", type=int, default=None, help="(cuda 10, cpu 2)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--no-ops", action="store_true", help="skip the per-op table (cuda)")
    opts = parser.parse_args(argv)
    cuda = opts.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    opts.cases = opts.cases or (list(CASES) if cuda else ["vgg10"])
    opts.variants = opts.variants or (list(VARIANTS) if cuda else ["eager", "compile"])
    bad = sorted(set(opts.cases) - set(CASES)) + sorted(set(opts.variants) - set(VARIANTS))
    if bad or (not cuda and "triton" in opts.variants):
        parser.error(
            f"cases come from {list(CASES)}, variants from {list(VARIANTS)} ('triton' "
            f"needs --device cuda); got {bad or ['triton']}"
        )
    opts.steps = opts.steps or (50 if cuda else 5)
    opts.warmup = opts.warmup if opts.warmup is not None else (10 if cuda else 2)
    where = (
        f"GPU: {torch.cuda.get_device_name()}"
        if cuda
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{where}; median of {opts.steps} steps after {opts.warmup}\n")
    if cuda and not opts.no_ops:
        ops = cuda_op_timings()
        for row in ops:
            row["speedup"] = row["torch"] / row["triton"]
        cols = [
            ("op", "op", "s"),
            ("torch", "torch eager (ms)", ".3f"),
            ("triton", "triton (ms)", ".3f"),
            ("speedup", "speed-up", ".2f"),
        ]
        print(_table(ops, cols) + "\n")
    cols = [
        ("case", "training step", "s"),
        ("variant", "variant", "s"),
        ("step", "ms per step", ".2f"),
        ("speedup", "vs eager", ".2f"),
        ("penalty", "penalty ms", ".3f"),
        ("share", "penalty share (%)", ".2f"),
    ]
    print(_table(step_timings(opts), cols))


if __name__ == "__main__":
    main()
