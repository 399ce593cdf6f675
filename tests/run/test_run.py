"""End to end on real data (scikit-learn digits), small enough for the default suite."""

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.export.manifest import verify_manifest
from pipeline.prune.threshold import NotBimodalError
from pipeline.run.pipeline import run_pipeline

SMALL = [
    "data.image_size=16",
    "model.width=0.125",
    "train.epochs=1",
    "train.penalty.strength=0.01",
    "prune.threshold=ratio",
    "prune.ratio=0.4",
    "prune.finetune_epochs=1",
    "bench.batches=[1, 4]",
    "export.allow_slower=true",  # a 0.125-wide model's latency is overhead: speed is not tested here
    "export.int8.max_drop=2.0",  # 7 of 360 digits: a one-epoch model sits near its boundaries
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = load_config("configs/demo.yaml", SMALL)
    base = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        run_pipeline(cfg, "runs/small")  # a relative folder, as `make demo` passes
    return base / "runs" / "small"


def test_report_has_every_promised_key(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["dense"]) >= {"params", "macs", "accuracy"}
    assert set(report["pruned"]) >= {
        "params",
        "macs",
        "accuracy_before_finetune",
        "accuracy",
        "channels_kept",
        "channels_total",
    }
    assert report["threshold"] == {"mode": "ratio", "value": 0.4}
    budget = report["budget"]  # target vs achieved, and the verdict the log and report.md state
    assert budget["target"] == 0.5 and budget["receded"] is not None
    assert budget["reached"] == (budget["receded"] >= 0.48)
    assert budget["outcome"].startswith("budget reached" if budget["reached"] else "budget MISSED")
    assert budget["outcome"] in (run_dir / "report.md").read_text()
    assert report["export"]["opset"] >= 17 and report["export"]["max_abs_err"] <= 1e-4
    assert set(report["environment"]) >= {"torch", "onnxruntime", "python", "cpu"}
    assert 0.0 <= report["pruned"]["accuracy"] <= 1.0
    assert report["pruned"]["macs"] < report["dense"]["macs"]
    assert report["pruned"]["channels_kept"] < report["pruned"]["channels_total"]
    rows = report["latency"]
    assert {(r["backend"], r["model"], r["batch"]) for r in rows} == {
        (b, m, n) for b in ("torch", "onnxruntime") for m in ("dense", "pruned") for n in (1, 4)
    }
    threads = load_config("configs/demo.yaml", SMALL).bench.threads
    assert all(r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["threads"] == threads for r in rows)


def test_run_folder_is_complete_and_verifiable(run_dir):
    for name in (
        "config.yaml",
        "report.md",
        "plan.json",
        "dense.onnx",
        "pruned.onnx",
        "importance_hist.png",
        "kept_channels.png",
        "latency.png",
        "pruned/model.pt",
        "pruned/shapes.json",
        "trained/model.pt",
        "checkpoints/train_last.pt",
    ):
        assert (run_dir / name).is_file(), name
    assert verify_manifest(run_dir / "manifest.json") == []
    md = (run_dir / "report.md").read_text()  # the plots are embedded by relative links
    for png in ("importance_hist.png", "kept_channels.png", "latency.png"):
        assert f"]({png})" in md, png
    assert load_config(run_dir / "config.yaml") == load_config("configs/demo.yaml", SMALL)
    assert (
        run_dir
        / json.loads((run_dir / "manifest.json").read_text())["artefacts"]["pruned_onnx"]["path"]
    ).is_file()


def test_the_run_ships_verified_int8_graphs_timed_beside_fp32(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    int8 = report["int8"]
    for record in (int8, int8["dense"]):
        assert set(record) >= {"accuracy", "fp32_accuracy", "agreement", "max_logit_error",
                               "excluded_nodes", "calibration", "check"}  # fmt: skip
        check = record["check"]
        assert check["verdict"] == "ok" and check["measured"]["labelled"]
        assert check["measured"]["samples"] == 360  # the whole digits test split, held out
        assert check["wrong"]["drop"] >= 2 * check["max_drop"]  # a wrong model would fail
        assert (run_dir / record["path"]).is_file()
    assert int8["calibration"]["calibration_split"] == "train"
    assert int8["calibration"]["calibration_samples"] == 512
    assert int8["path"] == "pruned.int8.onnx" and int8["dense"]["path"] == "dense.int8.onnx"
    rows = [(r["backend"], r["model"], r["precision"], r["batch"]) for r in report["latency"]]
    for model in ("dense", "pruned"):
        for batch in (1, 4):
            assert ("onnxruntime", model, "int8", batch) in rows
            assert ("torch", model, "int8", batch) not in rows  # INT8 is an ONNX Runtime graph
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"dense_int8_onnx", "pruned_int8_onnx"} <= set(manifest["artefacts"])
    assert manifest["metrics"]["int8"]["check"]["verdict"] == "ok"
    assert manifest["preprocessing"]["class_names"] == [str(d) for d in range(10)]
    assert manifest["preprocessing"]["mean"] == [0.5] and manifest["preprocessing"]["std"] == [0.5]
    md = (run_dir / "report.md").read_text()
    assert "## INT8" in md and "| pruned (`pruned.int8.onnx`)" in md
    assert "| onnxruntime | cpu | pruned | int8 | 1 |" in md


def test_prune_from_a_run_folder_uses_its_trained_model(run_dir, tmp_path):
    from pipeline.cli.main import main

    assert (
        main(["prune", "--from", str(run_dir), "--ratio", "0.3", "--out", str(tmp_path / "p")]) == 0
    )
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    dense = json.loads((run_dir / "report.json").read_text())["dense"]
    assert report["params"]["before"] == dense["params"]  # the trained model, not the pruned one


def test_auto_threshold_refuses_an_unpolarised_model(tmp_path):
    cfg = load_config("configs/demo.yaml", SMALL[:3] + ["train.epochs=0", "prune.threshold=auto"])
    with pytest.raises(NotBimodalError, match="prune.threshold=ratio") as info:
        run_pipeline(cfg, tmp_path / "run")
    trained = tmp_path / ".run.partial" / "trained"
    assert f"the trained model is kept in {trained}" in str(info.value)
    assert "--resume (no retraining)" in str(info.value)
    assert not (tmp_path / "run").exists()  # nothing at the final path
    assert (trained / "model.pt").is_file() and (trained / "shapes.json").is_file()


def test_a_failing_dense_export_fails_the_run(tmp_path, monkeypatch):
    # the dense ONNX's verification used to be logged and ignored
    import dataclasses

    import pipeline.export.onnx as onnx_export
    from pipeline.core.checks import VerificationError

    real = onnx_export.verify_onnx

    def dense_fails(path, *args, **kwargs):
        result = real(path, *args, **kwargs)
        if Path(path).name != "dense.onnx":
            return result
        return dataclasses.replace(result, verdict="failed", cause="injected")

    monkeypatch.setattr(onnx_export, "verify_onnx", dense_fails)
    cfg = load_config("configs/demo.yaml", [*SMALL, "prune.finetune_epochs=0"])
    with pytest.raises(
        VerificationError, match=r"dense \(dense.onnx\) failed verification: injected"
    ):
        run_pipeline(cfg, tmp_path / "run")


def _slower_table(real):
    """latency_table, with the pruned model's ONNX Runtime rows made 3x slower than dense."""
    import dataclasses

    def table(*args, **kwargs):
        rows = real(*args, **kwargs)
        dense = {(r.setting, r.batch): r for r in rows if r.model == "dense"}

        def slow(r):
            ref = dense[(r.setting, r.batch)]
            blocks = [b * 3 for b in ref.blocks_ms]
            return dataclasses.replace(r, blocks_ms=blocks, p50_ms=ref.p50_ms * 3)

        return [slow(r) if r.model == "pruned" and r.backend == "onnxruntime" else r for r in rows]

    return table


@pytest.mark.parametrize("allow", [False, True])
def test_a_pruned_model_slower_than_dense_fails_the_run_unless_allowed(
    tmp_path, monkeypatch, allow
):
    import pipeline.bench.sweep as sweep
    from pipeline.bench.speed_gate import SlowerError

    monkeypatch.setattr(sweep, "latency_table", _slower_table(sweep.latency_table))
    overrides = [*SMALL, "prune.finetune_epochs=0", "export.int8.enabled=false",
                 f"export.allow_slower={str(allow).lower()}"]  # fmt: skip
    cfg = load_config("configs/demo.yaml", overrides)
    if allow:
        run_pipeline(cfg, tmp_path / "run")
    else:
        with pytest.raises(SlowerError, match=r"slower than the dense one .* onnxruntime cpu fp32 "
                           r"batch 1 \(pruned\).*prune.round_to=8.*--allow-slower"):  # fmt: skip
            run_pipeline(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())  # written either way
    from pipeline.bench.timing import LatencyRow, annotated_rows

    rows = annotated_rows([LatencyRow.from_mapping(r) for r in report["latency"]])
    flagged = {(r["backend"], r["batch"]) for r in rows if "slower" in r["flags"]}
    assert {("onnxruntime", 1), ("onnxruntime", 4)} <= flagged  # the injected rows
    assert all(r["speedup_high"] < 1 for r in rows if "slower" in r["flags"])  # and only slower
    assert "slower" in (tmp_path / "run" / "report.md").read_text()
