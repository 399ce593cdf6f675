"""Time runs of a callable: on a host clock, on both host clocks around each run, or with CUDA events.

These loops are the one place recede measures latency; ``bench``, ``run`` and the TensorRT export
all go through them. Every timed run ends with the device idle (a synchronisation, or a CUDA
event waited on), so a run measures the full forward pass, never the time to enqueue it, and
runs never overlap: these are latencies, not pipelined throughput. Rows, percentiles and tables
of the durations are :mod:`pipeline.bench.timing`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pipeline.bench.preemption import clock_p50s
from pipeline.bench.timing import CLOCKS, percentiles_ms


def _check_counts(warmup: int, runs: int) -> None:
    if runs < 1 or warmup < 0:
        raise ValueError(f"expected runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")


def host_samples_ms(
    fn: Callable[[], Any],
    *,
    warmup: int,
    runs: int,
    sync: Callable[[], Any] | None = None,
    clock: str = "wall",
    pairs: list[tuple[float, float]] | None = None,
) -> list[float]:
    """Durations of ``runs`` calls of ``fn`` on a host clock (:data:`CLOCKS`), in ms.

    Args:
        fn: The work to time.
        warmup: Untimed calls first (allocator, autotuning and thread pools settle).
        runs: Timed calls.
        sync: Called after every call, inside the timed region (e.g.
            ``torch.cuda.synchronize``); None for work that is done when ``fn`` returns.
        clock: ``wall`` or ``cpu`` (the calling thread's CPU time: only for work that runs
            entirely in this thread, never with ``sync``: a GPU's time is not this thread's).
        pairs: When given (work in this thread only, no ``sync``), each timed run's wall and
            CPU time in ms are appended to it, read from both clocks around the same call.
    """
    _check_counts(warmup, runs)
    if clock not in CLOCKS or (sync is not None and (clock == "cpu" or pairs is not None)):
        raise ValueError(f"expected clock 'wall', or 'cpu' or pairs without sync; got {clock!r}")
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    samples = []
    for _ in range(runs):
        if pairs is not None:
            pairs.append(_both_clocks_ms(fn))
            samples.append(pairs[-1][0 if clock == "wall" else 1])
            continue
        start = now()
        fn()
        if sync is not None:
            sync()
        samples.append((now() - start) / 1e6)
    return samples


def _both_clocks_ms(fn: Callable[[], Any]) -> tuple[float, float]:
    """One call of ``fn``: its wall and this thread's CPU time in ms (the CPU clock read
    inside the wall clock's span)."""
    wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
    fn()
    cpu, wall = time.thread_time_ns() - cpu, time.perf_counter_ns() - wall
    return wall / 1e6, cpu / 1e6


class HostTimer:
    """A :data:`~pipeline.bench.interleave.Timer` of a call that runs in this thread:
    ``timer(n)`` gives ``n`` durations on ``clock``.

    With ``both`` (one-thread CPU work) every run also reads the other clock, and
    :meth:`clock_p50s` gives the median wall and CPU time of the last runs, which a row records
    beside its figure (:mod:`pipeline.bench.preemption`).
    """

    def __init__(self, fn: Callable[[], Any], *, clock: str = "wall", both: bool = False) -> None:
        self.fn, self.clock = fn, clock
        self.pairs: list[tuple[float, float]] | None = [] if both else None

    def __call__(self, n: int) -> list[float]:
        if n == 0:  # no warm-up asked for
            return []
        return host_samples_ms(self.fn, warmup=0, runs=n, clock=self.clock, pairs=self.pairs)

    def clock_p50s(self, runs: int) -> dict[str, float]:
        """``wall_p50_ms`` and ``cpu_p50_ms`` of the last ``runs`` runs (the timed ones: a
        warm-up comes first), as :class:`LatencyRow` fields; empty without ``both``."""
        p50s = clock_p50s((self.pairs or [])[-runs:]) if runs > 0 else None
        return {} if p50s is None else {"wall_p50_ms": p50s[0], "cpu_p50_ms": p50s[1]}


def cuda_event_samples_ms(fn: Callable[[], Any], *, warmup: int, runs: int) -> list[float]:
    """Durations of ``runs`` calls of ``fn`` between CUDA events on the current stream, in ms.

    The GPU is idle when each start event is recorded, so the span covers kernel launches and
    execution (a launch-bound eager model shows its launch cost); each end event is waited on
    before the next run starts.
    """
    import torch

    _check_counts(warmup, runs)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(runs):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(float(start.elapsed_time(end)))
    return samples


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int,
    runs: int,
    sync: Callable[[], Any] | None = None,
) -> tuple[float, float, float]:
    """``(p50, p90, p99)`` in ms of ``fn`` on the host clock; see :func:`host_samples_ms`."""
    samples = host_samples_ms(fn, warmup=warmup, runs=runs, sync=sync)
    return percentiles_ms([s / 1e3 for s in samples])
