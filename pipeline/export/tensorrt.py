"""Build a TensorRT engine from an ONNX file, run it on torch CUDA tensors, and time it.

Written against the TensorRT 10 Python API (named I/O tensors, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``): ``OnnxParser`` with its errors reported, one
optimisation profile over the dynamic batch axis, FP16, INT8 by **explicit quantization** (the
ONNX file is a QDQ graph from ``pipeline.export.int8``: TensorRT keeps its scales, and the
network is strongly typed where TensorRT has that flag, as its documentation asks, so no
precision flag is set), a timing cache that is loaded and saved, and verification: fp32 and fp16
engines against PyTorch under ``pipeline.core.tolerance``, INT8 engines by their agreement with
the fp32 graph on held-out samples (``pipeline.export.int8_check``). The implicit
``IInt8EntropyCalibrator2`` path (deprecated since TensorRT 10.1) is gone: one QDQ file serves
ONNX Runtime and TensorRT alike.
TensorRT and a CUDA GPU are optional: without them every entry point raises a
:class:`RuntimeError` that says what to install, and nothing else in recede is affected.
``tensorrt`` is imported only inside the functions that use it; the batching, profile and cache
logic around it is plain Python, tested on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.atomic import atomic_path
from pipeline.core.tolerance import Tolerance, tolerance_for
from pipeline.export.int8 import is_qdq

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from pipeline.core.checks import Check
    from pipeline.data.calibration import Int8Samples
    from pipeline.export.int8_check import Int8Check

logger = logging.getLogger(__name__)

_INSTALL_HINT = (
    "install it with pip install 'recede[tensorrt]' and run on a machine with a CUDA GPU "
    "(TensorRT engines only run on NVIDIA GPUs)"
)


def _missing_backend_reason() -> str | None:
    """Why the TensorRT backend cannot be used here, or None if it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        return f"TensorRT is not importable ({err})"
    import torch

    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False, so no CUDA GPU is usable"
    return None


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (package or GPU missing), or None when it can."""
    return _missing_backend_reason()


def tensorrt_available() -> bool:
    """Whether TensorRT is importable and a CUDA GPU is usable by torch."""
    return _missing_backend_reason() is None


def _import_tensorrt() -> Any:
    reason = _missing_backend_reason()
    if reason is not None:
        raise RuntimeError(f"the TensorRT backend is unavailable: {reason}; {_INSTALL_HINT}")
    import tensorrt

    return tensorrt


def profile_shapes(
    onnx_shape: Sequence[int], *, opt_batch: int, max_batch: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Min, opt and max shapes of an optimization profile over the batch axis.

    Args:
        onnx_shape: Input shape as TensorRT parsed it; ``-1`` marks a dynamic dimension.
        opt_batch: Batch size TensorRT tunes its kernels for.
        max_batch: Largest batch size the engine accepts.

    Returns:
        ``(min, opt, max)`` shapes, identical except for the batch axis (1, opt, max).

    Raises:
        ValueError: If a non-batch dimension is dynamic or the batch sizes are inconsistent.
    """
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(
            f"expected 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, "
            f"max_batch={max_batch}; raise max_batch or lower opt_batch"
        )
    rest = tuple(int(d) for d in onnx_shape[1:])
    if any(d < 1 for d in rest):
        raise ValueError(
            f"only the batch axis may be dynamic, got input shape {tuple(onnx_shape)}; "
            "export with a fixed C, H, W (export_onnx does this)"
        )
    return (1, *rest), (opt_batch, *rest), (max_batch, *rest)


def _network_flags(trt: Any, *, strongly_typed: bool) -> int:
    """Explicit batch before TensorRT 10 (implicit was the default there); strongly typed for
    a Q/DQ graph where TensorRT has the flag (9.x and later)."""
    flags = 0
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None and int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(explicit)
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed and typed is not None:
        flags |= 1 << int(typed)
    return flags


def _parse_onnx(
    trt: Any, builder: Any, onnx_path: Path, trt_logger: Any, *, strongly_typed: bool = False
) -> tuple[Any, Any]:
    """Parse ``onnx_path`` into a new network; parser errors become a ValueError."""
    network = builder.create_network(_network_flags(trt, strongly_typed=strongly_typed))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise ValueError(
            f"TensorRT could not parse {onnx_path}:\n{errors}\n"
            "check the graph with verify_onnx, or re-export with a different opset"
        )
    return network, parser  # the parser must outlive the network's use


