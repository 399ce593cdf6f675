"""What a latency budget reports: target, predicted and measured latency, where, and whether it
was reached (``report.json["budget"]["latency"]``, ``report.md``, the last log line), and the
latency model as ``recede inspect --latency-table`` prints it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.graph.latency_cost import LatencyModel


@dataclass(frozen=True)
class Measured:
    """A final measurement: the pruned model's p50 of every run (load included) and its
    quietest block's median (the latency without the machine's load, what the budget steers
    by), and the dense model's p50 timed in the same blocks."""

    p50_ms: float
    quiet_ms: float
    dense_p50_ms: float


@dataclass(frozen=True)
class LatencyBudgetSummary:
    """The latency budget's outcome.

    ``predicted_ms`` is the latency model's prediction for the cut taken; ``measured_ms`` the
    exported pruned model timed on the deployment (p50 of 100 runs, after fine-tuning in a
    run), ``measured_quiet_ms`` its quietest block's median (``reached`` compares this one
    with the target: on an idle machine the two agree, on a loaded one the p50 carries the
    load), ``dense_measured_ms`` the dense model's p50 timed in the same alternating blocks
    (so the load shows); ``table_error`` the model's largest relative error on held-out width
    profiles; ``remeasures`` how often the cut moved up after a measurement over the target;
    ``round_to`` the rounding of kept widths the cut chose; ``cache`` ``hit`` (nothing
    measured before training) or ``built`` (``build_seconds`` of measurement).
    """

    target_ms: float
    predicted_ms: float
    measured_ms: float
    measured_quiet_ms: float
    dense_measured_ms: float
    backend: str
    device: str
    precision: str
    batch: int
    threads: int
    clock: str
    table_error: float | None
    dense_predicted_ms: float
    reached: bool
    remeasures: int
    round_to: int
    cache: str
    build_seconds: float

    @property
    def deployment(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return (
            f"{self.backend} {self.device} {self.precision}, batch {self.batch}, {threads}, "
            f"{self.clock} clock"
        )

    def line(self) -> str:
        """``latency budget reached: measured 0.21 ms (p50 0.24 under the machine's load;
        predicted 0.20) for target 0.22 ms on onnxruntime cpu fp32, batch 1, 1 thread, cpu
        clock``."""
        verdict = "reached" if self.reached else "MISSED"
        line = (
            f"latency budget {verdict}: measured {self.measured_quiet_ms:.4g} ms (p50 "
            f"{self.measured_ms:.4g} under the machine's load; predicted {self.predicted_ms:.4g})"
            f" for target {self.target_ms:.4g} ms on {self.deployment}"
        )
        if not self.reached:
            line += (
                "; the cut could not go further up the ranking within the layer floors or the "
                "re-measure bound: raise prune.max_layer_ratio, lower prune.min_channels or "
                "raise train.target_latency_ms"
            )
        return line


def latency_budget_markdown(latency: Mapping[str, Any]) -> str:
    """The report.md paragraph of a latency budget (``report.json["budget"]["latency"]``)."""
    error = latency.get("table_error")
    error_text = "not measured" if error is None else f"{error:.1%}"
    verdict = "**reached**" if latency["reached"] else "**missed**"
    threads = latency["threads"]
    return (
        f"**Latency budget:** target {latency['target_ms']:.4g} ms, predicted "
        f"{latency['predicted_ms']:.4g} ms, measured {latency['measured_quiet_ms']:.4g} ms "
        f"(quietest block; p50 of every run {latency['measured_ms']:.4g} ms): {verdict} "
        f"(within 5% of the target counts) on {latency['backend']} {latency['device']} "
        f"{latency['precision']}, batch {latency['batch']}, {threads} thread"
        f"{'s' if threads != 1 else ''}, {latency['clock']} clock. Dense model predicted "
        f"{latency['dense_predicted_ms']:.4g} ms, measured {latency['dense_measured_ms']:.4g} "
        "ms beside the pruned one; the latency model's error on held-out width "
        f"profiles {error_text}; the cut moved up {latency['remeasures']} time(s) after "
        f"measuring, widths rounded to {latency['round_to']}; latency model {latency['cache']}"
        + (f" ({latency['build_seconds']:.1f} s)." if latency["cache"] == "built" else ".")
    )


def latency_table_text(model: LatencyModel) -> str:
    """The latency model in words and tables: deployment, calibration, profiles, layer tables."""
    error = "n/a" if model.table_error is None else f"{model.table_error:.1%}"
    lines = [
        f"latency model: {model.describe()}; blocks of {model.align} channels, fast widths "
        f"multiples of {model.quantum}",
        f"predicted = {model.offset_ms:.4g} ms + {model.scale:.4g} x table sum; dense "
        f"{model.dense_ms:.4g} ms; held-out error {error}; built in {model.build_seconds:.1f} s",
        "",
        "| profile | role | table sum ms | predicted ms | measured ms | error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {p.label} | {p.role} | {p.table_ms:.4f} | {p.predicted_ms:.4f} | "
        f"{p.measured_ms:.4f} | {p.error:+.1%} |"
        for p in model.profiles
    ]
    for t in model.layers:
        lines += ["", f"{t.name} ({t.kind}, {t.full_in} -> {t.full_out}), ms per input width (rows)"
                  + (" and output width (columns)" if t.out_points else "")]  # fmt: skip
        lines.append("| in \\ out | " + " | ".join(str(o) for o in t.out_points or ("",)) + " |")
        lines.append("|---:|" + "---:|" * max(1, len(t.out_points)))
        lines += [
            f"| {c} | " + " | ".join(f"{v:.4f}" for v in row) + " |"
            for c, row in zip(t.in_points, t.ms, strict=True)
        ]
    return "\n".join(lines)
