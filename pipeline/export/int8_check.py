"""Verify an INT8 graph by its agreement with the fp32 graph on held-out samples, and show that
the check could have failed.

INT8 cannot be compared element-wise with fp32: a correct quantization moves every logit by a
few percent. What a user needs to know is whether it still *decides* the same, so the check
runs both graphs on held-out samples (never the calibration samples) and records fp32
accuracy, INT8 accuracy, their top-1 agreement and the largest logit error. The verdict is
``ok`` when the accuracy drop is within the bound (``--int8-max-drop``, points) **and** the
check is sensitive.

Sensitivity, as for the fp32 checks (:mod:`pipeline.core.checks`), means a wrong model would
have been caught. Here the wrong model is the INT8 graph itself with one fault injected: every
weight layer (convolutions and matrix products) dequantizes its weights with per-channel scales
off by a factor of two, alternately x2 and x1/2, as a quantizer that wrote its scale table
wrongly would. A fault in fewer layers is not a useful test: a trained network absorbs it. On
the pruned demo VGG the middle convolution's scales off by 2x cost 1.4 points and half its
channels with flipped signs 0.6; on a two-convolution digits net both convolutions off by 2x
cost 1.4 points; every weight layer off by 2x costs 56-67 points on the demo
(2026-12-07, this project's CPU). That model is checked on the same samples; unless it loses at
least
:data:`~pipeline.core.checks.MIN_SENSITIVITY` times the bound, the samples cannot tell a wrong
model from a right one (an untrained model at chance accuracy, or too few samples) and the
verdict is ``insensitive``, never ``ok``.

Without labels (calibration data given as a path) the fp32 graph's own decisions are the labels:
fp32 accuracy is 100% by definition and the drop is the share of samples on which INT8
disagrees, which is stricter than an accuracy drop. Outputs with a class axis at position 1 are
compared there, so a segmenter's ``[N, classes, H, W]`` output is judged per pixel.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.checks import MIN_SENSITIVITY

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

_CORRUPTION = (
    "the same graph with the per-channel weight scales of its {count} weight layers off by 2x "
    "(alternately x2 and x1/2)"
)


@dataclass(frozen=True)
class Agreement:
    """How an INT8 graph's decisions compare with the fp32 graph's on the same samples.

    Accuracies and agreement are percentages; ``labelled`` says whether accuracy is against
    true labels (else against the fp32 decisions, so ``fp32_accuracy`` is 100).
    """

    samples: int
    labelled: bool
    fp32_accuracy: float
    int8_accuracy: float
    agreement: float
    max_logit_error: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Agreement:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    @property
    def drop(self) -> float:
        """Accuracy points lost (negative: INT8 was right more often)."""
        return self.fp32_accuracy - self.int8_accuracy


def agreement(
    reference: np.ndarray, got: np.ndarray, labels: np.ndarray | None = None
) -> Agreement:
    """Compare fp32 outputs ``reference`` with INT8 outputs ``got`` (``[N, classes, ...]``).

    A shape mismatch or a non-finite output gives an infinite logit error and 0% agreement.
    """
    import numpy as np

    samples = int(reference.shape[0])
    if got.shape != reference.shape or not np.isfinite(got).all():
        ref_acc = _accuracy(reference, labels) if labels is not None else 100.0
        return Agreement(samples, labels is not None, ref_acc, 0.0, 0.0, math.inf)
    mine, theirs = reference.argmax(axis=1), got.argmax(axis=1)
    agree = float((mine == theirs).mean() * 100)
    error = float(np.abs(got.astype(np.float64) - reference).max(initial=0.0))
    if labels is None:
        return Agreement(samples, False, 100.0, agree, agree, error)
    return Agreement(
        samples, True, _accuracy(reference, labels), _accuracy(got, labels), agree, error
    )


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(axis=1) == labels).mean() * 100)


@dataclass(frozen=True)
class Int8Check:
    """The verdict on one INT8 graph, with what a wrong INT8 model showed on the same samples.

    ``what``, ``path``, ``precision``, ``verdict`` and ``cause`` read as on a
    :class:`pipeline.core.checks.Check`, so :func:`pipeline.core.checks.raise_unless_verified`
    judges both kinds alike.
    """

    what: str
    path: str
    measured: Agreement
    wrong: Agreement
    wrong_model: str
    max_drop: float
    verdict: str
    cause: str = ""
    precision: str = "int8"
    output: str = ""  # the worst of several outputs (pipeline.export.int8_outputs)
    outputs: dict[str, dict[str, Any]] | None = None  # every output's own check

    @property
    def passed(self) -> bool:
        return self.verdict == "ok"

    @property
    def bound(self) -> float:
        """The drop a check on these samples can resolve: the bound, or one sample's worth."""
        return max(self.max_drop, 100.0 / max(self.measured.samples, 1))

    @property
    def sensitivity(self) -> float:
        """The wrong model's drop over the bound (how many bounds a wrong model loses)."""
        return self.wrong.drop / self.bound if self.bound > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """The fields (each agreement with its ``drop``), plus ``drop``, ``passed`` and
        ``sensitivity``."""
        return {
            **asdict(self),
            "measured": {**asdict(self.measured), "drop": self.measured.drop},
            "wrong": {**asdict(self.wrong), "drop": self.wrong.drop},
            "drop": self.measured.drop,
            "passed": self.passed,
            "sensitivity": self.sensitivity,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Int8Check:
        """Inverse of :meth:`to_dict` (derived keys are recomputed, not read)."""
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["measured"] = Agreement.from_dict(data["measured"])
        fields["wrong"] = Agreement.from_dict(data["wrong"])
        return cls(**fields)

    @property
    def where(self) -> str:
        """``output 'name' (worst of n): `` for a graph with several outputs, else ""."""
        return f"output {self.output!r} (worst of {len(self.outputs or ())}): " if self.output else ""

    def line(self) -> str:
        m, w = self.measured, self.wrong
        basis = "accuracy" if m.labelled else "agreement with fp32"
        text = self.where + (
            f"INT8 {basis} {m.int8_accuracy:.2f}% vs fp32 {m.fp32_accuracy:.2f}% on "
            f"{m.samples} held-out samples (drop {m.drop:+.2f} points, bound {self.max_drop:g}; "
            f"top-1 agreement {m.agreement:.2f}%, max logit error {m.max_logit_error:.3g}); "
            f"a wrong INT8 model drops {w.drop:.2f} points ({self.sensitivity:.3g}x the bound) "
            f"-> {self.verdict}"
        )
        return f"{text}: {self.cause}" if self.cause else text


def judge_int8(
    what: str, path: str, measured: Agreement, wrong: Agreement, wrong_model: str, max_drop: float
) -> Int8Check:
    """The verdict: ``failed`` beyond the bound, ``insensitive`` when the wrong model would have
    passed too, else ``ok``."""
    check = Int8Check(what, path, measured, wrong, wrong_model, max_drop, "ok")
    if not math.isfinite(measured.max_logit_error):
        return _with(check, "failed", "NaN, Inf or a wrong output shape from the INT8 graph")
    if measured.drop > max_drop:
        return _with(
            check,
            "failed",
            f"the INT8 graph loses {measured.drop:.2f} accuracy points, more than the bound "
            f"{max_drop:g} (--int8-max-drop, export.int8.max_drop)",
        )
    if wrong.drop < MIN_SENSITIVITY * check.bound:
        return _with(
            check,
            "insensitive",
            f"a wrong INT8 model ({wrong_model}) loses only {wrong.drop:.2f} points on these "
            f"{measured.samples} samples, less than {MIN_SENSITIVITY:g}x the bound "
            f"{check.bound:.3g}, so a wrong model would pass too; verify a trained model on "
            "more held-out samples",
        )
    return check


def _all_float(what: str, path: str, measured: Agreement, max_drop: float) -> Int8Check:
    """The verdict on a graph whose every weight layer stayed in float: ``failed``, since it is
    not the INT8 graph that was asked for."""
    cause = (
        "no weight layer is left in INT8 (the fallback kept them all in float): this is not an "
        "INT8 graph; calibrate on more samples, try another export.int8.method, raise "
        "--int8-max-drop, or ship the fp32 graph"
    )
    return Int8Check(what, path, measured, measured, "none (no INT8 weights)", max_drop,
                     "failed", cause)  # fmt: skip


def _with(check: Int8Check, verdict: str, cause: str) -> Int8Check:
    from dataclasses import replace

    return replace(check, verdict=verdict, cause=cause)


def run_onnx(path: str | Path, samples: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """The first output of the ONNX graph at ``path`` on ``samples``, in batches, as float64."""
    return next(iter(run_onnx_outputs(path, samples, batch=batch).values()))


def run_onnx_outputs(
    path: str | Path, samples: np.ndarray, *, batch: int = 64
) -> dict[str, np.ndarray]:
    """Every output of the ONNX graph at ``path`` on ``samples``, in batches, as float64, by
    name (outputs without a batch axis are taken from the first batch)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, names = session.get_inputs()[0].name, [o.name for o in session.get_outputs()]
    runs = [session.run(None, {name: samples[i : i + batch]}) for i in range(0, len(samples), batch)]
    batched = [isinstance(o.shape[0], str) if o.shape else False for o in session.get_outputs()]
    return {
        n: np.concatenate([r[k] for r in runs]).astype(np.float64)
        if batched[k] or len(names) == 1
        else np.asarray(runs[0][k], dtype=np.float64)
        for k, n in enumerate(names)
    }


def corrupt_weight_scales(qdq: str | Path, out: str | Path) -> str | None:
    """Write ``qdq`` with the fault of the module docstring injected; return what was changed,
    or None (nothing written) when the graph has no per-channel quantized weight."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq))
    weights = {t.name: t for t in model.graph.initializer}
    candidates = _weight_dequantizers(model.graph, weights)
    if not candidates:
        return None
    for node, _ in candidates:
        scale = numpy_helper.to_array(weights[node.input[1]])
        factors = np.where(np.arange(scale.size) % 2 == 0, 2.0, 0.5).astype(scale.dtype)
        weights[node.input[1]].CopyFrom(
            numpy_helper.from_array(scale * factors.reshape(scale.shape), node.input[1])
        )
    onnx.save(model, str(out))
    return _CORRUPTION.format(count=len(candidates))


def _weight_dequantizers(graph: Any, weights: dict[str, Any]) -> list[tuple[Any, str]]:
    """(DequantizeLinear of a per-channel weight, the op type reading it), in graph order, for
    every convolution and matrix product."""
    readers = {i: n for n in graph.node for i in n.input}
    found: list[tuple[Any, str]] = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in weights:
            continue
        scale = weights.get(node.input[1])
        reader = readers.get(node.output[0])
        if scale is None or reader is None or reader.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        if len(reader.input) < 2 or reader.input[1] != node.output[0]:
            continue  # a bias (input 2) or a data input: only weights are the fault's target
        if math.prod(scale.dims) > 1:  # per channel (a scalar scale has no dims)
            found.append((node, reader.op_type))
    return found
