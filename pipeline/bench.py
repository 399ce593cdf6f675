"""Measure latency (PyTorch eager, ONNX Runtime, TensorRT), MACs and parameters of a model.

Latency is reported as p50/p90/p99 over at least 50 timed runs after warm-up, one row per
(backend, device, model, batch, threads). Each timed run ends with a device synchronisation, so
it measures the full forward pass, not the time to enqueue it.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.export.manifest import package_version

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

MIN_RUNS = 50
BACKENDS = ("torch", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class LatencyRow:
    """One latency measurement.

    Attributes:
        backend: ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``.
        device: ``"cpu"`` or ``"cuda"``.
        model: Which model was timed, e.g. ``"dense"`` or ``"pruned"``.
        batch: Batch size.
        threads: CPU threads the backend was allowed (intra-op).
        p50_ms: Median latency in milliseconds.
        p90_ms: 90th percentile latency in milliseconds.
        p99_ms: 99th percentile latency in milliseconds.
    """

    backend: str
    device: str
    model: str
    batch: int
    threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float

    def to_dict(self) -> dict[str, Any]:
        """The row as a plain dict, e.g. for JSON."""
        return asdict(self)

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> LatencyRow:
        """Rebuild a row from :meth:`to_dict` output (extra keys are ignored)."""
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


def percentiles_ms(samples_s: Sequence[float]) -> tuple[float, float, float]:
    """p50, p90 and p99 of durations in seconds, in milliseconds (linear interpolation).

    Raises:
        ValueError: If there are no samples.
    """
    import numpy as np

    if len(samples_s) == 0:
        raise ValueError("expected at least one timing sample, got none; use runs >= 1")
    p50, p90, p99 = np.percentile(np.asarray(samples_s, dtype=np.float64) * 1e3, [50, 90, 99])
    return float(p50), float(p90), float(p99)


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int,
    runs: int,
    sync: Callable[[], Any] | None = None,
) -> tuple[float, float, float]:
    """Call ``fn`` ``warmup`` times untimed, then time ``runs`` calls one by one.

    Args:
        fn: The work to time.
        warmup: Untimed calls first (allocator, autotuning and caches settle).
        runs: Timed calls.
        sync: Called after every call, inside the timed region (e.g.
            ``torch.cuda.synchronize``); None for synchronous work.

    Returns:
        ``(p50, p90, p99)`` in milliseconds.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"expected runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append(time.perf_counter() - start)
    return percentiles_ms(samples)


def _check_target(device: str, batch: int, threads: int) -> None:
    if device not in DEVICES or batch < 1 or threads < 1:
        raise ValueError(
            f"expected device in {DEVICES}, batch >= 1 and threads >= 1; got device={device!r}, "
            f"batch={batch}, threads={threads}"
        )


def bench_torch(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch: int,
    threads: int,
    device: str = "cpu",
    runs: int = MIN_RUNS,
    warmup: int = 10,
    label: str = "dense",
) -> LatencyRow:
    """Time eager PyTorch inference of a copy of ``model`` in eval mode.

    Args:
        model: The network; it is copied, so its mode and device are left alone.
        input_shape: Per-sample shape, e.g. ``(3, 32, 32)``.
        batch: Batch size.
        threads: ``torch.set_num_threads`` during the measurement (restored after).
        device: ``"cpu"`` or ``"cuda"``.
        runs: Timed runs.
        warmup: Untimed runs first.
        label: Model name for the row.

    Returns:
        The latency row.
    """
    import torch

    _check_target(device, batch, threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' needs a CUDA GPU, but torch.cuda.is_available() is False")
    net = copy.deepcopy(model).eval().to(device)
    x = torch.randn(batch, *input_shape, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            p50, p90, p99 = time_callable(lambda: net(x), warmup=warmup, runs=runs, sync=sync)
    finally:
        torch.set_num_threads(previous)
    return LatencyRow("torch", device, label, batch, threads, p50, p90, p99)


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            f"ONNX Runtime benchmarks need onnxruntime ({err}); run pip install 'recede[onnx]'"
        ) from err
    return onnxruntime


def ort_cuda_available() -> bool:
    """Whether onnxruntime is installed with a usable CUDA execution provider."""
    try:
        ort = _import_onnxruntime()
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _ort_session(onnx_path: str | Path, threads: int, device: str) -> Any:
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if not ort_cuda_available():
            raise RuntimeError(
                "onnxruntime has no CUDAExecutionProvider here; install onnxruntime-gpu "
                "and run on a machine with a CUDA GPU, or use device='cpu'"
            )
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)


def _ort_runner(session: Any, x: Any, device: str) -> Callable[[], Any]:
    """A zero-argument call running ``session`` on ``x``; CUDA keeps data on the GPU."""
    name = session.get_inputs()[0].name
    if device == "cpu":
        return lambda: session.run(None, {name: x})
    ort = _import_onnxruntime()
    binding = session.io_binding()
    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")
    # run_with_iobinding synchronises the CUDA provider before returning.
    return lambda: session.run_with_iobinding(binding)


