"""The typed run report: report.json keys, verdicts, Markdown and the run plots."""

from __future__ import annotations

import json

import pytest

from pipeline.bench.timing import LatencyRow
from pipeline.run.plots import plot_run
from pipeline.run.report import render_markdown
from pipeline.run.run_report import (
    DenseSummary,
    ExportSummary,
    GroupSummary,
    PrunedSummary,
    RunReport,
    ThresholdSummary,
)

ROWS = (
    LatencyRow("torch", "cpu", "dense", 1, 2, 4.0, 4.5, 5.0),
    LatencyRow("torch", "cpu", "pruned", 1, 2, 2.0, 2.2, 2.5),
)


def _export(passed: bool = True, dense_passed: bool = True) -> ExportSummary:
    return ExportSummary(
        onnx_path="runs/x/pruned.onnx",
        max_abs_err=2e-7 if passed else 3e-3,
        max_rel_err=1e-7,
        opset=17,
        passed=passed,
        bound=1e-4,
        tolerance={"policy": "fp32"},
        dense_max_abs_err=1e-7 if dense_passed else 5e-3,
        dense_passed=dense_passed,
        dense_bound=2e-4,
    )


def _report(export: ExportSummary) -> RunReport:
    return RunReport(
        dense=DenseSummary(params=1000, macs=5000, accuracy=0.9),
        pruned=PrunedSummary(400, 2000, 0.5, None, 0.88, 30, 100),
        threshold=ThresholdSummary("ratio", 0.4),
        export=export,
        latency=ROWS,
        groups=GroupSummary(10, 8, 3, 2, 1, [["conv1", "bias"]], 1e-7, 2e-7, 0.0, []),
        environment={"torch": "2.x", "python": "3.12"},
        seconds=12.34,
    )


def test_to_dict_keeps_the_report_json_keys_and_order():
    report = _report(_export()).to_dict()
    assert list(report) == [
        "dense", "pruned", "threshold", "export", "latency", "groups", "environment", "seconds",
        "budget", "int8", "speed",
    ]  # fmt: skip
    assert report["budget"] is None  # this report states no budget
    assert list(report["export"]) == [
        "onnx_path", "max_abs_err", "max_rel_err", "opset", "passed", "bound", "tolerance",
        "dense_max_abs_err", "dense_passed", "dense_bound", "verdict", "sensitivity", "checks",
    ]  # fmt: skip
    assert report["pruned"]["accuracy_recalibrated"] is None
    assert report["threshold"] == {"mode": "ratio", "value": 0.4}
    assert report["latency"][1]["model"] == "pruned" and report["seconds"] == 12.3
    assert json.loads(json.dumps(report)) == report  # plain JSON, nothing typed left in it
    assert _report(_export()).metrics() == {
        k: report[k] for k in ("dense", "pruned", "export", "int8")
    }
    assert report["int8"] is None and report["speed"] is None  # no INT8, no ONNX Runtime rows


@pytest.mark.parametrize(
    ("passed", "dense_passed", "failed"),
    [(True, True, []), (False, True, ["pruned"]), (True, False, ["dense"]),
     (False, False, ["pruned", "dense"])],
)  # fmt: skip
def test_failures_name_each_failed_check(passed, dense_passed, failed):
    failures = _export(passed, dense_passed).failures()
    assert [label for label, _, _ in failures] == failed
    assert all(err > bound for _, err, bound in failures)


def test_markdown_renders_the_typed_report():
    text = render_markdown(_report(_export()).to_dict())
    assert "1,000" in text and "400" in text and "90.00%" in text and "88.00%" in text
    assert "runs/x/pruned.onnx" in text and "ratio = 0.4" in text


@pytest.mark.parametrize("rows", [ROWS, ()])
def test_plot_run_writes_each_plot(tmp_path, rows):
    plots = plot_run(tmp_path, [0.01, 0.02, 1.0, 1.1], 0.5, {"conv1": (3, 8)}, rows)
    expected = {"importance_hist", "kept_channels"} | ({"latency"} if rows else set())
    assert set(plots) == expected
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots.values())


