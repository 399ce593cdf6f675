"""The typed result of ``recede run``: what was measured and verified, written as report.json.

:meth:`RunReport.to_dict` gives the report.json keys the README documents (and
``pipeline.run.report.render_markdown`` renders); the field order is the key order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.run.latency_report import LatencyBudgetSummary
from pipeline.train.stage import BudgetSummary

if TYPE_CHECKING:
    from pipeline.bench.timing import LatencyRow
    from pipeline.core.checks import Check


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
    latency_budget: LatencyBudgetSummary | None = None  # report.json budget.latency

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
            "budget": self._budget_dict(),
        }

    def _budget_dict(self) -> dict[str, Any] | None:
        """The budget section; a latency budget's own outcome under ``latency``."""
        if self.budget is None:
            return None
        budget = asdict(self.budget)
        if self.latency_budget is not None:
            budget["latency"] = asdict(self.latency_budget)
        return budget

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
        if self.latency_budget is not None:
            budget += f"; {self.latency_budget.line()}"
        return ", ".join(parts) + budget

    def metrics(self) -> dict[str, Any]:
        """The sections the release manifest records as metrics."""
        report = self.to_dict()
        return {k: report[k] for k in ("dense", "pruned", "export")}
