"""The typed result of ``recede run``: what was measured and verified, written as report.json.

:meth:`RunReport.to_dict` gives the report.json keys the README documents (and
``pipeline.run.report.render_markdown`` renders); the field order is the key order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.train.stage import BudgetSummary

if TYPE_CHECKING:
    from pipeline.bench.timing import LatencyRow
    from pipeline.core.checks import Check
    from pipeline.export.int8_check import Int8Check


@dataclass(frozen=True)
class DenseSummary:
    """The trained model before pruning."""

    params: int
    macs: int
    accuracy: float


@dataclass(frozen=True)
class PrunedSummary:
    """The pruned, fine-tuned model."""

    params: int
    macs: int
    accuracy_before_finetune: float
    accuracy_recalibrated: float | None
    accuracy: float
    channels_kept: int
    channels_total: int


@dataclass(frozen=True)
class ThresholdSummary:
    """How the cut was chosen: ``mode`` is ``ratio``, ``auto`` or ``value``."""

    mode: str
    value: float


@dataclass(frozen=True)
class ExportSummary:
    """The ONNX checks: the pruned model's in full, the dense model's error, bound and verdict."""

    onnx_path: str
    max_abs_err: float
    max_rel_err: float
    opset: int
    passed: bool
    bound: float
    tolerance: dict[str, Any]
    dense_max_abs_err: float
    dense_passed: bool
    dense_bound: float
    verdict: str = "ok"
    sensitivity: float = 0.0
    checks: list[dict[str, Any]] = field(default_factory=list)  # every Check, as dicts

    @classmethod
    def from_checks(
        cls, pruned: Check, dense: Check, onnx_path: str, checks: list[Check] = ()
    ) -> ExportSummary:
        """``onnx_path`` is the pruned ONNX file, relative to the run folder (reports never carry
        absolute paths, so a run folder can be moved or shipped); ``checks`` are every check of
        the run (removal, folds, ONNX), recorded with relative paths."""
        from dataclasses import replace
        from pathlib import PurePath

        return cls(
            onnx_path=onnx_path,
            max_abs_err=pruned.max_abs_err,
            max_rel_err=pruned.max_rel_err,
            opset=pruned.opset,
            passed=pruned.passed,
            bound=pruned.bound,
            tolerance=pruned.tolerance,
            dense_max_abs_err=dense.max_abs_err,
            dense_passed=dense.passed,
            dense_bound=dense.bound,
            verdict=pruned.verdict,
            sensitivity=pruned.sensitivity,
            checks=[replace(c, path=c.path and PurePath(c.path).name).to_dict() for c in checks],
        )

    def failures(self) -> list[tuple[str, float, float]]:
        """``(label, error, bound)`` of each check that failed, pruned first."""
        checks = (
            ("pruned", self.passed, self.max_abs_err, self.bound),
            ("dense", self.dense_passed, self.dense_max_abs_err, self.dense_bound),
        )
        return [(label, err, bound) for label, passed, err, bound in checks if not passed]


@dataclass(frozen=True)
class GroupSummary:
    """Channel groups: how many were dropped and how exactly their removal was absorbed."""

    total: int
    prunable: int
    dropped: int
    absorbed_exactly: int
    approximate: int
    corrections: list[list[str]]
    removal_rel_err: float
    zeroing_rel_err: float
    scale_bound: float
    barriers: list[dict[str, Any]]


def _reduction(before: int, after: int) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"


@dataclass(frozen=True)
class RunReport:
    """Everything ``recede run`` reports; ``seconds`` is the wall time of the whole run."""

    dense: DenseSummary
    pruned: PrunedSummary
    threshold: ThresholdSummary
    export: ExportSummary
    latency: tuple[LatencyRow, ...]
    groups: GroupSummary
    environment: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    budget: BudgetSummary | None = None
    int8: dict[str, Any] | None = None  # the pruned INT8 graph's record, with "dense": the dense's

    def to_dict(self) -> dict[str, Any]:
        """The report.json content (keys documented in the README)."""
        return {
            "dense": asdict(self.dense),
            "pruned": asdict(self.pruned),
            "threshold": asdict(self.threshold),
            "export": asdict(self.export),
            "latency": [r.to_dict() for r in self.latency],
            "groups": asdict(self.groups),
            "environment": dict(self.environment),
            "seconds": round(self.seconds, 1),
            "budget": asdict(self.budget) if self.budget else None,
            "int8": self.int8,
            "speed": self.speed() or None,
        }

    def outcome(self) -> str:
        """The run in one line: accuracy before and after, MACs and parameters removed, and
        whether training reached its budget (the line ``recede run`` ends with), e.g.
        ``accuracy 97.50% -> 97.22% (-0.28 pp), MACs -62.0%, params -70.1%; budget reached:
        receded 0.498 of target 0.500``."""
        dense, pruned = self.dense, self.pruned
        change = (pruned.accuracy - dense.accuracy) * 100
        parts = [
            f"accuracy {dense.accuracy:.2%} -> {pruned.accuracy:.2%} ({change:+.2f} pp)",
            f"MACs {_reduction(dense.macs, pruned.macs)}",
            f"params {_reduction(dense.params, pruned.params)}",
        ]
        budget = f"; {self.budget.outcome}" if self.budget is not None else ""
        speed = self.speed()
        return (
            ", ".join(parts + _int8_outcome(self.int8)) + budget + (f"; {speed}" if speed else "")
        )

    def speed(self) -> str:
        """The measured ONNX Runtime CPU speed-up of the pruned model per batch, and its ratio to
        the MAC cut (``ONNX Runtime speed-up 3.85x at batch 1 (0.97 of the MAC cut), ...``),
        flagged when under :data:`LOW_SPEEDUP_PER_MAC`; "" without such rows."""
        from pipeline.bench.timing import annotated_rows

        macs = {"dense": self.dense.macs, "pruned": self.pruned.macs}
        rows = [
            r
            for r in annotated_rows(list(self.latency), macs)
            if (r["backend"], r["device"], r["model"]) == ("onnxruntime", "cpu", "pruned")
            and r["precision"] in ("fp32", "int8")
            and r["speedup"] is not None
        ]
        if not rows:
            return ""
        parts = [_speed_part(r) for r in rows]
        low = [r for r in rows if r["precision"] == "fp32" and _low(r)]
        warning = (
            f" (LOW: under {LOW_SPEEDUP_PER_MAC} of the MAC cut: the kernels do not turn this cut "
            "into time; see docs/decisions.md#speed-against-the-mac-cut)"
            if low
            else ""
        )
        return "ONNX Runtime speed-up " + ", ".join(parts) + warning

    def metrics(self) -> dict[str, Any]:
        """The sections the release manifest records as metrics."""
        report = self.to_dict()
        return {k: report[k] for k in ("dense", "pruned", "export", "int8")}

    def int8_checks(self) -> list[Int8Check]:
        """The INT8 checks (pruned, then dense), for the verdict after the folder is in place."""
        from pipeline.export.int8_check import Int8Check

        if not self.int8:
            return []
        return [Int8Check.from_dict(r["check"]) for r in (self.int8, self.int8["dense"])]


LOW_SPEEDUP_PER_MAC = 0.7
"""A fp32 speed-up below this share of the MAC cut is flagged in the run's last line and report:
a user reading "MACs -71%" expects about 3.5x, and depthwise nets have given half of it."""


def _low(row: dict[str, Any]) -> bool:
    ratio = row.get("speedup_per_mac_ratio")
    return ratio is not None and ratio < LOW_SPEEDUP_PER_MAC


def _speed_part(row: dict[str, Any]) -> str:
    """``3.85x at batch 1 (0.97 of the MAC cut)``; INT8 rows say so and are against dense fp32."""
    ratio = row.get("speedup_per_mac_ratio")
    cut = "" if ratio is None else f" ({ratio:.2f} of the MAC cut)"
    if row["precision"] == "int8":
        return f"{row['speedup']:.2f}x in INT8 at batch {row['batch']}"
    return f"{row['speedup']:.2f}x at batch {row['batch']}{cut}"


def _int8_outcome(int8: dict[str, Any] | None) -> list[str]:
    """``INT8 99.72% (-0.28 pp, ok)`` for the pruned INT8 graph, or nothing."""
    if not int8:
        return []
    check = int8["check"]
    change = int8["accuracy"] - int8["fp32_accuracy"]
    return [f"INT8 {int8['accuracy']:.2f}% ({change:+.2f} pp, {check['verdict']})"]