def _budgeted(receded: float, reachable: float) -> RunReport:
    from dataclasses import replace

    from pipeline.train.polarise import budget_outcome, budget_reached
    from pipeline.train.stage import BudgetSummary

    outcome = budget_outcome(0.5, receded, reachable)
    summary = BudgetSummary(0.5, "macs", receded, reachable, budget_reached(0.5, receded), outcome)
    return replace(_report(_export()), budget=summary)


def test_the_run_outcome_is_one_line_with_the_budget_verdict():
    assert _report(_export()).outcome() == (
        "accuracy 90.00% -> 88.00% (-2.00 pp), MACs -60.0%, params -60.0%"
    )
    line = _budgeted(0.209, 0.8).outcome()
    assert "\n" not in line and line.endswith("lower train.target")
    assert "; budget MISSED: receded 0.209, target 0.500; train longer" in line


def test_a_missed_budget_advice_fits_its_cause():
    floors = _budgeted(0.3, 0.31).budget.outcome  # the floors cap it: more epochs cannot help
    assert "layer floors let at most 0.310 recede" in floors and "train longer" not in floors
    assert "train longer" in _budgeted(0.3, 0.9).budget.outcome


def test_report_md_states_the_budget_with_its_unit_and_the_floors():
    text = render_markdown(_budgeted(0.209, 0.8).to_dict())
    line = next(x for x in text.splitlines() if x.startswith("**Training budget:**"))
    assert "budget MISSED: receded 0.209, target 0.500" in line
    assert line.endswith("Shares count the MACs; the layer floors let at most 0.800 recede.")
    assert text.index("**Training budget:**") < text.index("## Before / after")


def test_report_md_links_resolve_to_the_plots_of_the_run(tmp_path):
    import re

    plots = plot_run(tmp_path, [0.001, 0.002, 1.0, 1.1], 0.5, {"conv1": (3, 8)}, ROWS)
    links = {name: p.relative_to(tmp_path).as_posix() for name, p in plots.items()}
    text = render_markdown(_report(_export()).to_dict(), links)
    found = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", text)
    assert sorted(found) == sorted(links.values()) and len(found) == 3
    assert all((tmp_path / link).is_file() for link in found)


def _ort(model: str, batch: int, p50: float, precision: str = "fp32") -> LatencyRow:
    return LatencyRow("onnxruntime", "cpu", model, batch, 1, p50, p50, p50, precision=precision,
                      blocks_ms=(p50,) * 5)  # fmt: skip


@pytest.mark.parametrize(
    ("pruned_p50", "low"),
    [(1.0, False), (2.0, True)],  # 2.5x faster (1.0 of the cut) and 1.25x (0.5 of it)
)
def test_the_outcome_states_the_measured_speed_against_the_mac_cut(pruned_p50, low):
    import dataclasses

    # dense 5000 MACs, pruned 2000: a 2.5x cut; dense p50 4.0 ms
    rows = (_ort("dense", 1, 4.0), _ort("pruned", 1, pruned_p50 * 1.6),
            _ort("pruned", 1, 1.0, "int8"))  # fmt: skip
    report = dataclasses.replace(_report(_export()), latency=rows)
    speed = report.speed()
    gain = 4.0 / (pruned_p50 * 1.6)
    assert f"{gain:.2f}x at batch 1 ({gain / 2.5:.2f} of the MAC cut)" in speed
    assert "4.00x in INT8 at batch 1" in speed  # against dense fp32
    assert ("LOW: under 0.7 of the MAC cut" in speed) is low
    assert speed in report.outcome() and report.to_dict()["speed"] == speed
    assert f"**Speed:** {speed}." in render_markdown(report.to_dict())
