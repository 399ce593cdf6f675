"""Quantize a folded fp32 ONNX graph to INT8 with ONNX Runtime's own static quantization (QDQ).

Why QDQ: a QDQ graph keeps every float op and wraps its inputs and outputs in
``QuantizeLinear``/``DequantizeLinear`` pairs. It is plain ONNX, so the same file runs on ONNX
Runtime (whose CPU provider fuses ``DQ -> Conv -> Q`` into ``QLinearConv``) and is TensorRT's
input for *explicit* quantization; the alternative (QOperator: ``QLinearConv`` nodes written out)
is ONNX-Runtime-only. The steps are ONNX Runtime's: ``quant_pre_process`` (shape inference and
the basic graph optimisations the quantizer expects), then ``quantize_static`` over
calibration batches, with weights signed INT8 and **per channel**, activations 8-bit per tensor
(the only form ONNX Runtime's CPU kernels take), unsigned on x86 and signed elsewhere.

Choices, each measured on this project's 2-core CPU (AMD EPYC, AVX-512 VNNI), ONNX Runtime 1.32,
one thread, CPU clock (docs/results.md#int8 has the tables and commands):

- **Activations asymmetric by default.** A zero point lets a ReLU's output use all 256 levels,
  and ONNX Runtime then drops the ReLU (its range is the quantization range). Symmetric
  activations (zero point 0) keep every ReLU as its own op and ran the pruned demo 10-15% slower;
  they are what TensorRT requires, so a release that builds a TensorRT engine from the file
  quantizes symmetrically (``symmetric=True``), making one file serve both.
- **Activations unsigned on x86, signed elsewhere** (``activations="auto"``, decided by the
  exporting CPU as range reduction is, recorded in the manifest). ONNX Runtime's x86 build fuses
  depthwise convolutions and ``Add`` into integer kernels only for unsigned activations; with
  signed ones it runs them in float between ``DQ``/``Q`` pairs. The pruned
  ``lraspp_mobilenet_v3_large`` (256 px, one thread, 2026-12-07) ran 19.4 ms in INT8 with signed
  activations against 8.6 ms in fp32, and 8.5 ms with unsigned ones; the pruned demo about 12%
  faster unsigned. Signed (``int8``) is what TensorRT, ARM kernels and NPUs take: it is used
  off x86, whenever the activations are symmetric (a TensorRT engine's file), and on request.
- **Range reduction** (7-bit weights) where the CPU lacks VNNI, as ONNX Runtime recommends
  there: without VNNI the 8-bit products are summed in 16 bits and can saturate. ``None`` picks it
  from this machine's CPU flags (:func:`cpu_int8_support`), which the manifest records, since
  the file is then tuned to the machine that exported it.

Re-export is byte-identical: calibration batches are given in a fixed order, the calibration
statistics are deterministic, and the quantizer names nodes from the graph.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.atomic import atomic_path

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("auto", "int8", "uint8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
"""CPU flags that give 8-bit dot products with 32-bit accumulation (x86 VNNI and AMX, ARM's dot
product): with any of them full-range INT8 weights cannot saturate an intermediate sum."""
_X86 = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class Int8Options:
    """How to quantize; validated on construction.

    Attributes:
        method: Calibration: ``minmax`` (the observed range), ``entropy`` (the range that keeps
            the KL divergence of the activation histogram smallest) or ``percentile`` (the
            ``percentile``-th percentile of absolute values).
        calibration_samples: How many samples calibrate the ranges.
        symmetric: Activations with zero point 0 (TensorRT needs it; slower on ONNX Runtime CPU).
        activations: ``int8`` (signed), ``uint8``, or ``auto``: ``uint8`` on an x86 CPU, where
            ONNX Runtime fuses every QDQ op into integer kernels only with unsigned activations,
            ``int8`` elsewhere and whenever ``symmetric`` (see the module docstring).
        reduce_range: 7-bit weights; None decides from the CPU (see the module docstring).
        percentile: The percentile ``percentile`` calibration keeps.
        batch: Samples per calibration batch.
    """

    method: str = "minmax"
    calibration_samples: int = 512
    symmetric: bool = False
    activations: str = "auto"
    reduce_range: bool | None = None
    percentile: float = 99.999
    batch: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(
                f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}"
            )
        if self.calibration_samples < 1 or self.batch < 1:
            raise ValueError(
                f"expected calibration_samples >= 1 and batch >= 1, got "
                f"{self.calibration_samples} and {self.batch}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if self.symmetric and self.activations == "uint8":
            raise ValueError(
                "symmetric activations are signed (TensorRT's form); got activations='uint8'"
            )


@dataclass(frozen=True)
class CpuInt8:
    """What this CPU offers INT8 kernels: architecture, VNNI-class flags found, the decision."""

    machine: str
    flags: tuple[str, ...]

    @property
    def dot_product(self) -> bool:
        """8-bit dot products accumulate in 32 bits (VNNI, AMX or ARM's dot product)."""
        return bool(self.flags)

    @property
    def reduce_range(self) -> bool:
        """ONNX Runtime's advice: 7-bit weights on an x86 CPU without VNNI."""
        return self.machine.lower() in _X86 and not self.dot_product

    @property
    def activations(self) -> str:
        """``uint8`` on x86 (ONNX Runtime's x86 build fuses depthwise convs and ``Add`` into
        integer kernels only with unsigned activations), ``int8`` elsewhere."""
        return "uint8" if self.machine.lower() in _X86 else "int8"

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "flags": list(self.flags), "vnni": self.dot_product}


