"""Measure latency (PyTorch, ONNX Runtime, TensorRT) on CPU and GPU.

A sweep times every artefact under every available :class:`Setting` at every batch size: torch
eager on the CPU; on CUDA torch eager and CUDA-graph replay (a graph captured once with a
static input and replayed, as ``trtexec --useCudaGraph`` does, so Python and launch overhead
drop out), optionally in fp16; ONNX Runtime on the CPU and, when installed, its CUDA provider;
TensorRT when installed. CUDA rows time device-resident input by default and say so in the
``copies`` field. Timing itself lives in :mod:`pipeline.bench.timing`; what a sweep times is an
:class:`~pipeline.bench.artefacts.Artefact`; MACs and parameters are counted in :mod:`pipeline.graph.costs`.

The models of one setting and batch are timed interleaved (:mod:`pipeline.bench.interleave`): all
their runners are open at once and timed block by block, so a load change hits every model and
the speed-up is a median of per-block ratios. TensorRT rows are the exception: each engine is
built, timed and freed alone (two engines and their builders at once would not fit a small
GPU), so their speed-up is a plain p50 ratio with no spread.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bench.artefacts import Artefact
from pipeline.bench.backends import (
    DEVICES,
    bench_onnxruntime,
    bench_torch,
    engine_latency,
    onnxruntime_timer,
    ort_cuda_available,
    torch_timer,
)
from pipeline.bench.interleave import Timer, interleave
from pipeline.bench.timed_runs import HostTimer
from pipeline.bench.timing import (
    MIN_RUNS,
    QUICK_MIN_RUNS,
    LatencyRow,
    Setting,
    annotated_rows,
    check_clock,
)
from pipeline.core.environment import environment

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class SweepConfig:
    """Batch sizes, CPU threads, timed and warm-up runs per row, and the clock of CPU rows.

    ``runs`` below :data:`~pipeline.bench.timing.MIN_RUNS` (down to
    :data:`~pipeline.bench.timing.QUICK_MIN_RUNS`) is a quick look: allowed, and its rows are marked
    ``quick``. ``clock="cpu"`` (one thread only) times CPU rows on the thread's CPU clock
    (:data:`~pipeline.bench.timing.CLOCKS`); CUDA rows always time elapsed time.
    """

    batches: tuple[int, ...] = (1, 32)
    threads: int = 2
    runs: int = MIN_RUNS
    warmup: int = 10
    clock: str = "wall"

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1 or self.threads < 1 or self.warmup < 0:
            raise ValueError(
                f"expected batch sizes >= 1 (at least one), threads >= 1 and warmup >= 0; got "
                f"batches={self.batches}, threads={self.threads}, warmup={self.warmup}"
            )
        check_clock(self.clock, self.threads)
        if self.runs < QUICK_MIN_RUNS:
            raise ValueError(
                f"expected runs >= {QUICK_MIN_RUNS} timed runs ({MIN_RUNS} or more for figures "
                f"to report), got runs={self.runs}"
            )


def plan_settings(
    *,
    backends: Sequence[str] = BACKENDS,
    devices: Sequence[str] = DEVICES,
    cuda: bool = False,
    ort_cuda: bool = False,
    tensorrt: bool = False,
    fp16: bool = False,
    copies: bool = False,
) -> list[Setting]:
    """Every setting that can run here, CPU first.

    Args:
        backends: Which of :data:`BACKENDS` to use.
        devices: Which of ``("cpu", "cuda")`` to use.
        cuda: A CUDA GPU is usable by torch.
        ort_cuda: ONNX Runtime has its CUDA execution provider.
        tensorrt: TensorRT is usable.
        fp16: Add fp16 rows on CUDA (torch eager and graph, TensorRT).
        copies: CUDA rows include host-to-device and device-to-host copies (TensorRT rows
            always time device-resident data and say so).
    """
    unknown = sorted(set(backends) - set(BACKENDS)) + sorted(set(devices) - set(DEVICES))
    if unknown:
        raise ValueError(
            f"expected backends among {BACKENDS} and devices among {DEVICES}, got unknown {unknown}"
        )
    precisions = ("fp32", "fp16") if fp16 else ("fp32",)
    settings = [Setting("torch", "cpu", "eager"), Setting("onnxruntime", "cpu", "session")]
    if cuda:
        for precision in precisions:
            settings += [
                Setting("torch", "cuda", mode, precision, copies)
                for mode in ("eager", "cuda-graph")
            ]
        settings += [Setting("onnxruntime", "cuda", "session", "fp32", copies)] if ort_cuda else []
        if tensorrt:
            settings += [Setting("tensorrt", "cuda", "engine", p, False) for p in precisions]
    return [s for s in settings if s.backend in backends and s.device in devices]


def bench_tensorrt(artefact: Artefact, s: Setting, cfg: SweepConfig, batch: int) -> LatencyRow:
    """Build an engine tuned for ``batch`` (in a temporary folder) and time it on device data;
    an INT8 (QDQ) artefact builds an INT8 engine and its row says ``int8``."""
    from pipeline.export.tensorrt import build_engine

    with tempfile.TemporaryDirectory(prefix="recede-trt-") as tmp:
        engine = Path(tmp) / f"{artefact.label}-b{batch}.engine"
        fp16 = s.precision == "fp16"
        build_engine(artefact.onnx, engine, fp16=fp16, max_batch=max(cfg.batches), opt_batch=batch)
        p50, p90, p99 = engine_latency(
            engine, artefact.input_shape, batch=batch, runs=cfg.runs, warmup=cfg.warmup
        )
    return LatencyRow(
        backend="tensorrt",
        device="cuda",
        model=artefact.label,
        batch=batch,
        threads=cfg.threads,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mode="engine",
        precision="int8" if artefact.precision == "int8" else s.precision,
        copies=False,
        runs=cfg.runs,
        warmup=cfg.warmup,
    )


def measure(artefact: Artefact, s: Setting, cfg: SweepConfig, batch: int) -> LatencyRow:
    """One row: ``artefact`` under setting ``s`` at ``batch``, timed alone."""
    common = {"batch": batch, "threads": cfg.threads, "runs": cfg.runs, "warmup": cfg.warmup}
    if s.backend == "torch":
        return bench_torch(
            artefact.model, artefact.input_shape, label=artefact.label, setting=s, **common
        )
    if s.backend == "onnxruntime":
        return bench_onnxruntime(
            artefact.onnx,
            artefact.input_shape,
            label=artefact.label,
            device=s.device,
            copies=bool(s.copies),
            **common,
        )
    return bench_tensorrt(artefact, s, cfg, batch)


INT8_SETTINGS = (("onnxruntime", "cpu", "fp32"), ("tensorrt", "cuda", "fp32"))
"""Where a QDQ INT8 graph runs: ONNX Runtime's CPU provider, and TensorRT, which builds it by
explicit quantization (once, under the fp32 setting: its precision comes from the graph)."""


def runnable(artefact: Artefact, s: Setting) -> bool:
    """Whether ``artefact`` has what setting ``s`` needs (a torch model, or an ONNX file; an
    INT8 graph: one of :data:`INT8_SETTINGS`)."""
    if artefact.precision == "int8" and (s.backend, s.device, s.precision) not in INT8_SETTINGS:
        return False
    return (artefact.model if s.backend == "torch" else artefact.onnx) is not None


Measure = Callable[[Artefact, Setting, SweepConfig, int], LatencyRow]


@contextmanager
def open_timer(
    artefact: Artefact, s: Setting, cfg: SweepConfig, batch: int
) -> Iterator[tuple[Timer, str]]:
    """A timer of ``artefact`` under the torch or ONNX Runtime setting ``s``, and the
    precision its rows carry."""
    if s.backend == "torch":
        target = {"batch": batch, "threads": cfg.threads, "setting": s, "clock": cfg.clock}
        with torch_timer(artefact.model, artefact.input_shape, **target) as timer:
            yield timer, s.precision
    elif s.backend == "onnxruntime":
        target = {"batch": batch, "threads": cfg.threads, "device": s.device, "clock": cfg.clock}
        with onnxruntime_timer(
            artefact.onnx, artefact.input_shape, copies=bool(s.copies), **target
        ) as (timer, precision):
            yield timer, artefact.precision if artefact.precision != "fp32" else precision
    else:
        raise ValueError(f"expected a torch or onnxruntime setting, got {s.backend!r}")


OpenTimer = Callable[
    [Artefact, Setting, SweepConfig, int], AbstractContextManager[tuple[Timer, str]]
]


def measure_interleaved(
    artefacts: Sequence[Artefact],
    s: Setting,
    cfg: SweepConfig,
    batch: int,
    open_fn: OpenTimer = open_timer,
) -> list[LatencyRow]:
    """One row per artefact under setting ``s`` at ``batch``, all timed in the same
    alternating blocks (:func:`pipeline.bench.interleave.interleave`)."""
    with ExitStack() as stack:
        opened = [stack.enter_context(open_fn(a, s, cfg, batch)) for a in artefacts]
        blocks = interleave([t for t, _ in opened], runs=cfg.runs, warmup=cfg.warmup)
    labels = {"backend": s.backend, "device": s.device, "mode": s.mode, "batch": batch}
    labels |= {"threads": cfg.threads, "copies": s.copies, "warmup": cfg.warmup}
    labels |= {"clock": cfg.clock if s.device == "cpu" else "wall"}
    return [
        LatencyRow.from_blocks(
            b, model=a.label, precision=precision, **labels, **_clock_p50s(timer, cfg.runs)
        )
        for a, (timer, precision), b in zip(artefacts, opened, blocks, strict=True)
    ]


def _clock_p50s(timer: Timer, runs: int) -> dict[str, float]:
    """A one-thread CPU timer's wall and CPU medians (:class:`HostTimer`), else none."""
    return timer.clock_p50s(runs) if isinstance(timer, HostTimer) else {}