def _add_profile(builder: Any, network: Any, config: Any, opt_batch: int, max_batch: int) -> None:
    """Add one optimization profile covering the dynamic batch axis of every input."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if all(d >= 1 for t in inputs for d in tuple(t.shape)):
        logger.info("ONNX inputs have static shapes; no optimization profile needed")
        return
    profile = builder.create_optimization_profile()
    for tensor in inputs:
        shapes = profile_shapes(tuple(tensor.shape), opt_batch=opt_batch, max_batch=max_batch)
        profile.set_shape(tensor.name, *shapes)
        logger.info("profile for %s: min %s opt %s max %s", tensor.name, *shapes)
    config.add_optimization_profile(profile)


def attach_timing_cache(config: Any, path: str | Path | None) -> Any:
    """Give ``config`` a timing cache, loaded from ``path`` when that file exists.

    A cache from another TensorRT version or GPU is not trusted (``ignore_mismatch=False``).
    """
    blob = Path(path).read_bytes() if path is not None and Path(path).is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, False)
    logger.info("timing cache: %s", f"{len(blob)} bytes from {path}" if blob else "new")
    return cache


def save_timing_cache(config: Any, path: str | Path) -> Path:
    """Write ``config``'s timing cache (with what this build measured) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return Path(path)


def _fp16_flag(trt: Any) -> Any:
    """``BuilderFlag.FP16``, which TensorRT 10 has and TensorRT 11 removed (strong typing)."""
    flag = getattr(trt.BuilderFlag, "FP16", None)
    if flag is None:
        raise RuntimeError(
            f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (removed in TensorRT 11); "
            "build with fp16=False, or install TensorRT 10 (pip install 'tensorrt>=10,<11')"
        )
    return flag


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    fp16: bool = False,
    max_batch: int = 32,
    opt_batch: int = 1,
    workspace_mib: int = 1024,
    timing_cache: str | Path | None = None,
) -> Path:
    """Build and serialise a TensorRT engine from an ONNX file.

    A QDQ graph (:func:`is_qdq`) builds by explicit quantization: strongly typed where
    TensorRT has the flag (no precision flags then), else with the INT8 flag (and FP16 for the
    layers left in float when ``fp16``).

    Args:
        onnx_path: ONNX file: fp32 from :func:`pipeline.export.onnx.export_onnx`, or the QDQ
            graph of :func:`pipeline.export.int8.quantize_int8`.
        engine_path: Destination of the serialised engine, written atomically.
        fp16: Allow FP16 kernels (inputs and outputs stay FP32); ignored by a strongly typed
            network, whose types come from the graph.
        max_batch: Largest batch the engine accepts on a dynamic batch axis.
        opt_batch: Batch size the kernels are tuned for.
        workspace_mib: Workspace memory pool limit in MiB.
        timing_cache: Timing cache file, loaded when it exists and saved after the build.

    Returns:
        The engine path.

    Raises:
        RuntimeError: If TensorRT or a CUDA GPU is missing, or the build fails.
        FileNotFoundError: If ``onnx_path`` does not exist.
        ValueError: If the ONNX file cannot be parsed or has unsupported dynamic axes.
    """
    trt = _import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"expected an ONNX file at {onnx_path}, found none; export first")
    start = time.perf_counter()
    explicit = is_qdq(onnx_path)
    typed = explicit and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    logger.info(
        "TensorRT %s build of %s started (fp16=%s, explicit INT8=%s, strongly typed=%s)",
        trt.__version__, onnx_path, fp16, explicit, typed,
    )  # fmt: skip
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network, _parser = _parse_onnx(trt, builder, onnx_path, trt_logger, strongly_typed=typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if fp16 and not typed:
        config.set_flag(_fp16_flag(trt))
    if explicit and not typed:
        config.set_flag(trt.BuilderFlag.INT8)  # TensorRT 8.x: Q/DQ layers need the flag
    _add_profile(builder, network, config, opt_batch, max_batch)
    if timing_cache is not None:
        attach_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above, "
            "and try a larger workspace_mib or fp16=False"
        )
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    if timing_cache is not None:
        save_timing_cache(config, timing_cache)
    logger.info(
        "TensorRT build finished in %.1f s: %s (%.1f MiB)",
        time.perf_counter() - start,
        engine_path,
        serialized.nbytes / 2**20,
    )
    return engine_path


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    import torch

    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "BOOL": torch.bool,
    }
    for name, torch_dtype in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return torch_dtype
    raise TypeError(f"TensorRT I/O dtype {dtype} has no torch equivalent; export in float32")


