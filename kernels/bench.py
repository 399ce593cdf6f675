"""Benchmark the kernel ops; run as ``python -m kernels.bench [--device cpu|cuda]``.

On CUDA: ``triton.testing.do_bench`` of each op, Triton against torch eager, and of a whole
training step of a small bounded-BN CNN with and without the fused kernels. On CPU, where only
the references run: the share of a training step spent in the penalty path, for the receding
penalty over the bounded-BN logits of that CNN (10 conv layers, 32x32 inputs, batch 64), plus
the other penalty ops for comparison. Prints a markdown table. Never run as a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.bounded_bn import bounded_batch_norm
from kernels.ista_shrink import ista_shrink_
from kernels.l1_penalty import l1_penalty_
from kernels.polarization_penalty import polarization_penalty_
from kernels.receding_penalty import receding_penalty_

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


class BoundedBN(nn.Module):
    """Minimal bounded BN + ReLU for the benchmark model (pipeline has the real module)."""

    def __init__(self, channels: int, backend: str) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bounded_batch_norm(
            x,
            self.logit,
            self.shift,
            self.running_mean,
            self.running_var,
            training=self.training,
            momentum=0.1,
            eps=1e-5,
            relu=True,
            backend=self.backend,
        )


def build_cnn(backend: str = "torch", num_classes: int = 10) -> nn.Sequential:
    """The 10-conv VGG-style CNN of :data:`VGG10`, bounded BN + ReLU after each conv."""
    layers: list[nn.Module] = []
    channels = 3
    for width in VGG10:
        if width == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), BoundedBN(width, backend)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def _logits(model: nn.Module) -> list[torch.Tensor]:
    return [m.logit for m in model.modules() if isinstance(m, BoundedBN)]


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


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_penalty_share(batch_size: int = 64, steps: int = 8, warmup: int = 2) -> list[dict]:
    """Median time of a training step and of each penalty op run inside it, on the CPU.

    Each step is forward, backward, the penalty ops, and the optimizer step; an op's share is
    its time over (the step without penalty ops + that op), i.e. its share of a real step.
    """
    torch.manual_seed(0)
    model = build_cnn("torch").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    logits, ops = _logits(model), _penalty_ops("torch")
    base: list[float] = []
    op_times: dict[str, list[float]] = {name: [] for name in ops}
    for step in range(warmup + steps):
        opt.zero_grad(set_to_none=True)
        fwd_bwd = _timed(lambda: F.cross_entropy(model(x), y).backward())
        spent = {name: _timed(lambda op=op: op(logits)) for name, op in ops.items()}
        base_step = fwd_bwd + _timed(opt.step)
        if step >= warmup:
            base.append(base_step)
            for name, seconds in spent.items():
                op_times[name].append(seconds)
    step_s = statistics.median(base)
    rows = [{"op": "training step (no penalty)", "ms": 1e3 * step_s, "share": None}]
    for name, times in op_times.items():
        op_s = statistics.median(times)
        rows.append({"op": name, "ms": 1e3 * op_s, "share": 100.0 * op_s / (step_s + op_s)})
    return rows


def _cuda_step(model: nn.Module, opt: torch.optim.Optimizer, backend: str) -> Callable[[], None]:
    x = torch.randn(64, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    logits = _logits(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        receding_penalty_(logits, strength=1e-4, backend=backend)
        opt.step()

    return step


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
    times = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = build_cnn(backend).cuda().train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        times[backend] = bench(_cuda_step(model, opt, backend))
    rows.append({"op": "training step, VGG10 batch 64 (+ receding)", **times})
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
    """Parse the options, run the benchmark for the device, print a markdown table."""
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__)
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default)
    parser.add_argument("--batch-size", type=int, default=64, help="CPU run only")
    parser.add_argument("--steps", type=int, default=8, help="timed CPU steps")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")
        rows = cuda_op_timings()
        for row in rows:
            row["speedup"] = row["torch"] / row["triton"]
        cols = [
            ("op", "op", "s"),
            ("torch", "torch eager (ms)", ".3f"),
            ("triton", "triton (ms)", ".3f"),
            ("speedup", "speed-up", ".2f"),
        ]
        print(f"GPU: {torch.cuda.get_device_name()}\n\n" + _table(rows, cols))
        return
    threads = torch.get_num_threads()
    rows = cpu_penalty_share(batch_size=args.batch_size, steps=args.steps)
    cols = [
        ("op", "op (torch reference)", "s"),
        ("ms", "ms per step", ".3f"),
        ("share", "share of step (%)", ".3f"),
    ]
    print(
        f"CPU, {threads} threads, VGG10 at 32x32, batch {args.batch_size}, "
        f"median of {args.steps} steps\n\n" + _table(rows, cols)
    )


if __name__ == "__main__":
    main()
