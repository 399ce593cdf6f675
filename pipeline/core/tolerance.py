"""One tolerance policy for every comparison of an artefact with PyTorch, relative to the output scale.

``run``, ``export`` and ``bench`` all ask :func:`tolerance_for` how far an exported model (ONNX,
FP16 ONNX, a TensorRT engine) may stray from the float32 PyTorch model it came from. An output is
accepted when ``max|got - ref| <= rtol * max|ref| + atol``: relative, because a network whose
logits are in the hundreds rounds differently from one whose logits are below one, with a tiny
absolute floor for outputs that are all near zero. NaN or Inf never passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Tolerance:
    """``max|got - ref| <= rtol * max|ref| + atol``.

    Attributes:
        rtol: Share of the reference output's largest magnitude.
        atol: Absolute floor, for outputs that are all near zero.
        precision: What the tolerance is for (``fp32``, ``fp16``, ``int8``).
    """

    rtol: float
    atol: float
    precision: str = "fp32"

    def bound(self, scale: float) -> float:
        """Largest error allowed when the reference output's largest magnitude is ``scale``."""
        return self.rtol * scale + self.atol

    def allows(self, max_abs_err: float, scale: float) -> bool:
        """Whether ``max_abs_err`` is within bounds; False for NaN or Inf."""
        return math.isfinite(max_abs_err) and max_abs_err <= self.bound(scale)

    def to_dict(self) -> dict[str, float | str]:
        return {"precision": self.precision, "rtol": self.rtol, "atol": self.atol}


# fp32: the export graph computes the same sums in another order (~1e-7 of the scale per layer).
# fp16: a 10-bit mantissa (~5e-4) over tens of layers; measured 2.3e-4 on the demo VGG.
# int8: calibrated quantisation, a coarse sanity bound that still catches a wrong engine.
TOLERANCES = {
    "fp32": Tolerance(1e-4, 1e-6, "fp32"),
    "fp16": Tolerance(1e-2, 1e-4, "fp16"),
    "int8": Tolerance(1e-1, 1e-3, "int8"),
}


def tolerance_for(precision: str, *, atol: float | None = None) -> Tolerance:
    """The policy for ``precision``; ``atol`` (None: the default) replaces the absolute floor.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    policy = TOLERANCES[precision]
    return policy if atol is None else replace(policy, atol=atol)
