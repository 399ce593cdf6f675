"""One tolerance policy for every comparison of an artefact with PyTorch, relative to the output scale.

``run``, ``export`` and ``bench`` all ask :func:`tolerance_for` how far an exported model (ONNX,
FP16 ONNX, a TensorRT engine) may stray from the PyTorch model it came from. An output is
accepted when ``max|got - ref| <= rtol * max|ref| + atol``: relative, because a network whose
logits are in the hundreds rounds differently from one whose logits are below one, with a tiny
absolute floor for outputs that are all near zero. NaN or Inf never passes.

**Deep models: the bound scales with the model's measured rounding.** A deep net whose BNs
amplify rounding cannot be held to 1e-4 of its output: on the calibrated random EfficientNets
of ``docs/torchvision_coverage.md`` PyTorch's own float32 answer is 1e-3 of the output scale
away from the exact one, and 0.2 on ``efficientnet_v2_l``. So the export check
(``pipeline.export.verify``) compares the artefact with the **float64** PyTorch model (the
exact answer, not another float32 rounding of it), and holds an fp32 artefact to

    max|got - exact| <= max(rtol, ROUNDING_FACTOR * rounding) * max|exact| + atol

where ``rounding`` is :func:`measured_rounding`: how far PyTorch's own float32 runs of the
artefact's graph (the plain run and a few dithered ones) land from its float64 run on the
verification batch, recorded with the tolerance. This is the coverage table's rule
(``tests/prune/test_torchvision_coverage.py``: ONNX within ``NOISE_FACTOR`` times PyTorch's own
float32 error) with a factor measured on deep nets (:data:`ROUNDING_FACTOR`), applied to every
export. For a shallow or trained model ``rounding`` is about 1e-7 and the bound is ``rtol``.

A scaled bound still catches a wrong model: it is measured on the artefact's own graph, so a
wrong transform cannot widen it; a check is ``ok`` only if a wrong input moves the output by
twice the bound (``pipeline.core.checks``), so a chaotic model's check is ``insensitive``,
saying why, never ``ok``; an error of half the output scale or more never passes
(``pipeline.core.checks.MAX_REL_ERR``); and ``tests/export/test_verify_rounding.py`` shows one
layer scaled by three bounds failing.

An fp16 export follows the same rule with its rounding measured in float16 (the calibrated twin
of an untrained random CNN in ``tests/export/test_verify_policy.py`` has an fp16 ONNX 2.8e-2 of
its output from the exact answer, above the fixed 1e-2, and PyTorch's own float16 run of it as
far off); an fp16 export that underflows to zeros stays ``failed``. int8 keeps its fixed bound
(PyTorch cannot run TensorRT's calibrated kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Tolerance:
    """``max|got - ref| <= rtol * max|ref| + atol``.

    Attributes:
        rtol: Share of the reference output's largest magnitude.
        atol: Absolute floor, for outputs that are all near zero.
        precision: What the tolerance is for (``fp32``, ``fp16``, ``int8``).
        rounding: The checked graph's own rounding in ``precision``, as a share of its output
            scale (:func:`measured_rounding`; 0: not measured). The relative bound is
            ``max(rtol, ROUNDING_FACTOR * rounding)``.
    """

    rtol: float
    atol: float
    precision: str = "fp32"
    rounding: float = 0.0

    @property
    def effective_rtol(self) -> float:
        """``rtol``, or ``ROUNDING_FACTOR`` times the measured rounding where that is larger."""
        return max(self.rtol, ROUNDING_FACTOR * self.rounding)

    def bound(self, scale: float) -> float:
        """Largest error allowed when the reference output's largest magnitude is ``scale``."""
        return self.effective_rtol * scale + self.atol

    def allows(self, max_abs_err: float, scale: float) -> bool:
        """Whether ``max_abs_err`` is within bounds; False for NaN or Inf."""
        return math.isfinite(max_abs_err) and max_abs_err <= self.bound(scale)

    def to_dict(self) -> dict[str, float | str]:
        return {
            "precision": self.precision, "rtol": self.rtol, "atol": self.atol,
            "rounding": self.rounding, "effective_rtol": self.effective_rtol,
        }  # fmt: skip


