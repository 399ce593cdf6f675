"""``recede run`` under a latency budget, end to end on digits (small enough for the default
suite): the latency model is measured once and cached, training drives to it, the cut is
measured, and report.json, report.md and the last line say target, predicted and measured."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.data.datasets import load_data
from pipeline.run.latency_budget import latency_model_for_run
from pipeline.run.pipeline import run_pipeline

SMALL = [
    "data.image_size=16",
    "data.train_limit=256",
    "model.width=0.125",
    "train.epochs=1",
    "train.target_cost=latency",  # the demo's train.target 0.5 stays: it is not used
    "prune.finetune_epochs=0",
    "bench.batches=[1]",
    "export.int8.enabled=false",  # the budget is fp32's; INT8 export is tested on its own
    "export.allow_slower=true",  # a 0.125-wide net at 16 px: its speed is not this test's
]


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("latency_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECEDE_CACHE", str(root / "cache"))
        probe = load_config("configs/demo.yaml", [*SMALL, "train.target_latency_ms=1000"])
        data = load_data(probe.data, seed=0)
        lm, hit = latency_model_for_run(
            load_config("configs/demo.yaml", [*SMALL, "train.target_latency_ms=1e-9"]), data
        )
        cfg = load_config(
            "configs/demo.yaml", [*SMALL, f"train.target_latency_ms={0.7 * lm.dense_ms!r}"]
        )
        report = run_pipeline(cfg, root / "run")
        again = latency_model_for_run(cfg, data)
    return root / "run", report, lm, hit, again


def test_the_latency_model_is_built_once_then_read_from_the_cache(latency_run):
    _, report, lm, hit, (again, hit_again) = latency_run
    assert not hit and hit_again and again == lm
    assert report.latency_budget.cache == "hit" and report.latency_budget.build_seconds == 0.0


def test_report_json_says_target_predicted_and_measured(latency_run):
    run, report, lm, *_ = latency_run
    latency = json.loads((run / "report.json").read_text())["budget"]["latency"]
    assert set(latency) >= {"target_ms", "predicted_ms", "measured_ms", "backend", "device",
                            "precision", "batch", "threads", "clock", "table_error"}  # fmt: skip
    assert latency["target_ms"] == pytest.approx(0.7 * lm.dense_ms)
    assert latency["table_error"] == pytest.approx(lm.table_error)
    assert latency["measured_ms"] > 0 and latency["reached"] == (
        latency["measured_quiet_ms"] <= 1.05 * latency["target_ms"]
    )
    budget = json.loads((run / "report.json").read_text())["budget"]
    assert budget["cost"] == "latency" and budget["target"] == pytest.approx(0.3, abs=0.01)


def test_report_md_and_the_last_line_say_whether_it_was_reached(latency_run):
    run, report, *_ = latency_run
    md = (run / "report.md").read_text()
    assert "**Latency budget:** target" in md and "measured" in md and "predicted" in md
    line = report.outcome()
    verdict = "reached" if report.latency_budget.reached else "MISSED"
    assert f"latency budget {verdict}: measured" in line and "for target" in line
    assert (run / "latency_model.json").is_file()
