"""Run one model on one backend and time it: PyTorch (eager, CUDA graph), ONNX Runtime.

PyTorch on CUDA is timed with CUDA events; a CUDA-graph row captures the forward once on a
static input and replays it (as ``trtexec --useCudaGraph`` does), after checking that the
replay gives the eager output. ONNX Runtime is timed on the host clock. TensorRT engines are
built and timed by :mod:`pipeline.export.tensorrt`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bench.interleave import Timer
from pipeline.bench.timed_runs import HostTimer, cuda_event_samples_ms, time_callable
from pipeline.bench.timing import MIN_RUNS, LatencyRow, Setting

if TYPE_CHECKING:
    import torch
    from torch import nn

DEVICES = ("cpu", "cuda")
_GRAPH_RTOL = {"fp32": 1e-4, "fp16": 1e-2}  # replay vs eager, relative to the output scale


class ReplayMismatchError(RuntimeError):
    """A captured CUDA graph's output differs from eager execution of the same model."""


def _check_target(device: str, batch: int, threads: int) -> None:
    if device not in DEVICES or batch < 1 or threads < 1:
        raise ValueError(
            f"expected device in {DEVICES}, batch >= 1 and threads >= 1; got device={device!r}, "
            f"batch={batch}, threads={threads}"
        )


def check_replay(out: Any, ref: Any, precision: str) -> None:
    """Raise :class:`ReplayMismatchError` when a CUDA graph's output ``out`` differs from the
    eager ``ref`` by more than the replay tolerance of ``precision`` (of the output scale; of
    each output's own scale for a model with several, ``pipeline.core.outputs``)."""
    from pipeline.core.numerics import rel_err
    from pipeline.core.outputs import map_leaves

    rel = rel_err(map_leaves(lambda t: t.float(), out), map_leaves(lambda t: t.float(), ref))
    if not rel <= _GRAPH_RTOL[precision]:  # NaN fails too
        raise ReplayMismatchError(
            f"CUDA graph replay differs from eager execution by {rel:.1e} of the output "
            f"scale (> {_GRAPH_RTOL[precision]:.0e}); the forward is not capturable (host syncs "
            "or data-dependent control flow); time it without --backends torch on CUDA"
        )


def _graph_runner(net: nn.Module, x: torch.Tensor, precision: str) -> Callable[[], torch.Tensor]:
    """Capture ``net(x)`` into a CUDA graph (static input ``x``); returns its replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as capture requires
        for _ in range(3):
            ref = net(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = net(x)
    graph.replay()
    torch.cuda.synchronize()
    check_replay(out, ref, precision)

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def _torch_runner(net: nn.Module, shape: tuple[int, ...], s: Setting) -> Callable[[], Any]:
    """A zero-argument forward pass of ``net`` on a fixed random batch under setting ``s``."""
    import torch

    from pipeline.core.outputs import map_leaves

    dtype = torch.float16 if s.precision == "fp16" else torch.float32
    host = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    if s.device == "cpu":
        return lambda: net(host)
    x = host.to("cuda")
    run = _graph_runner(net, x, s.precision) if s.mode == "cuda-graph" else lambda: net(x)
    if not s.copies:
        return run
    host = host.pin_memory()

    def with_copies() -> torch.Tensor:
        x.copy_(host, non_blocking=True)  # into the static input the graph (or eager) reads
        return map_leaves(lambda t: t.to("cpu"), run())  # every output, however many

    return with_copies


@contextmanager
def torch_timer(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch: int,
    threads: int,
    setting: Setting,
    clock: str = "wall",
) -> Iterator[Timer]:
    """A :data:`~pipeline.bench.interleave.Timer` of PyTorch inference of a copy of ``model``.

    While the context is open torch uses ``threads`` CPU threads (restored on exit) and runs in
    inference mode, so several timers can be open at once and timed in alternation. ``clock``
    times CPU runs (:data:`~pipeline.bench.timing.CLOCKS`); CUDA runs use CUDA events. A
    one-thread CPU timer is a :class:`~pipeline.bench.timed_runs.HostTimer` that reads both clocks
    (torch computes in the calling thread then).
    """
    import torch

    s = setting
    _check_target(s.device, batch, threads)
    if s.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' needs a CUDA GPU, but torch.cuda.is_available() is False")
    dtype = torch.float16 if s.precision == "fp16" else torch.float32
    with torch.inference_mode(False):  # another open timer may hold inference mode on
        net = copy.deepcopy(model).eval().to(device=s.device, dtype=dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            fn = _torch_runner(net, (batch, *input_shape), s)
            if s.device == "cuda":
                yield lambda n: cuda_event_samples_ms(fn, warmup=0, runs=n) if n else []
            else:
                yield HostTimer(fn, clock=clock, both=threads == 1)
    finally:
        torch.set_num_threads(previous)


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
    setting: Setting | None = None,
) -> LatencyRow:
    """Time PyTorch inference of a copy of ``model`` in eval mode, alone (see
    :func:`torch_timer`; ``pipeline.bench.sweep.sweep`` times several models interleaved).

    Args:
        model: The network; it is copied, so its mode, dtype and device are left alone.
        input_shape: Per-sample shape, e.g. ``(3, 32, 32)``.
        batch: Batch size.
        threads: ``torch.set_num_threads`` during the measurement (restored after).
        device: ``"cpu"`` or ``"cuda"`` (for eager fp32; ``setting`` overrides it).
        runs: Timed runs.
        warmup: Untimed runs first.
        label: Model name for the row.
        setting: Device, mode (``eager``/``cuda-graph``), precision and copies; None for
            eager fp32 on ``device`` with device-resident input.

    Returns:
        The latency row; CUDA rows are timed with CUDA events.
    """
    s = setting or Setting("torch", device, "eager", "fp32", None if device == "cpu" else False)
    with torch_timer(model, input_shape, batch=batch, threads=threads, setting=s) as timer:
        timer(warmup)
        samples = timer(runs)
    fields = {"backend": "torch", "device": s.device, "mode": s.mode, "precision": s.precision}
    fields |= timer.clock_p50s(runs) if isinstance(timer, HostTimer) else {}
    return LatencyRow.from_samples(
        samples,
        **fields,
        model=label,
        batch=batch,
        threads=threads,
        copies=s.copies,
        warmup=warmup,
    )


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


def _ort_runner(session: Any, x: Any, device: str, copies: bool) -> Callable[[], Any]:
    """A zero-argument call running ``session`` on ``x``; on CUDA without ``copies`` the input
    and output stay on the GPU (I/O binding)."""
    name = session.get_inputs()[0].name
    if device == "cpu" or copies:
        return lambda: session.run(None, {name: x})
    ort = _import_onnxruntime()
    binding = session.io_binding()
    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")
    # run_with_iobinding synchronises the CUDA provider before returning.
    return lambda: session.run_with_iobinding(binding)


@contextmanager
def onnxruntime_timer(
    onnx_path: str | Path,
    input_shape: tuple[int, ...],
    *,
    batch: int,
    threads: int,
    device: str = "cpu",
    copies: bool = False,
    clock: str = "wall",
) -> Iterator[tuple[Timer, str]]:
    """A :data:`~pipeline.bench.interleave.Timer` of an ONNX Runtime session (all graph
    optimisations, sequential execution) on a fixed random batch, and the graph's precision
    (``fp32``, or ``fp16`` when its input is float16). ``clock`` times CPU sessions (with one
    intra-op thread the session computes in the calling thread, and the timer reads both
    clocks); CUDA sessions use the wall clock."""
    import numpy as np

    _check_target(device, batch, threads)
    session = _ort_session(onnx_path, threads, device)
    fp16 = session.get_inputs()[0].type == "tensor(float16)"
    x = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
    fn = _ort_runner(session, x.astype(np.float16) if fp16 else x, device, copies)
    if device == "cpu":
        yield HostTimer(fn, clock=clock, both=threads == 1), ("fp16" if fp16 else "fp32")
    else:
        yield HostTimer(fn), ("fp16" if fp16 else "fp32")


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
    copies: bool = False,
) -> LatencyRow:
    """Time ONNX Runtime inference of one graph alone (see :func:`onnxruntime_timer`).

    Args:
        onnx_path: ONNX file with a batch axis that accepts ``batch``.
        input_shape: Per-sample shape, e.g. ``(3, 32, 32)``.
        batch: Batch size.
        threads: ``intra_op_num_threads`` (inter-op is 1).
        runs: Timed runs.
        warmup: Untimed runs first.
        label: Model name for the row.
        device: ``"cpu"``, or ``"cuda"`` for the CUDA execution provider.
        copies: On CUDA, pass host arrays (the provider copies in and out) instead of binding
            device-resident input and output.

    Returns:
        The latency row (host clock; the input's dtype, fp32 or fp16, is the graph's).
    """
    target = {"batch": batch, "threads": threads, "device": device, "copies": copies}
    with onnxruntime_timer(onnx_path, input_shape, **target) as (timer, precision):
        timer(warmup)
        samples = timer(runs)
        clocks = timer.clock_p50s(runs)
    return LatencyRow.from_samples(
        samples,
        backend="onnxruntime",
        device=device,
        model=label,
        batch=batch,
        threads=threads,
        mode="session",
        precision=precision,
        copies=None if device == "cpu" else copies,
        warmup=warmup,
        **clocks,
    )


def engine_latency(
    engine_path: str | Path,
    input_shape: Sequence[int],
    *,
    batch: int = 1,
    runs: int = 50,
    warmup: int = 10,
) -> tuple[float, float, float]:
    """Time an engine on random input, synchronising the GPU after every run.

    Args:
        engine_path: Serialised engine from :func:`build_engine`.
        input_shape: Per-sample shape ``(C, H, W)``.
        batch: Batch size; must lie within the engine's profile.
        runs: Timed runs after warm-up.
        warmup: Untimed runs first.

    Returns:
        ``(p50, p90, p99)`` latency in milliseconds.
    """
    import torch

    from pipeline.export.tensorrt import TrtRunner

    runner = TrtRunner(engine_path)
    x = torch.randn(batch, *input_shape, device="cuda").to(runner.input_dtype)
    return time_callable(lambda: runner(x), warmup=warmup, runs=runs, sync=torch.cuda.synchronize)
