"""Summarise timed runs: percentiles, one latency row per setting, its flags, and the tables.

The runs themselves are timed by :mod:`pipeline.bench.timed_runs` (the one place recede measures
latency: every run ends with the device idle, and runs never overlap); this module turns their
durations into :class:`LatencyRow` s and renders them for ``bench``, ``run`` and the run report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from pipeline.bench.interleave import Ratio, block_ratio, relative_spread
from pipeline.bench.preemption import PREEMPT_LIMIT, is_preempted

MIN_RUNS = 50
"""Timed runs per row for a figure worth reporting; fewer (down to :data:`QUICK_MIN_RUNS`)
is a quick look, and every row of it is marked ``quick``."""
QUICK_MIN_RUNS = 5
"""The fewest timed runs accepted: five blocks of one run still give a median and a spread."""
NOISE_LIMIT = 0.2
"""A row is ``noisy`` when the interquartile range of its block medians exceeds 20% of their
median. The release
gate fails on a 20% slowdown (``--max-slowdown 1.2``), so a row that moves that much between
blocks of one measurement cannot support a verdict at that scale."""
IMPLAUSIBLE_FACTOR = 1.2
"""A speed-up above 1.2x the MAC ratio is ``implausible``: removing channels cannot make the
remaining arithmetic much faster per MAC, so such a figure measures the machine (a load change
between models, a cache effect), not the model. 20% leaves room for real gains from smaller
working sets."""
QUANTILES = (50, 90, 99)
_DEFAULT_MODE = {"torch": "eager", "onnxruntime": "session", "tensorrt": "engine"}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation (numpy's default method).

    The value at rank ``q / 100 * (n - 1)`` of the sorted values, interpolated between its two
    neighbours.

    Raises:
        ValueError: If ``values`` is empty or ``q`` lies outside [0, 100].
    """
    if len(values) == 0 or not 0 <= q <= 100:
        raise ValueError(
            f"expected at least one timing sample and 0 <= q <= 100, got {len(values)} samples "
            f"and q={q}; use runs >= 1"
        )
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentiles_ms(samples_s: Sequence[float]) -> tuple[float, float, float]:
    """p50, p90 and p99 of durations in seconds, in milliseconds.

    Raises:
        ValueError: If there are no samples.
    """
    ms = [s * 1e3 for s in samples_s]
    p50, p90, p99 = (percentile(ms, q) for q in QUANTILES)
    return p50, p90, p99


CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}
"""How a host run is timed. ``wall`` is elapsed time (``perf_counter_ns``): latency as a user
sees it, including any time the scheduler kept the run waiting. ``cpu`` is the calling thread's
CPU time (``thread_time_ns``): what the run cost, without that waiting, so a speed-up measured
with it survives a loaded machine. It counts one thread only, hence one thread per session."""


def check_clock(clock: str, threads: int) -> None:
    """Refuse a clock that cannot measure a ``threads``-thread run.

    Raises:
        ValueError: ``clock`` is unknown, or ``cpu`` with more than one thread.
    """
    if clock not in CLOCKS:
        raise ValueError(f"expected clock 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and threads != 1:
        raise ValueError(
            f"the cpu clock counts the calling thread only, so it needs threads=1, got "
            f"threads={threads}: the other threads' work would be missing; use threads=1 or the "
            "wall clock"
        )


@dataclass(frozen=True)
class Setting:
    """One way of running a model: the part of a :class:`LatencyRow` that is not measured."""

    backend: str
    device: str
    mode: str
    precision: str = "fp32"
    copies: bool | None = None


@dataclass(frozen=True)
class LatencyRow:
    """One latency measurement: a model under one setting (backend, device, mode) and batch.

    Attributes:
        backend: ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``.
        device: ``"cpu"`` or ``"cuda"``.
        model: Which model was timed, e.g. ``"dense"`` or ``"pruned"``.
        batch: Batch size.
        threads: CPU threads the backend was allowed (intra-op).
        p50_ms: Median latency in milliseconds.
        p90_ms: 90th percentile latency in milliseconds.
        p99_ms: 99th percentile latency in milliseconds.
        mode: ``"eager"`` (torch), ``"cuda-graph"`` (torch, replay of a captured graph),
            ``"session"`` (ONNX Runtime) or ``"engine"`` (TensorRT); empty for the backend's
            default (the first of these for it), as in reports written before modes existed.
        precision: ``"fp32"`` or ``"fp16"``.
        copies: Whether the timed region includes the host-to-device copy of the input and the
            copy of the output back; None on the CPU, where there is none.
        runs: Timed runs behind the percentiles.
        warmup: Untimed runs before them.
        blocks_ms: Median latency of each block of an interleaved measurement
            (:mod:`pipeline.bench.interleave`), in the order timed; rows of one setting and batch
            share their blocks, so block ``b`` of two rows ran under the same load. Empty for
            rows timed alone (TensorRT, reports written before interleaving).
        clock: ``wall`` (elapsed time; CUDA rows time with CUDA events) or ``cpu`` (the
            calling thread's CPU time, one-thread CPU rows only; see :data:`CLOCKS`).
        wall_p50_ms: Median wall time of the timed runs, recorded beside ``cpu_p50_ms`` for
            one-thread CPU rows (whichever the clock); None for other rows.
        cpu_p50_ms: Median CPU time of the calling thread over the same runs, or None.
    """

    backend: str
    device: str
    model: str
    batch: int
    threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mode: str = ""
    precision: str = "fp32"
    copies: bool | None = None
    runs: int = 0
    warmup: int = 0
    blocks_ms: tuple[float, ...] = ()
    clock: str = "wall"
    wall_p50_ms: float | None = None
    cpu_p50_ms: float | None = None

    def __post_init__(self) -> None:
        if not self.mode:
            object.__setattr__(self, "mode", _DEFAULT_MODE.get(self.backend, "eager"))
        object.__setattr__(self, "blocks_ms", tuple(float(b) for b in self.blocks_ms))

    @property
    def noise(self) -> float | None:
        """Relative spread of the block medians (see :func:`relative_spread`); without
        blocks, ``(p90 - p50) / p50``; None when neither is known."""
        if len(self.blocks_ms) > 1:
            return relative_spread(self.blocks_ms)
        return (self.p90_ms - self.p50_ms) / self.p50_ms if self.p50_ms > 0 else None

    @property
    def noisy(self) -> bool:
        """The noise exceeds :data:`NOISE_LIMIT`."""
        return self.noise is not None and self.noise > NOISE_LIMIT

    @property
    def preempted(self) -> bool:
        """A wall-clock row whose wall p50 exceeds :data:`PREEMPT_LIMIT` times its CPU p50:
        it waited for the core more than it computed (:mod:`pipeline.bench.preemption`)."""
        return is_preempted(self.clock, self.wall_p50_ms, self.cpu_p50_ms)

    @property
    def quick(self) -> bool:
        """Fewer than :data:`MIN_RUNS` timed runs: a quick look, not a figure to report."""
        return 0 < self.runs < MIN_RUNS

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch * 1e3 / self.p50_ms if self.p50_ms > 0 else math.inf

    @property
    def setting(self) -> str:
        """Backend, device, and mode or precision where not the default, e.g. ``torch cuda
        cuda-graph fp16``; rows of one setting differ only in model and batch."""
        parts = [self.backend, self.device]
        parts += [self.mode] if self.mode != _DEFAULT_MODE.get(self.backend) else []
        parts += [self.precision] if self.precision != "fp32" else []
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The row as a plain dict, e.g. for JSON (throughput, noise and flags included)."""
        extra = {"noise": self.noise, "noisy": self.noisy, "quick": self.quick}
        extra |= {"preempted": self.preempted}
        return {
            **asdict(self),
            "blocks_ms": list(self.blocks_ms),
            "throughput": self.throughput,
            **extra,
        }

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> LatencyRow:
        """Rebuild a row from :meth:`to_dict` output; extra keys are ignored, and keys added
        after a report was written take their defaults."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], **labels: Any) -> LatencyRow:
        """A row from timed samples in ms; ``labels`` are the other fields (``runs`` is set)."""
        p50, p90, p99 = (percentile(samples_ms, q) for q in QUANTILES)
        return cls(p50_ms=p50, p90_ms=p90, p99_ms=p99, runs=len(samples_ms), **labels)

    @classmethod
    def from_blocks(cls, blocks: Sequence[Sequence[float]], **labels: Any) -> LatencyRow:
        """A row from the blocks of an interleaved measurement (ms): percentiles over every
        sample, and each block's median in ``blocks_ms``."""
        medians = tuple(percentile(b, 50) for b in blocks)
        return cls.from_samples([s for b in blocks for s in b], blocks_ms=medians, **labels)


# --- tables: one renderer for `recede bench`, `recede run` and the run report ------------------

MISSING = "—"
_COPIES = {None: MISSING, True: "included", False: "excluded (device-resident)"}


def _markdown(header: Sequence[str], align: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def _backend_cell(row: LatencyRow) -> str:
    """The setting without the device and the precision (they have their own columns):
    ``torch cuda-graph``."""
    return replace(row, precision="fp32").setting.replace(f" {row.device}", "", 1)


def reference_rows(rows: Sequence[LatencyRow]) -> dict[tuple[str, int, int], LatencyRow]:
    """The reference model's row per (setting, batch, threads); the reference is the first
    model in ``rows`` (``dense`` in a run report)."""
    if not rows:
        return {}
    reference = rows[0].model
    return {(r.setting, r.batch, r.threads): r for r in rows if r.model == reference}


def fp32_setting(row: LatencyRow) -> str:
    """``row``'s setting at fp32: the reference of an INT8 row is the dense fp32 model under the
    same backend, device and mode (a user's gain over what they had)."""
    return replace(row, precision="fp32").setting if row.precision == "int8" else row.setting


def speedup_ratio(
    row: LatencyRow,
    reference: Mapping[tuple[str, int, int], LatencyRow],
    *,
    same_precision: bool = False,
) -> Ratio | None:
    """Speed-up of ``row`` over the reference model's row of the same setting and batch (an
    INT8 row: over the reference's fp32 row, unless ``same_precision``).

    Rows timed in the same interleaved blocks give the median of the per-block ratios with
    their smallest and largest; other rows (timed alone) give the p50 ratio with no spread.
    """
    setting = row.setting if same_precision else fp32_setting(row)
    ref = reference.get((setting, row.batch, row.threads))
    if ref is None or row.p50_ms <= 0:
        return None
    if row.blocks_ms and len(row.blocks_ms) == len(ref.blocks_ms):
        return block_ratio(ref.blocks_ms, row.blocks_ms)
    gain = ref.p50_ms / row.p50_ms
    return Ratio(gain, gain, gain)


def slower_beyond_noise(ratio: Ratio | None) -> bool:
    """A speed-up below 1 by more than its measurement can blur: the block ratios' upper end
    below 1 (rows timed interleaved), or more than :data:`NOISE_LIMIT` slower (rows timed alone,
    which carry no spread)."""
    if ratio is None:
        return False
    if ratio.high > ratio.low:
        return ratio.high < 1.0
    return ratio.median < 1.0 / (1.0 + NOISE_LIMIT)


def mac_fraction(
    gain: float | None, model: str, reference: str, macs: Mapping[str, int | None] | None
) -> float | None:
    """Speed-up divided by the MAC ratio (1.0: latency fell as much as the arithmetic did);
    None where either MAC count or the speed-up is unknown."""
    own, ref = (macs or {}).get(model), (macs or {}).get(reference)
    return None if gain is None or not own or not ref else gain * own / ref


def row_flags(row: LatencyRow, fraction: float | None) -> list[str]:
    """``noisy``, ``preempted``, ``quick`` and ``implausible`` (speed-up above
    :data:`IMPLAUSIBLE_FACTOR` times the MAC ratio), those that apply."""
    flags = ["noisy"] if row.noisy else []
    flags += ["preempted"] if row.preempted else []
    flags += ["quick"] if row.quick else []
    return flags + (
        ["implausible"] if fraction is not None and fraction > IMPLAUSIBLE_FACTOR else []
    )


def annotated_rows(
    rows: Sequence[LatencyRow], macs: Mapping[str, int | None] | None = None
) -> list[dict[str, Any]]:
    """Each row's dict with its speed-up over the first model (median, low, high; an INT8 row
    over the first model at fp32), its speed-up per MAC ratio (against the first model at the
    row's own precision: what pruning bought) and its flags: what ``recede bench --json``
    writes per row. Beyond :func:`row_flags`: ``slower`` marks a row slower than the first
    model at its own precision beyond noise (a pruned model that lost speed), ``int8-slower``
    an INT8 row slower than its own model's fp32 row beyond noise."""
    reference = reference_rows(rows)
    own = {(r.setting, r.model, r.batch, r.threads): r for r in rows}
    out = []
    for r in rows:
        ratio = speedup_ratio(r, reference)
        pruning = speedup_ratio(r, reference, same_precision=True)  # what the cut bought
        fraction = mac_fraction(pruning and pruning.median, r.model, rows[0].model, macs)
        gain = {"speedup": None, "speedup_low": None, "speedup_high": None}
        if ratio is not None:
            gain = {"speedup": ratio.median, "speedup_low": ratio.low, "speedup_high": ratio.high}
        flags = row_flags(r, fraction)
        flags += ["slower"] * (r.model != rows[0].model and slower_beyond_noise(pruning))
        fp32 = own.get((fp32_setting(r), r.model, r.batch, r.threads))
        quantized = (
            speedup_ratio(r, {(fp32_setting(r), r.batch, r.threads): fp32}) if fp32 else None
        )
        flags += ["int8-slower"] * (r.precision == "int8" and slower_beyond_noise(quantized))
        out.append({**r.to_dict(), **gain, "speedup_per_mac_ratio": fraction, "flags": flags})
    return out


def _speedup_cell(row: Mapping[str, Any]) -> str:
    """``2.00×``, with the block ratios' quartiles when they differ: ``2.00× (1.91–2.07)``."""
    if row["speedup"] is None:
        return MISSING
    if row["speedup_high"] - row["speedup_low"] < 5e-3:
        return f"{row['speedup']:.2f}×"
    return f"{row['speedup']:.2f}× ({row['speedup_low']:.2f}–{row['speedup_high']:.2f})"


def latency_markdown(
    rows: Sequence[LatencyRow], *, macs: Mapping[str, int | None] | None = None
) -> str:
    """A Markdown table of ``rows`` in their order, with p50 speed-up over the first model.

    The speed-up is the median of per-block ratios where the rows were timed interleaved,
    with the range of those ratios, against the first model at fp32 (an INT8 row's speed-up is
    dense fp32 to that model in INT8); the speed-up ÷ MAC ratio compares with the first model at
    the row's own precision; the noise column is the row's relative spread
    (:attr:`LatencyRow.noise`); the flags column says ``noisy``, ``quick`` or ``implausible``.

    Args:
        rows: The measurements.
        macs: Model name to MACs per sample; when given for the reference and a row's model,
            a column divides the speed-up by the MAC ratio (1.0: latency fell as much as
            the arithmetic did).
    """
    ref_macs = (macs or {}).get(rows[0].model) if rows else None
    header = ["Backend", "Device", "Model", "Precision", "Batch", "Threads", "p50 ms", "p90 ms"]
    header += ["p99 ms"]
    header += ["Speed-up (p50)", "img/s", "Host↔device copies"]
    header += ["Speed-up ÷ MAC ratio"] if ref_macs else []
    header += ["Noise", "Flags"]
    body = []
    for r, a in zip(rows, annotated_rows(rows, macs), strict=True):
        threads = str(r.threads) if r.clock == "wall" else f"{r.threads} ({r.clock} clock)"
        cells = [_backend_cell(r), r.device, r.model, r.precision, str(r.batch), threads]
        cells += [f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}"]
        cells += [_speedup_cell(a), f"{r.throughput:,.0f}", _COPIES[r.copies]]
        if ref_macs:
            fraction = a["speedup_per_mac_ratio"]
            cells.append(MISSING if fraction is None else f"{fraction:.2f}")
        cells += [MISSING if r.noise is None else f"{r.noise:.0%}", ", ".join(a["flags"])]
        body.append(cells)
    align = ["---"] * 4 + ["---:"] * 7 + ["---"] + ["---:"] * (len(header) - 14) + ["---:", "---"]
    return _markdown(header, align, body)


def noise_note(rows: Sequence[LatencyRow]) -> str | None:
    """A warning naming the noisy and the preempted rows, or None when there are none."""
    noisy = [f"{r.setting} {r.model} batch {r.batch} ({r.noise:.0%})" for r in rows if r.noisy]
    preempted = [
        f"{r.setting} {r.model} batch {r.batch} (wall {r.wall_p50_ms:.3f} ms, cpu "
        f"{r.cpu_p50_ms:.3f} ms)"
        for r in rows
        if r.preempted
    ]
    notes = []
    if noisy:
        notes.append(
            f"{len(noisy)} of {len(rows)} rows are noisy (the middle half of their block "
            f"medians spans more than {NOISE_LIMIT:.0%} of the median): {'; '.join(noisy)}"
        )
    if preempted:
        notes.append(
            f"{len(preempted)} of {len(rows)} rows are preempted (wall time above "
            f"{PREEMPT_LIMIT}x the CPU time: they waited for a core): {'; '.join(preempted)}"
        )
    if not notes:
        return None
    return (
        f"{'; and '.join(notes)}; their latency measures the machine's load as much as the "
        "model: rerun on an idle machine, with more runs (--runs; bench.runs in a run config), "
        "or on the CPU clock with one thread (--threads 1 --clock cpu; bench.threads and "
        "bench.clock)"
    )


def gpu_vs_cpu_markdown(rows: Sequence[LatencyRow]) -> str | None:
    """Per model and batch: the fastest CPU row's p50 against every CUDA setting's p50.

    Returns:
        The Markdown table, or None when ``rows`` hold no pair of CPU and CUDA rows.
    """
    cuda_settings = list(dict.fromkeys(r.setting for r in rows if r.device == "cuda"))
    cells: dict[tuple[str, int], dict[str, LatencyRow]] = {}
    for r in rows:
        cells.setdefault((r.model, r.batch), {})[r.setting] = r
    body = []
    for (model, batch), by_setting in cells.items():
        cpu = [r for r in by_setting.values() if r.device == "cpu"]
        if not cpu or not any(s in by_setting for s in cuda_settings):
            continue
        best = min(cpu, key=lambda r: r.p50_ms)
        line = [model, str(batch), f"{best.p50_ms:.3f} ({best.setting})"]
        for setting in cuda_settings:
            gpu = by_setting.get(setting)
            line.append(
                MISSING if gpu is None else f"{gpu.p50_ms:.3f} ({best.p50_ms / gpu.p50_ms:.1f}×)"
            )
        body.append(line)
    if not body:
        return None
    header = [
        "Model",
        "Batch",
        "fastest CPU p50 ms",
        *(f"{s} p50 ms (speed-up)" for s in cuda_settings),
    ]
    return _markdown(header, ["---", "---:"] + ["---:"] * (len(header) - 2), body)
