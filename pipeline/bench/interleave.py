"""Time several models in alternating blocks, and turn the blocks into ratios with a spread.

On a shared machine the load changes while a sweep runs: timing dense first and pruned second
lets a load change land on one model only, and the speed-up then measures the machine. Here every
model of one setting and batch is timed in the same blocks, one block after the other (the order
reversed every other block, so neither model always runs first after the other warmed the
caches), and a speed-up is the median of per-block ratios: a load that slows a block slows both
models in it and cancels out of that block's ratio. The spread of those ratios says how far the
figure can be trusted.

Timers are plain callables (``n -> n durations in ms``), so tests drive this with a fake clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Timer = Callable[[int], list[float]]  # run the model n times; the n durations in milliseconds

MAX_BLOCKS = 10
"""Blocks per measurement. Ten medians give a spread (and a median ratio) that one outlier
block cannot move, while each block keeps enough runs (runs / 10) that its median is stable."""


def block_sizes(runs: int, max_blocks: int = MAX_BLOCKS) -> list[int]:
    """``runs`` split into ``min(runs, max_blocks)`` near-equal blocks, larger ones first.

    Raises:
        ValueError: If ``runs`` or ``max_blocks`` is below 1.
    """
    if runs < 1 or max_blocks < 1:
        raise ValueError(f"expected runs >= 1 and max_blocks >= 1, got {runs} and {max_blocks}")
    blocks = min(runs, max_blocks)
    return [runs // blocks + (1 if b < runs % blocks else 0) for b in range(blocks)]


def interleave(
    timers: Sequence[Timer], *, runs: int, warmup: int, max_blocks: int = MAX_BLOCKS
) -> list[list[list[float]]]:
    """Warm every timer up, then time them all block by block, alternating the order.

    Args:
        timers: One per model.
        runs: Timed runs per model, split into blocks by :func:`block_sizes`.
        warmup: Untimed runs per model before the first block.
        max_blocks: At most this many blocks.

    Returns:
        ``samples[model][block]``: the durations in ms of that model's runs in that block.
    """
    for timer in timers:
        if warmup:
            timer(warmup)
    samples: list[list[list[float]]] = [[] for _ in timers]
    for b, size in enumerate(block_sizes(runs, max_blocks)):
        order = range(len(timers)) if b % 2 == 0 else reversed(range(len(timers)))
        for i in order:
            samples[i].append(list(timer_samples(timers[i], size)))
    return samples


def timer_samples(timer: Timer, n: int) -> list[float]:
    """``timer(n)``, checked to give ``n`` durations (a wrong timer is a bug, not noise)."""
    got = timer(n)
    if len(got) != n:
        raise ValueError(f"a timer asked for {n} runs returned {len(got)} durations")
    return got


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles, linearly interpolated (numpy's default method).

    Quartiles, not the extremes, describe the spread: the first block after a short warm-up or
    one block hit by a cron job is one outlier, and it would set a min/max range alone.
    """
    if len(values) == 1:
        return values[0], values[0], values[0]
    low, middle, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, middle, high


def relative_spread(values: Sequence[float]) -> float:
    """Interquartile range over median of ``values``: 0 for one value, 0.2 when the middle
    half spans 20% of the median."""
    low, middle, high = quartiles(values)
    return (high - low) / middle if middle > 0 else 0.0


@dataclass(frozen=True)
class Ratio:
    """A ratio measured block by block: the median block ratio and the quartiles around it."""

    median: float
    low: float
    high: float

    @property
    def spread(self) -> float:
        """``(high - low) / median``: :func:`relative_spread` of the block ratios."""
        return (self.high - self.low) / self.median if self.median > 0 else 0.0


def block_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Ratio:
    """The per-block ratios ``numerators[b] / denominators[b]`` summarised as a :class:`Ratio`.

    A speed-up of B over A is ``block_ratio(A's block medians, B's block medians)``.

    Raises:
        ValueError: If the two are empty, differ in length or hold a duration <= 0.
    """
    if not numerators or len(numerators) != len(denominators) or min(denominators) <= 0:
        raise ValueError(
            f"expected two equally long lists of positive block medians, got "
            f"{len(numerators)} and {len(denominators)} (min {min(denominators, default=0)})"
        )
    low, middle, high = quartiles([n / d for n, d in zip(numerators, denominators, strict=True)])
    return Ratio(middle, low, high)