def sweep(
    artefacts: Sequence[Artefact],
    settings: Sequence[Setting],
    cfg: SweepConfig,
    open_fn: OpenTimer = open_timer,
    measure_fn: Measure | None = None,
) -> list[LatencyRow]:
    """Rows for every batch, setting and artefact that can run it, in that nesting order (so
    the models of one setting and batch sit together, and are timed interleaved).

    Args:
        artefacts: The models; the first is the reference of every speed-up.
        settings: What to run them under.
        cfg: Batches, threads, runs.
        open_fn: Opens a model's timer (tests pass a fake clock).
        measure_fn: Times one model alone, for TensorRT rows; None for :func:`measure`.
    """
    start = time.perf_counter()
    logger.info(
        "latency sweep started: models %s, %d settings, batches %s, %d threads, %d runs",
        [a.label for a in artefacts],
        len(settings),
        cfg.batches,
        cfg.threads,
        cfg.runs,
    )
    from pipeline.core.progress import progress  # tqdm: measure() alone runs without it

    rows = []
    total = len(cfg.batches) * len(settings)
    bar = progress((), "latency sweep", total=total, unit="setting")  # updated by hand
    for batch in cfg.batches:
        for s in settings:
            bar.set_postfix_str(f"batch {batch}, {s.backend} {s.device} {s.mode}")
            group = [a for a in artefacts if runnable(a, s)]
            if s.backend == "tensorrt":
                rows += [(measure_fn or measure)(a, s, cfg, batch) for a in group]
            elif group:
                rows += measure_interleaved(group, s, cfg, batch, open_fn)
            bar.update()
    bar.close()
    logger.info("latency sweep finished in %.1f s: %d rows", time.perf_counter() - start, len(rows))
    return rows