class TrtRunner:
    """A deserialised engine and execution context that run on torch CUDA tensors.

    Inference is enqueued on a private CUDA stream ordered after the caller's current stream,
    and the caller's stream waits for it, so results are ready for any later torch work.

    Args:
        engine_path: Serialised engine from :func:`build_engine`, with one input and one output.
    """

    def __init__(self, engine_path: str | Path) -> None:
        import torch

        trt = _import_tensorrt()
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT could not deserialise {engine_path}; engines only load with the "
                "TensorRT version and GPU they were built for, so rebuild it with build_engine"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        inputs = [n for n in names if is_input[n]]
        outputs = [n for n in names if not is_input[n]]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"expected an engine with 1 input and 1 output, got inputs {inputs} and "
                f"outputs {outputs}; export the model with a single tensor in and out"
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        self._stream = torch.cuda.Stream()

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the engine on ``inputs`` (moved to CUDA, cast if needed); returns a CUDA tensor."""
        import torch

        x = inputs.to(device="cuda", dtype=self.input_dtype).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise ValueError(
                f"input shape {tuple(x.shape)} is outside the engine's optimization profile; "
                "rebuild the engine with a larger max_batch"
            )
        caller = torch.cuda.current_stream()
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            shape = tuple(self.context.get_tensor_shape(self.output_name))
            out = torch.empty(shape, dtype=self.output_dtype, device="cuda")
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log")
        x.record_stream(self._stream)  # keep x alive until the engine has read it
        caller.wait_stream(self._stream)
        out.record_stream(caller)
        return out


def run_engine(engine_path: str | Path, inputs: torch.Tensor) -> torch.Tensor:
    """Run a serialised engine once on ``inputs`` and return its output on the CPU.

    Args:
        engine_path: Serialised engine from :func:`build_engine`.
        inputs: A batch ``[N, C, H, W]`` on any device.

    Returns:
        The engine output, as a CPU tensor.
    """
    return TrtRunner(engine_path)(inputs).cpu()


def verify_engine(
    engine_path: str | Path,
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    precision: str = "fp32",
    tolerance: Tolerance | None = None,
) -> Check:
    """Run the engine and the float32 PyTorch model on ``inputs`` and on a batch one larger.

    Args:
        engine_path: Serialised engine from :func:`build_engine`.
        model: The PyTorch model it came from (run on the CPU in eval mode).
        inputs: A batch ``[N, C, H, W]`` within the engine's profile (N + 1 as well).
        precision: ``fp32``, ``fp16`` or ``int8``: which tolerance applies.
        tolerance: Overrides the policy for ``precision``.
    """
    import torch

    from pipeline.core.checks import insensitivity_hint, judge

    tolerance = tolerance or tolerance_for(precision)
    runner = TrtRunner(engine_path)
    pairs = []
    for batch in (inputs, torch.cat([inputs, inputs[:1].flip(-1)])):
        with torch.inference_mode():
            ref = model.cpu().eval()(batch.cpu().float()).double()
        pairs.append((ref.numpy(), runner(batch).double().cpu().numpy()))
    result = judge(
        "tensorrt", pairs, tolerance, path=str(engine_path), hint=insensitivity_hint(model)
    )
    log = logger.info if result.passed else logger.warning
    log("TensorRT verification of %s: %s", engine_path, result.line())
    return result


def engine_outputs(engine_path: str | Path, samples: np.ndarray, *, batch: int = 8) -> np.ndarray:
    """The engine's outputs on ``samples`` (``[N, C, H, W]``), in batches of ``batch``, as
    float64 numpy (``batch`` must lie within the engine's profile)."""
    import numpy as np
    import torch

    runner = TrtRunner(engine_path)
    chunks = [
        runner(torch.from_numpy(samples[i : i + batch])).double().cpu().numpy()
        for i in range(0, len(samples), batch)
    ]
    return np.concatenate(chunks)


def verify_engine_int8(
    engine_path: str | Path,
    fp32_onnx: str | Path,
    samples: Int8Samples,
    onnx_check: Int8Check,
    *,
    max_drop: float,
) -> Int8Check:
    """Judge an INT8 engine as the INT8 ONNX graph it came from was judged: its agreement with
    the fp32 graph on the same held-out samples, bounded by ``max_drop`` points.

    The check's sensitivity is the ONNX check's: the same wrong model on the same samples
    (building a second, corrupted engine would prove nothing more about these samples).
    """
    from pipeline.export.int8_check import agreement, judge_int8, run_onnx

    reference = run_onnx(fp32_onnx, samples.heldout)
    measured = agreement(
        reference, engine_outputs(engine_path, samples.heldout), samples.heldout_labels
    )
    wrong_model = f"{onnx_check.wrong_model}, run by ONNX Runtime on the same samples"
    check = judge_int8(
        "tensorrt", str(engine_path), measured, onnx_check.wrong, wrong_model, max_drop
    )
    (logger.info if check.passed else logger.warning)("TensorRT INT8: %s", check.line())
    return check
