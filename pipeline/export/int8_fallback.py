"""Keep the tensors INT8 hurts most in float: rank them by the error they add, exclude greedily.

**Ranking.** Both graphs run on calibration samples with every activation exposed. For each
activation ``X`` the QDQ graph quantizes (and each float output), its error is the
signal-to-quantization-noise ratio (SQNR, dB) of what consumers read (``X`` after
``DequantizeLinear``) against the fp32 graph's ``X``, **per channel**, and the worst channel
counts: one outlier channel stretches a tensor's range so that the quantization step crushes
every other channel, while a whole-tensor SQNR stays high (the outlier carries the power). A
tensor's *added error* is the worst SQNR of its producer's inputs minus its own: error it
inherits does not count against it, error its quantization creates does. Tensors are ranked by
added error, largest first.

**Exclusion.** The unit kept in float is a tensor with every tensor that shares its
quantization scale (the quantizer carries one scale through max-pools and reshapes, so the
crushed range would survive the next op): their producers and consumers are excluded from
quantization (excluding the consumer alone leaves the producer quantizing its output, and the
producer alone leaves the consumers quantizing their input). Tensors are kept in float one
at a time, in rank order, and the graph is quantized again (from cached calibration ranges, so
only the first pass calibrates) and judged on *validation* samples: a slice of the training
split disjoint from the calibration samples, never the held-out samples of the final verdict,
so the verdict is not chosen on the data that judges it. It stops when the drop is within the
bound or after ``limit`` tensors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.export.int8 import Int8Options, Quantized, quantize_int8
from pipeline.export.int8_check import Agreement, run_onnx_outputs
from pipeline.export.int8_outputs import decision_agreement

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

RANKING_SAMPLES = 64
"""Calibration samples the ranking runs on: the SQNR of every activation settles well before."""
_DEQ = "DequantizeLinear"
_Q = "QuantizeLinear"
_RENAMED = "_QuantizeLinear_Input"  # a graph output's tensor, renamed by the quantizer


@dataclass(frozen=True)
class TensorError:
    """The error one quantized tensor adds: worst per-channel SQNR (dB) of its producer's inputs
    and of itself, and the nodes to exclude to keep it in float."""

    tensor: str
    nodes: tuple[str, ...]  # its producer, then its consumers
    input_sqnr: float
    sqnr: float

    @property
    def added(self) -> float:
        """dB of SQNR lost in this tensor (an exact input counts as 100 dB)."""
        return min(self.input_sqnr, 100.0) - min(self.sqnr, 100.0)


@dataclass(frozen=True)
class Fallback:
    """The graph kept, the ranking, and the drop on validation samples after each exclusion."""

    quantized: Quantized
    ranking: tuple[TensorError, ...] = ()
    trail: tuple[tuple[str, float], ...] = ()  # (tensor kept in float, validation drop after)
    first: Agreement | None = None  # validation agreement of the all-INT8 graph
    final: Agreement | None = None
    all_int8: Path | None = None  # the all-INT8 graph, kept for a latency comparison

    @property
    def excluded(self) -> tuple[str, ...]:
        return self.quantized.excluded


def worst_channel_sqnr(reference: np.ndarray, got: np.ndarray) -> float:
    """The lowest per-channel SQNR (dB) of ``got`` against ``reference`` (channels on axis 1;
    channels with almost no signal, dead ReLUs, are skipped); inf when ``got`` is exact."""
    import numpy as np

    if reference.shape != got.shape:
        return -math.inf
    ref = reference.reshape(reference.shape[0], reference.shape[1] if reference.ndim > 1 else 1, -1)
    diff = (got.reshape(ref.shape) - ref) ** 2
    signal, noise = (ref**2).sum(axis=(0, 2)), diff.sum(axis=(0, 2))
    live = signal > 1e-6 * max(float(signal.mean()), 1e-30)
    if not live.any() or not (noise[live] > 0).any():
        return math.inf
    with np.errstate(divide="ignore"):
        ratios = 10 * np.log10(signal[live] / noise[live])
    return float(ratios.min())


def _exposed(path: Path, names: list[str], out: Path) -> Path:
    """A copy of the graph at ``path`` with the tensors ``names`` added as float outputs."""
    import onnx

    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    onnx.save(model, str(out))
    return out


def _tensor_names(model: Any) -> set[str]:
    return {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}


def _quantized_tensors(qdq: Any, fp32_names: set[str]) -> dict[str, tuple[str, str]]:
    """fp32 tensor name -> (the dequantized tensor its consumers read in the QDQ graph, the
    name of its scale), for every activation (not weight) the QDQ graph quantizes. A graph
    output keeps its name on the ``DequantizeLinear`` (the quantizer renames the tensor it
    quantizes), so the fp32 name is whichever of the two the fp32 graph has."""
    weights = {t.name for t in qdq.graph.initializer}
    quantizers = {n.output[0]: n.input[0] for n in qdq.graph.node if n.op_type == _Q}
    found = {}
    for n in qdq.graph.node:
        source = quantizers.get(n.input[0]) if n.op_type == _DEQ else None
        if source is None or source in weights:
            continue
        name = source if source in fp32_names else n.output[0]
        if name in fp32_names:
            found[name] = (n.output[0], n.input[1])
    return found


def _powers(path: Path, names: list[str], samples: np.ndarray, tmp: Path) -> dict[str, Any]:
    """name -> its values on ``samples`` (concatenated over batches), as float64 arrays."""
    import numpy as np
    import onnxruntime as ort

    exposed = _exposed(path, names, tmp / f"exposed-{path.stem}.onnx")
    session = ort.InferenceSession(str(exposed), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    found = session.run(names, {input_name: samples})
    return {n: np.asarray(v, dtype=np.float64) for n, v in zip(names, found, strict=True)}


def _consumers(qdq: Any, dequantized: set[str]) -> list[str]:
    return [n.name for n in qdq.graph.node if any(i in dequantized for i in n.input)]


def rank_tensors(prepared: Path, qdq: Path, samples: np.ndarray, tmp: Path) -> list[TensorError]:
    """Every activation the QDQ graph quantizes, and every float output, by added error (largest
    first); see the module docstring."""
    import onnx

    model = onnx.load(str(qdq))
    fp32_names = _tensor_names(onnx.load(str(prepared)))
    quantized = _quantized_tensors(model, fp32_names)  # fp32 name -> (dequantized, scale)
    seen = {name: dq for name, (dq, _) in quantized.items()}
    nodes = [n for n in model.graph.node if n.op_type not in (_Q, _DEQ)]
    plain = {o for n in nodes for o in n.output if o in fp32_names and o not in seen}
    reference = _powers(prepared, [*seen, *plain], samples[:RANKING_SAMPLES], tmp)
    mine = _powers(qdq, [*seen.values(), *plain], samples[:RANKING_SAMPLES], tmp)
    error = {name: worst_channel_sqnr(reference[name], mine[dq]) for name, dq in seen.items()}
    error |= {name: worst_channel_sqnr(reference[name], mine[name]) for name in plain}
    reads = {dq: name for name, dq in seen.items()}
    producer = {_produced(n, seen, plain): n for n in nodes}
    ranked = []
    for name, sqnr in error.items():
        node = producer.get(name)
        if node is None:  # the graph input: nothing produces it
            continue
        inputs = [error[reads[i]] for i in node.input if i in reads]
        unit = _unit(model, name, quantized, producer)
        ranked.append(TensorError(name, unit, min(inputs, default=math.inf), sqnr))
    ranked.sort(key=lambda e: (-e.added, e.tensor))
    return ranked


def _unit(
    model: Any, name: str, quantized: dict[str, tuple[str, str]], producer: dict[str | None, Any]
) -> tuple[str, ...]:
    """The nodes to exclude to keep ``name`` in float: producers and consumers of it and of every
    tensor sharing its scale (the module docstring)."""
    if name not in quantized:  # a float output: only its producer quantizes anything
        return (producer[name].name,)
    scale = quantized[name][1]
    shared = [n for n, (_, s) in quantized.items() if s == scale]
    nodes = [producer[n].name for n in shared if producer.get(n) is not None]
    nodes += _consumers(model, {quantized[n][0] for n in shared})
    return tuple(dict.fromkeys(nodes))


def _produced(node: Any, seen: dict[str, str], plain: set[str]) -> str | None:
    """The fp32 name of what ``node`` writes (the quantizer may have renamed its output)."""
    for out in node.output:
        if out in plain or out in seen:
            return out
        if out.endswith(_RENAMED) and out[: -len(_RENAMED)] in seen:
            return out[: -len(_RENAMED)]
    return None


def quantize_with_fallback(
    prepared: Path,
    out: Path,
    samples: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    options: Int8Options,
    *,
    max_drop: float,
    limit: int,
    tmp: Path,
    classes: int | None = None,
) -> Fallback:
    """Quantize ``prepared``; while the validation drop exceeds ``max_drop``, keep the next
    worst tensor (:func:`rank_tensors`) in float, up to ``limit`` tensors.

    Args:
        prepared: The pre-processed fp32 graph.
        out: Where the INT8 graph goes.
        samples: Calibration inputs, validation inputs and their labels (or None).
        options: Quantization settings.
        max_drop: Accuracy points the validation drop may reach.
        limit: Most tensors to keep in float (0: no fallback).
        tmp: A scratch folder (calibration cache, the all-INT8 graph, exposed graphs).
        classes: The model's class count: of several outputs, those with a class axis steer
            the fallback (``pipeline.export.int8_outputs``); a graph without one is quantized
            once.
    """
    calibration, validation, labels = samples
    cache = tmp / "calibration-ranges.json"
    first = quantize_int8(prepared, out, calibration, options, cache=cache)
    reference = run_onnx_outputs(prepared, validation)

    def judge(graph: Path) -> Agreement | None:
        return decision_agreement(reference, run_onnx_outputs(graph, validation), labels, classes)

    judged = judge(out)
    if judged is None or judged.drop <= max_drop or limit < 1:
        return Fallback(first, first=judged, final=judged)
    kept = tmp / "all-int8.onnx"
    kept.write_bytes(out.read_bytes())
    ranking = rank_tensors(prepared, out, calibration, tmp)
    logger.warning(
        "INT8 loses %.2f points on %d validation samples (bound %g): keeping the worst of %d "
        "tensors in float, one at a time (at most %d)",
        judged.drop, judged.samples, max_drop, len(ranking), limit,
    )  # fmt: skip
    trail, excluded, current, final = [], [], first, judged
    for error in ranking[:limit]:
        excluded += [n for n in error.nodes if n not in excluded]
        current = quantize_int8(prepared, out, calibration, options, exclude=excluded, cache=cache)
        final = judge(out)
        trail.append((error.tensor, final.drop))
        logger.info("  %s (adds %.1f dB; nodes %s) in float: drop %.2f", error.tensor,
                    error.added, ", ".join(error.nodes), final.drop)  # fmt: skip
        if final.drop <= max_drop:
            break
    return Fallback(current, tuple(ranking), tuple(trail), judged, final, kept)