def available_settings(**options: Any) -> list[Setting]:
    """:func:`plan_settings` for this machine (GPU, ONNX Runtime CUDA, TensorRT detected)."""
    import torch

    from pipeline.export.tensorrt import tensorrt_available

    cuda = torch.cuda.is_available()
    return plan_settings(
        cuda=cuda,
        ort_cuda=cuda and ort_cuda_available(),
        tensorrt=cuda and tensorrt_available(),
        **options,
    )


def latency_table(
    models: Mapping[str, nn.Module],
    onnx_paths: Mapping[str, Path],
    input_shape: tuple[int, ...],
    *,
    batches: Sequence[int] = (1, 32),
    threads: int = 2,
    runs: int = MIN_RUNS,
    warmup: int = 10,
    clock: str = "wall",
    int8_paths: Mapping[str, Path] | None = None,
) -> list[LatencyRow]:
    """Latency of every model under every available setting and batch (the ``recede run``
    table): a :func:`sweep` over every setting :func:`available_settings` finds, fp32,
    device-resident on CUDA, and each model's INT8 graph on ONNX Runtime's CPU provider, timed
    interleaved with the fp32 graphs.

    Args:
        models: Label (``"dense"``, ``"pruned"``) to network.
        onnx_paths: Label to its ONNX file.
        input_shape: Per-sample shape, e.g. ``(3, 32, 32)``.
        batches: Batch sizes to time.
        threads: CPU threads for PyTorch and ONNX Runtime.
        runs: Timed runs per row; at least 5 (below 50 the rows are marked ``quick``).
        warmup: Untimed runs before each row.
        clock: ``wall`` or ``cpu`` (one thread only) for CPU rows (see :class:`SweepConfig`).
        int8_paths: Label to its INT8 ONNX file (rows with precision ``int8``).

    Raises:
        ValueError: If ``runs < 5``, ``batches`` is empty or the clock cannot time ``threads``.
    """
    cfg = SweepConfig(tuple(batches), threads, runs, warmup, clock)
    artefacts = [
        Artefact(label, "in memory", tuple(input_shape), models.get(label), onnx_paths.get(label))
        for label in dict.fromkeys([*models, *onnx_paths])
    ]
    artefacts += [
        Artefact(label, str(path), tuple(input_shape), None, path, precision="int8")
        for label, path in (int8_paths or {}).items()
    ]
    return sweep(artefacts, available_settings(), cfg)