def bench_onnxruntime(
    onnx_path: str | Path,
    input_shape: tuple[int, ...],
    *,
    batch: int,
    threads: int,
    runs: int = MIN_RUNS,
    warmup: int = 10,
    label: str = "dense",
    device: str = "cpu",
) -> LatencyRow:
    """Time ONNX Runtime inference (all graph optimisations, sequential execution).

    Args:
        onnx_path: ONNX file with a batch axis that accepts ``batch``.
        input_shape: Per-sample shape, e.g. ``(3, 32, 32)``.
        batch: Batch size.
        threads: ``intra_op_num_threads`` (inter-op is 1).
        runs: Timed runs.
        warmup: Untimed runs first.
        label: Model name for the row.
        device: ``"cpu"``, or ``"cuda"`` for the CUDA execution provider with I/O bound on GPU.

    Returns:
        The latency row.
    """
    import numpy as np

    _check_target(device, batch, threads)
    session = _ort_session(onnx_path, threads, device)
    x = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
    fn = _ort_runner(session, x, device)
    p50, p90, p99 = time_callable(fn, warmup=warmup, runs=runs)
    return LatencyRow("onnxruntime", device, label, batch, threads, p50, p90, p99)


def _tensorrt_rows(
    onnx_paths: Mapping[str, Path],
    input_shape: tuple[int, ...],
    batches: Sequence[int],
    threads: int,
    runs: int,
    warmup: int,
) -> list[LatencyRow]:
    """One engine per (model, batch), tuned for that batch, built in a temporary directory."""
    from pipeline.export.tensorrt import build_engine, engine_latency

    rows = []
    with tempfile.TemporaryDirectory(prefix="recede-trt-") as tmp:
        for label, onnx_path in onnx_paths.items():
            for batch in batches:
                engine = Path(tmp) / f"{label}-b{batch}.engine"
                build_engine(onnx_path, engine, max_batch=max(batches), opt_batch=batch)
                p = engine_latency(engine, input_shape, batch=batch, runs=runs, warmup=warmup)
                rows.append(LatencyRow("tensorrt", "cuda", label, batch, threads, *p))
    return rows


def _device_rows(
    device: str,
    models: Mapping[str, nn.Module],
    onnx_paths: Mapping[str, Path],
    input_shape: tuple[int, ...],
    batches: Sequence[int],
    **common: int,
) -> list[LatencyRow]:
    """Torch and ONNX Runtime rows on one device, ordered by batch then model."""
    with_ort = device == "cpu" or ort_cuda_available()
    if not with_ort and onnx_paths:
        logger.info("onnxruntime has no CUDA provider; skipping ONNX Runtime rows on cuda")
    rows = []
    for batch in batches:
        for label in dict.fromkeys([*models, *onnx_paths]):
            where = {"batch": batch, "device": device, "label": label, **common}
            if label in models:
                rows.append(bench_torch(models[label], input_shape, **where))
            if label in onnx_paths and with_ort:
                rows.append(bench_onnxruntime(onnx_paths[label], input_shape, **where))
    return rows


def latency_table(
    models: Mapping[str, nn.Module],
    onnx_paths: Mapping[str, Path],
    input_shape: tuple[int, ...],
    *,
    batches: Sequence[int] = (1, 32),
    threads: int = 2,
    runs: int = MIN_RUNS,
    warmup: int = 10,
) -> list[LatencyRow]:
    """Latency of every model under every available backend, device and batch size.

    On the CPU: PyTorch eager for each entry of ``models`` and ONNX Runtime for each entry of
    ``onnx_paths``. With a CUDA GPU, also PyTorch on CUDA, ONNX Runtime's CUDA provider when
    installed, and TensorRT when installed.

    Args:
        models: Label (``"dense"``, ``"pruned"``) to network.
        onnx_paths: Label to its ONNX file.
        input_shape: Per-sample shape, e.g. ``(3, 32, 32)``.
        batches: Batch sizes to time.
        threads: CPU threads for PyTorch and ONNX Runtime.
        runs: Timed runs per row; at least 50.
        warmup: Untimed runs before each row.

    Returns:
        The rows, CPU first.

    Raises:
        ValueError: If ``runs < 50`` or ``batches`` is empty.
    """
    import torch

    from pipeline.export.tensorrt import tensorrt_available

    if runs < MIN_RUNS or not batches:
        raise ValueError(
            f"expected runs >= {MIN_RUNS} timed runs and at least one batch size, "
            f"got runs={runs}, batches={tuple(batches)}"
        )
    start = time.perf_counter()
    logger.info(
        "latency table started: models %s, batches %s, %d threads, %d runs",
        list(dict.fromkeys([*models, *onnx_paths])),
        tuple(batches),
        threads,
        runs,
    )
    common = {"threads": threads, "runs": runs, "warmup": warmup}
    rows = _device_rows("cpu", models, onnx_paths, input_shape, batches, **common)
    if torch.cuda.is_available():
        rows += _device_rows("cuda", models, onnx_paths, input_shape, batches, **common)
        if tensorrt_available() and onnx_paths:
            rows += _tensorrt_rows(onnx_paths, input_shape, batches, threads, runs, warmup)
    logger.info("latency table finished in %.1f s: %d rows", time.perf_counter() - start, len(rows))
    return rows


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one sample, in eval mode.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs // 2), which counts matrix
    multiplies and convolutions; elementwise ops, norms and pooling are not counted.

    Args:
        model: The network; a copy is run, so its mode is left alone.
        input_shape: Per-sample shape, e.g. ``(3, 32, 32)``.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(model).eval()
    param = next(net.parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return int(counter.get_total_flops()) // 2


def _cpu_description() -> str:
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next(
                (ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores available"


def environment() -> dict[str, Any]:
    """Versions and hardware that latency numbers depend on.

    Returns:
        ``torch``, ``onnxruntime`` (None if absent), ``python``, ``cpu`` (model and usable
        core count), ``cuda`` (GPU name, None without one) and ``platform``.
    """
    import torch

    return {
        "torch": torch.__version__,
        "onnxruntime": package_version("onnxruntime", "onnxruntime-gpu"),
        "python": platform.python_version(),
        "cpu": _cpu_description(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }
