"""The INT8 export stage: pre-process, quantize with the sensitive-layer fallback, verify.

One call turns a verified fp32 ONNX file into a verified INT8 one and says what it did:
:func:`pipeline.export.int8.quantize_int8` (ONNX Runtime's static QDQ quantization),
:func:`pipeline.export.int8_fallback.quantize_with_fallback` (layers kept in float while the
validation drop exceeds the bound), :func:`pipeline.export.int8_outputs.verify_int8` (the verdict
on held-out samples, with what a wrong model would show). ``recede run`` calls it for the dense
and the pruned model, ``recede export --format onnx-int8`` for a release.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.export.int8 import CpuInt8, Int8Options, Quantized, cpu_int8_support, preprocess
from pipeline.export.int8_check import Int8Check
from pipeline.export.int8_fallback import Fallback, quantize_with_fallback
from pipeline.export.int8_outputs import verify_int8

if TYPE_CHECKING:
    from pipeline.config import Int8Config
    from pipeline.core.checks import Check
    from pipeline.data.calibration import Int8Samples

logger = logging.getLogger(__name__)

LatencyCost = Callable[[Path, Path], dict[str, Any]]
"""Times the all-INT8 graph against the one with layers kept in float (``bench/`` provides it:
``export/`` does not import the bench)."""


@dataclass(frozen=True)
class Int8Settings:
    """Quantization options, the accuracy bound in points, and the fallback's node limit."""

    options: Int8Options = field(default_factory=Int8Options)
    max_drop: float = 0.5
    fallback_limit: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_drop <= 100.0 or self.fallback_limit < 0:
            raise ValueError(
                f"expected 0 <= max_drop <= 100 (accuracy points) and fallback_limit >= 0, got "
                f"max_drop={self.max_drop!r}, fallback_limit={self.fallback_limit!r}"
            )


@dataclass(frozen=True)
class Int8Export:
    """What :func:`export_int8` wrote and found."""

    path: Path
    check: Int8Check | Check  # a Check when an output judged element-wise decided
    quantized: Quantized
    fallback: Fallback
    samples: dict[str, Any]
    cpu: CpuInt8
    fallback_cost: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """The report.json / manifest entry (``report.json["int8"]`` for the pruned model)."""
        m = getattr(self.check, "measured", None)  # None: an output judged element-wise decided
        fallback = self.fallback
        return {
            "path": self.path.name,
            "accuracy": m and m.int8_accuracy,
            "fp32_accuracy": m and m.fp32_accuracy,
            "agreement": m and m.agreement,
            "max_logit_error": m and m.max_logit_error,
            "excluded_nodes": list(self.quantized.excluded),
            "calibration": {**self.samples, **self.quantized.settings(), "cpu": self.cpu.to_dict()},
            "fallback": {
                "validation_drop_all_int8": fallback.first and fallback.first.drop,
                "validation_drop": fallback.final and fallback.final.drop,
                "trail": [{"tensor": t, "validation_drop": d} for t, d in fallback.trail],
                "ranking": [asdict(e) | {"added_db": e.added} for e in fallback.ranking[:10]],
                "latency": self.fallback_cost,
            },
            "check": self.check.to_dict(),
        }


def export_int8(
    fp32: str | Path,
    out: str | Path,
    samples: Int8Samples,
    settings: Int8Settings,
    *,
    what: str = "onnx-int8",
    latency_cost: LatencyCost | None = None,
    classes: int | None = None,
) -> Int8Export:
    """Quantize the fp32 graph ``fp32`` into ``out`` and verify it (see the module docstring).

    Args:
        fp32: The verified fp32 ONNX file.
        out: The INT8 ONNX file to write.
        samples: Calibration, validation and held-out samples (``pipeline.data.calibration``).
        settings: Options, bound and fallback limit.
        what: Name of the check.
        latency_cost: When layers stay in float, times them against the all-INT8 graph.
        classes: The model's class count: which of several outputs are decisions
            (``pipeline.export.int8_outputs``).

    Returns:
        The file, its check (a failed or insensitive one is returned, not raised) and the
        fallback's record.
    """
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="recede-int8-") as tmp:
        prepared = preprocess(fp32, Path(tmp) / "prepared.onnx")
        fallback = quantize_with_fallback(
            prepared, out,
            (samples.calibration, samples.validation, samples.validation_labels),
            settings.options, max_drop=settings.max_drop, limit=settings.fallback_limit,
            tmp=Path(tmp), classes=classes,
        )  # fmt: skip
        cost = None
        if fallback.excluded and fallback.all_int8 is not None and latency_cost is not None:
            cost = latency_cost(fallback.all_int8, out)
        check = verify_int8(
            out, fp32, samples.heldout, samples.heldout_labels, max_drop=settings.max_drop,
            what=what, classes=classes,
        )  # fmt: skip
    return Int8Export(
        out, check, fallback.quantized, fallback, samples.record(), cpu_int8_support(), cost
    )


def settings_from_config(cfg: Int8Config, **overrides: Any) -> Int8Settings:
    """The export stage's settings from the run config's ``export.int8`` section; keyword
    ``overrides`` (``method``, ``calibration_samples``, ``max_drop``, ``symmetric``) win."""
    from dataclasses import replace

    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    options = Int8Options(
        method=cfg.method,
        calibration_samples=cfg.calibration_samples,
        symmetric=cfg.symmetric,
        activations=cfg.activations,
        reduce_range=cfg.reduce_range,
        percentile=cfg.percentile,
    )
    return Int8Settings(options, cfg.max_drop, cfg.fallback_limit)