def bench_report(
    rows: Sequence[LatencyRow], artefacts: Sequence[Artefact], cfg: SweepConfig
) -> dict[str, Any]:
    """What ``recede bench --json`` writes: models, sweep settings, rows and environment."""
    models = [
        {
            "label": a.label,
            "source": a.source,
            "onnx": None if a.onnx is None else str(a.onnx),
            "input_shape": list(a.input_shape),
            "macs": a.macs,
        }
        for a in artefacts
    ]
    return {
        "models": models,
        "sweep": {
            "batches": list(cfg.batches),
            "threads": cfg.threads,
            "runs": cfg.runs,
            "warmup": cfg.warmup,
        },
        "rows": annotated_rows(rows, {a.label: a.macs for a in artefacts}),
        "environment": environment(),
    }


def bench_markdown(report: Mapping[str, Any]) -> str:
    """Render :func:`bench_report` output: models, latency, GPU vs CPU, environment."""
    from pipeline.bench.timing import MISSING, gpu_vs_cpu_markdown, latency_markdown, noise_note

    models = report["models"]
    lines = ["| Model | Source | ONNX | Input | MACs per sample |", "|---|---|---|---|---:|"]
    for m in models:
        macs = MISSING if m["macs"] is None else f"{m['macs']:,}"
        shape = "×".join(str(d) for d in m["input_shape"])
        lines.append(
            f"| {m['label']} | {m['source']} | {m['onnx'] or MISSING} | {shape} | {macs} |"
        )
    rows = [LatencyRow.from_mapping(r) for r in report["rows"]]
    sweep_cfg = report["sweep"]
    notes = [
        f"{sweep_cfg['runs']} timed runs after {sweep_cfg['warmup']} warm-up runs per row, "
        f"the models of a row group timed in alternating blocks; speed-up is against "
        f"{models[0]['label']}: the median of the per-block ratios (their quartiles in brackets)."
    ]
    notes += [f"**Quick look** (runs < {MIN_RUNS}): not figures to report."] * any(
        r.quick for r in rows
    )
    notes += [f"**Warning:** {note}"] if (note := noise_note(rows)) else []
    sections = [
        "## Models\n\n" + "\n".join(lines),
        "## Latency\n\n"
        + "\n\n".join(notes)
        + "\n\n"
        + latency_markdown(rows, macs={m["label"]: m["macs"] for m in models}),
    ]
    versus = gpu_vs_cpu_markdown(rows)
    if versus is not None:
        sections.append("## GPU vs CPU (p50)\n\n" + versus)
    env = "\n".join(f"- **{k}**: {v}" for k, v in report["environment"].items())
    return "\n\n".join([*sections, "## Environment\n\n" + env]) + "\n"