def cpu_int8_support(cpuinfo: str | None = None) -> CpuInt8:
    """The CPU's architecture and its VNNI-class flags (:data:`VNNI_FLAGS`), from
    ``/proc/cpuinfo`` (or the text given); no flags where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    words: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words.update(value.split())
    return CpuInt8(platform.machine() or "unknown", tuple(f for f in VNNI_FLAGS if f in words))


@dataclass(frozen=True)
class Quantized:
    """What :func:`quantize_int8` wrote: the file, the nodes left in float, and the settings."""

    path: Path
    excluded: tuple[str, ...]
    reduce_range: bool
    options: Int8Options
    quantized_nodes: int
    seconds: float
    activations: str = "int8"  # as quantized: ``options.activations`` with ``auto`` resolved
    float_tails: tuple[str, ...] = ()  # weightless end nodes left in float (:func:`float_tails`)

    def settings(self) -> dict[str, Any]:
        """The quantization settings as the manifest records them."""
        o = self.options
        return {
            "format": "QDQ",
            "weights": "int8, per channel, symmetric",
            "activations": f"{self.activations}, per tensor, {'symmetric' if o.symmetric else 'asymmetric'}",
            "reduce_range": self.reduce_range,
            "method": o.method,
            **({"percentile": o.percentile} if o.method == "percentile" else {}),
            "calibration_samples": o.calibration_samples,
            "excluded_nodes": list(self.excluded),
            "float_tail_nodes": list(self.float_tails),
        }


class _Batches:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over an array, in a fixed order."""

    def __init__(self, samples: np.ndarray, batch: int, input_name: str) -> None:
        self._chunks = iter([samples[i : i + batch] for i in range(0, len(samples), batch)])
        self._name = input_name

    def get_next(self) -> dict[str, Any] | None:
        chunk = next(self._chunks, None)
        return None if chunk is None else {self._name: chunk}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.get_next, None)


def is_qdq(onnx_path: str | Path) -> bool:
    """Whether the ONNX graph holds Q/DQ nodes (TensorRT then quantizes explicitly)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def preprocess(fp32: str | Path, out: str | Path) -> Path:
    """ONNX Runtime's quantization pre-processing of ``fp32`` into ``out``: ONNX shape inference
    and basic optimisations (symbolic shape inference is skipped: a CNN's shapes are static but
    for the batch, which stays symbolic)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with atomic_path(out) as tmp:
        quant_pre_process(str(fp32), str(tmp), skip_symbolic_shape=True)
    return Path(out)