# fp32: the export graph computes the same sums in another order (~1e-7 of the scale per layer).
# fp16: a 10-bit mantissa (~5e-4) over tens of layers; measured 2.3e-4 on the demo VGG.
# int8: calibrated quantisation, a coarse sanity bound that still catches a wrong engine.
TOLERANCES = {
    "fp32": Tolerance(1e-4, 1e-6, "fp32"),
    "fp16": Tolerance(1e-2, 1e-4, "fp16"),
    "int8": Tolerance(1e-1, 1e-3, "int8"),
}
# ONNX Runtime lands up to 2.1x as far from the exact answer as the dithered estimate of
# PyTorch's float32 rounding (median 0.49x over 32 random 50-layer conv-BN-ReLU chains
# calibrated on their batch: `python benchmarks/rounding_factor.py --seeds 32`, 2026-12-07):
# 4x leaves room for the tail.
ROUNDING_FACTOR = 4.0
DITHERS = 4  # dithered runs :func:`measured_rounding` adds to the plain one
MEASURED = ("fp32", "fp16")  # the precisions whose bound scales with the measured rounding


def tolerance_for(precision: str, *, atol: float | None = None, rounding: float = 0.0) -> Tolerance:
    """The policy for ``precision``; ``atol`` (None: the default) replaces the absolute floor.

    ``rounding`` is the reference's measured rounding in that precision
    (:func:`measured_rounding`); it scales the bound of an ``fp32`` or ``fp16`` check (see the
    module docstring), not of an ``int8`` one.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`, or ``rounding`` is
            negative or not finite.
    """
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not (math.isfinite(rounding) and rounding >= 0):
        raise ValueError(f"rounding must be a finite share >= 0, got {rounding!r}")
    policy = TOLERANCES[precision]
    if atol is not None:
        policy = replace(policy, atol=atol)
    return replace(policy, rounding=rounding) if precision in MEASURED else policy


def measured_rounding(
    model: Any, inputs: Any, *, precision: str = "fp32", dithers: int = DITHERS
) -> float:
    """How far PyTorch's runs of ``model`` in ``precision`` land from its float64 run.

    ``max|got - f64| / max|f64|`` on ``inputs``, the largest over the plain run in
    ``precision`` (``fp32`` or ``fp16``) and ``dithers`` runs with every weight and buffer
    moved by one ulp up or down at random (Monte Carlo arithmetic: each is another, equally
    valid rounding of the same graph, as the rounding of a fold's weights is). One run alone is
    one draw of the rounding: ONNX Runtime landed up to 3.1x further from the exact answer than
    PyTorch's plain float32 run, and at most 2.1x further than the largest of five
    (``benchmarks/rounding_factor.py``). Both runs are of ``model`` itself, so a wrong transform
    cannot widen the bound it is judged by. Seeded: the same model gives the same figure.

    Args:
        model: The graph an artefact holds (for an export, the folded model); not changed.
        inputs: The verification inputs.
        precision: ``fp32`` or ``fp16``.
        dithers: Dithered runs besides the plain one.

    Returns:
        The share of the float64 output's scale; 1.0 (all of it) when an output in
        ``precision`` holds NaN or Inf, or is further off still; 0 when the float64 output is
        zero or not finite, or when PyTorch cannot run the model in ``precision`` here (not
        measured: the bound stays the fixed one).
    """
    import copy

    import torch

    from pipeline.core.outputs import flatten

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    with torch.no_grad():
        work = copy.deepcopy(model).cpu().double().eval()
        want = flatten(work(inputs.double()))  # several outputs: each against its own scale
        scales = {k: float(v.abs().max()) if v.numel() else 0.0 for k, v in want.items()}
        want = {k: v for k, v in want.items() if math.isfinite(scales[k]) and scales[k] > 0}
        if not want:
            return 0.0
        work.to(dtype)
        tensors = [t for t in (*work.parameters(), *work.buffers()) if t.is_floating_point()]
        plain = [t.clone() for t in tensors] if dithers else []
        gen = torch.Generator().manual_seed(0)
        try:
            err = _distance(work, inputs.to(dtype), want, scales)
            for _ in range(dithers):
                for t, value in zip(tensors, plain, strict=True):
                    up = torch.rand(t.shape, generator=gen) < 0.5
                    t.copy_(torch.nextafter(value, torch.where(up, math.inf, -math.inf).to(dtype)))
                err = max(err, _distance(work, inputs.to(dtype), want, scales))
        except (RuntimeError, NotImplementedError):  # an op without a kernel in this dtype
            return 0.0
    return min(err, 1.0) if math.isfinite(err) else 1.0


def _distance(model: Any, inputs: Any, want: dict, scales: dict[str, float]) -> float:
    """The largest output's error as a share of that output's float64 scale."""
    from pipeline.core.outputs import flatten

    got = flatten(model(inputs))
    return max(float((got[k].double() - v).abs().max()) / scales[k] for k, v in want.items())
