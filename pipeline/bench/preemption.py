"""Tell a wall-clock row that measured the machine's load: its wall time against its CPU time.

A one-thread CPU run computes in the calling thread, so the thread's CPU time is what the run
cost and the wall time is that plus every moment the scheduler gave the core to another
process. On an idle core the two agree; beside other work the wall time grows while the CPU
time does not, and a wall-clock latency then measures the load, whatever its spread says (a
run preempted every time is slow every time: its blocks agree, so it is not ``noisy``). Each
one-thread row therefore records both medians, and a wall-clock row whose wall p50 exceeds
:data:`PREEMPT_LIMIT` times its CPU p50 is flagged ``preempted``. A CPU-clock row records both
too and is never flagged: its figure is the CPU time, which the waiting does not enter.

Rows of several threads are not judged: the calling thread's CPU time leaves out the others'
work, and the process's CPU time counts their spinning.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

PREEMPT_LIMIT = 1.5
"""Wall p50 ÷ CPU p50 above which a one-thread wall-clock row is ``preempted``.

Measured with ``python benchmarks/preemption_ratio.py`` (the demo's VGG-11 at width 0.5 on
1x32x32, torch, one thread, 60 runs per batch; the ratio of the wall and CPU medians) on this
project's 2-core CPU (AMD EPYC, no GPU), 2026-12-07 13:26 UTC. The machine never idled that day
(load average 15 to 19 from other work), so "idle" is a core of its own: the script at real-time
priority on core 0 (``taskset -c 0 chrt -f 10``), where no other process can take the core.

- a core of its own: 1.00 at batch 1 and at batch 32 (the largest single run 1.00 and 2.25;
  3% of batch-32 runs above 1.5);
- beside two ``yes > /dev/null`` on its core (``taskset -c 0``, normal priority): 18.3 and 17.0;
- beside the machine's own load, unpinned: 3.7 and 4.2.

The bound sits between: 50% above a free core's 1.00, so an odd slow run (a page fault, a
timer interrupt) does not flag a row, and far below every loaded figure; a row above it spent a
third or more of its wall time waiting for a core.
"""


def clock_p50s(pairs: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """The median wall and median CPU time (ms) of ``(wall, cpu)`` run pairs; None when there
    are none (the row did not record both clocks)."""
    if not pairs:
        return None
    return statistics.median(w for w, _ in pairs), statistics.median(c for _, c in pairs)


def is_preempted(clock: str, wall_p50_ms: float | None, cpu_p50_ms: float | None) -> bool:
    """Whether a row timed on ``clock`` with these medians is ``preempted`` (see the module
    docstring): wall clock, both medians known, and wall over CPU above :data:`PREEMPT_LIMIT`."""
    if clock != "wall" or not wall_p50_ms or not cpu_p50_ms or cpu_p50_ms <= 0:
        return False
    return wall_p50_ms / cpu_p50_ms > PREEMPT_LIMIT