def _method(options: Int8Options) -> tuple[Any, dict[str, Any]]:
    from onnxruntime.quantization import CalibrationMethod

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[options.method]
    extra = {"CalibPercentile": options.percentile} if options.method == "percentile" else {}
    return method, extra


def quantize_int8(
    prepared: str | Path,
    out: str | Path,
    calibration: np.ndarray,
    options: Int8Options,
    *,
    exclude: Sequence[str] = (),
    cache: str | Path | None = None,
) -> Quantized:
    """Write the QDQ INT8 form of the pre-processed graph ``prepared`` (:func:`preprocess`).

    Args:
        prepared: The pre-processed fp32 ONNX file.
        out: The INT8 ONNX file to write (atomically).
        calibration: Calibration inputs ``[n, C, H, W]`` (float32), used in order.
        options: Method, symmetry, activation type, range reduction.
        exclude: Node names to leave in float (the sensitive-layer fallback).
        cache: A JSON file of calibrated ranges: read when it exists, written otherwise, so
            quantizing again with other exclusions does not calibrate again.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    start = time.perf_counter()
    reduce_range = options.reduce_range
    if reduce_range is None:
        reduce_range = cpu_int8_support().reduce_range
    method, extra = _method(options)
    extra |= {"ActivationSymmetric": options.symmetric, "WeightSymmetric": True}
    activations = resolved_activations(options)
    activation = QuantType.QInt8 if activations == "int8" else QuantType.QUInt8
    reader = _Batches(calibration, options.batch, _input_name(prepared))
    tails = float_tails(prepared)
    floats = [*exclude, *(t for t in tails if t not in exclude)]
    with atomic_path(out) as tmp, _quiet_root_logger():
        quantize_static(
            str(prepared), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=reduce_range, activation_type=activation, weight_type=QuantType.QInt8,
            nodes_to_exclude=floats, calibrate_method=method, extra_options=extra,
            calibration_cache_path=None if cache is None else str(cache),
        )  # fmt: skip
    count = _count_quantized(out)
    seconds = time.perf_counter() - start
    logger.info(
        "INT8 (%s, %d samples, %d nodes quantized, %d left in float) written to %s in %.1f s",
        options.method, len(calibration), count, len(exclude), out, seconds,
    )  # fmt: skip
    return Quantized(
        Path(out), tuple(exclude), reduce_range, options, count, seconds, activations, tails
    )


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def float_tails(path: str | Path) -> tuple[str, ...]:
    """The weightless nodes at the graph's end, left in float: each writes only graph outputs or
    inputs of other such nodes, and is not a convolution or matrix product.

    Quantizing them saves no arithmetic and adds a ``Q``/``DQ`` round trip over the largest
    tensors of a segmenter: its full-resolution Resize of the class maps. On the pruned
    ``lraspp_mobilenet_v3_large`` (256 px, 21 classes, one thread, 2026-12-07) the INT8 graph ran
    8.14 ms with it quantized and 7.68 ms with it float, and was closer to fp32 (1.3e-3 against
    1.6e-3). A classifier ends in a Gemm and a detector's trunk in convolutions: unchanged.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    tails: list[str] = []
    for node in reversed(graph.node):  # topological order reversed: readers come first
        ends = all(
            name in outputs or (readers.get(name) and all(r.name in tails for r in readers[name]))
            for name in node.output
        )
        if ends and node.op_type not in WEIGHTED_OPS and node.name:
            tails.append(node.name)
    return tuple(sorted(tails))


def resolved_activations(options: Int8Options) -> str:
    """``options.activations``, with ``auto`` decided: signed when symmetric (TensorRT's form),
    else from this machine's CPU (:attr:`CpuInt8.activations`)."""
    if options.activations != "auto":
        return options.activations
    return "int8" if options.symmetric else cpu_int8_support().activations


def _input_name(path: str | Path) -> str:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in weights)


def _count_quantized(path: str | Path) -> int:
    """Nodes that read a dequantized tensor: the ops ONNX Runtime runs in INT8."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(
        1
        for n in graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and any(i in dequantized for i in n.input)
    )


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizer logs progress through the root logger; keep it at WARNING while
    it runs so a CLI at INFO does not print a line per tensor."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)
