"""Wall time over CPU time of one-thread runs: the figures behind ``preemption.PREEMPT_LIMIT``.

Times the demo's model (VGG-11 at width 0.5 on 1x32x32, torch, one thread) at batch 1 and 32,
reading the wall clock and the thread's CPU clock around the same runs, and prints the ratio of
their medians, the median and largest per-run ratio and the share of runs above 1.2, 1.5 and 2.
Run it idle, then beside load, e.g.::

    PYTHONPATH=. taskset -c 0 chrt -f 10 python benchmarks/preemption_ratio.py  # a core of its own
    taskset -c 0 yes > /dev/null & taskset -c 0 yes > /dev/null &
    PYTHONPATH=. taskset -c 0 python benchmarks/preemption_ratio.py             # beside two yes
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench.timed_runs import host_samples_ms  # noqa: E402
from pipeline.config import ModelConfig  # noqa: E402
from pipeline.models.zoo import build_model  # noqa: E402

BOUNDS = (1.2, 1.5, 2.0)


def ratio_line(pairs: list[tuple[float, float]], batch: int) -> str:
    """One line of figures from ``(wall ms, cpu ms)`` run pairs."""
    wall, cpu = statistics.median(w for w, _ in pairs), statistics.median(c for _, c in pairs)
    ratios = [w / c for w, c in pairs]
    above = "/".join(f"{sum(r > b for r in ratios) / len(ratios):.0%}" for b in BOUNDS)
    return (
        f"batch {batch}: wall p50 {wall:.3f} ms, cpu p50 {cpu:.3f} ms, ratio of p50s "
        f"{wall / cpu:.2f}, median run ratio {statistics.median(ratios):.2f}, largest "
        f"{max(ratios):.2f}, runs above {'/'.join(map(str, BOUNDS))}: {above}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=60, help="timed runs per batch (default 60)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="vgg", depth=11, width=0.5), num_classes=10, in_channels=1)
    net.eval()
    for batch in args.batches:
        x = torch.randn(batch, 1, 32, 32)
        pairs: list[tuple[float, float]] = []
        with torch.inference_mode():
            host_samples_ms(lambda: net(x), warmup=5, runs=args.runs, pairs=pairs)  # noqa: B023
        print(ratio_line(pairs, batch), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
