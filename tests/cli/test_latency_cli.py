"""Latency budgets on the command line: every bad input exits 2 before any work and leaves
nothing on disk; ``recede prune --target-ms`` cuts a model to a latency and ``recede inspect
--latency-table`` shows the model it used."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.bench.latency_cache import cache_path, cached_latency_model
from pipeline.bench.latency_profiles import build_latency_model
from pipeline.cli.main import main
from pipeline.config import LatencyConfig, load_config
from pipeline.core.atomic import write_json_atomic
from pipeline.models.zoo import build_model
from pipeline.run.latency_budget import dense_example
from tests.cli.test_cli_bad_inputs import TINY, snapshot
from tests.latency_fakes import synthetic_latency

SMALL = [
    "data.image_size=16",
    "model.width=0.125",
    "train.epochs=1",
    "prune.finetune_epochs=0",
    "train.target=null",
    "train.target_cost=latency",
]


def _refused(tmp_path, capsys, argv, fragment):
    before = snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before  # nothing written: no run folder, no cache
    return err


RUN_CASES = {
    "zero": (["train.target_latency_ms=0"], "train.target_latency_ms must be a latency"),
    "negative": (["train.target_latency_ms=-2"], "train.target_latency_ms must be a latency"),
    "missing": ([], "needs train.target_latency_ms"),
    "unknown_backend": (
        ["train.target_latency_ms=1", "train.latency.backend=openvino"],
        "train.latency.backend must be one of",
    ),
    "tensorrt": (
        ["train.target_latency_ms=1", "train.latency.backend=tensorrt"],
        "train.latency.backend tensorrt",
    ),
    "int8": (
        ["train.target_latency_ms=1", "train.latency.precision=int8"],
        "train.latency.precision int8: the latency model times fp32 graphs only",
    ),
    "int8_with_prune_flags": (  # the INT8 export's own settings do not make it measurable
        [
            "train.target_latency_ms=1",
            "train.latency.precision=int8",
            "export.int8.enabled=true",
        ],
        "the latency model times fp32 graphs only",
    ),
    "cpu_clock_two_threads": (
        ["train.target_latency_ms=1", "train.latency.threads=2"],
        "train.latency.clock 'cpu'",
    ),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
@pytest.mark.parametrize("command", ["run", "train"])
def test_bad_latency_budgets_exit_2_before_any_work(case, command, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECEDE_CACHE", str(tmp_path / "cache"))
    keys, fragment = RUN_CASES[case]
    sets = [a for k in [*SMALL, *keys] for a in ("--set", k)]
    argv = [command, "-c", "configs/demo.yaml", *sets, "--out", str(tmp_path / "out")]
    _refused(tmp_path, capsys, argv, fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_exits_2_naming_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECEDE_CACHE", str(tmp_path / "cache"))
    sets = [
        *SMALL,
        "train.target_latency_ms=1",
        "train.latency.device=cuda",
        "train.latency.clock=wall",
    ]
    argv = [
        "run",
        "-c",
        "configs/demo.yaml",
        *[a for k in sets for a in ("--set", k)],
        "--out",
        str(tmp_path / "o"),
    ]
    _refused(tmp_path, capsys, argv, "train.latency.device cuda")


def test_a_target_the_dense_model_meets_exits_2_with_both_numbers(tmp_path, capsys, monkeypatch):
    """Known only once the latency model is there (here a cached synthetic one): still before
    anything is staged."""
    monkeypatch.setenv("RECEDE_CACHE", str(tmp_path / "cache"))
    cfg = load_config("configs/demo.yaml", [*SMALL, "train.target_latency_ms=1000"])
    dense = build_model(cfg.model, num_classes=10, in_channels=1)
    lm, _ = cached_latency_model(
        dense, dense_example((1, 16, 16)), LatencyConfig(), lambda m, x, c: synthetic_latency(m, x)
    )
    sets = [a for k in [*SMALL, "train.target_latency_ms=1000"] for a in ("--set", k)]
    argv = ["run", "-c", "configs/demo.yaml", *sets, "--out", str(tmp_path / "out")]
    err = _refused(tmp_path, capsys, argv, "train.target_latency_ms 1000 ms is not below")
    assert f"{lm.dense_ms:.4g}" in err


PRUNE_CASES = {
    "zero": (["--target-ms", "0"], "--target-ms: expected a number in (0.0"),
    "negative": (["--target-ms", "-1"], "argument --target-ms"),
    "flag_without_target": (["--threads", "2"], "--threads set the deployment of a latency budget"),
    "int8": (
        ["--target-ms", "1", "--precision", "int8"],
        "--precision int8: the latency model times fp32 graphs only",
    ),
    "cpu_clock_threads": (
        ["--target-ms", "1", "--threads", "2", "--clock", "cpu"],
        "--clock 'cpu'",
    ),
    "backend": (["--target-ms", "1", "--backend", "mlir"], "argument --backend"),
}


@pytest.mark.parametrize("case", sorted(PRUNE_CASES))
def test_bad_prune_targets_exit_2_before_any_work(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECEDE_CACHE", str(tmp_path / "cache"))
    flags, fragment = PRUNE_CASES[case]
    _refused(tmp_path, capsys, ["prune", *TINY, *flags, "--out", str(tmp_path / "p")], fragment)


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """``recede prune --target-ms`` on the tiny test net (residual, concat, depthwise, grouped
    and SE layers), its latency model really measured (few runs) and cached first."""
    root = tmp_path_factory.mktemp("latency")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECEDE_CACHE", str(root / "cache"))
        from tests.conftest import tiny_net_random_bn

        example = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        lm, _ = cached_latency_model(
            tiny_net_random_bn(), example, LatencyConfig(), build_latency_model
        )
        target = 0.9 * lm.dense_ms
        argv = ["prune", *TINY, "--min-channels", "1", "--target-ms", f"{target:.9g}"]
        code = main([*argv, "--out", str(root / "p")])
    return root, lm, target, code


def test_prune_to_a_target_reports_target_predicted_and_measured(cut, capsys):
    root, lm, target, code = cut
    assert code == 0
    report = json.loads((root / "p" / "report.json").read_text())
    latency = report["latency"]
    assert latency["target_ms"] == pytest.approx(target, rel=1e-5)
    assert latency["predicted_ms"] <= target  # the cut the model predicts under the target
    assert latency["reached"] == (latency["measured_quiet_ms"] <= 1.05 * target)
    assert latency["cache"] == "hit" and latency["build_seconds"] == 0.0  # nothing re-measured
    assert latency["table_error"] == pytest.approx(lm.table_error)
    assert {
        "measured_ms",
        "backend",
        "device",
        "precision",
        "batch",
        "threads",
        "clock",
        "reached",
        "round_to",
    } <= set(latency)
    assert report["macs"]["after"] < report["macs"]["before"]
    saved = json.loads((root / "p" / "latency_model.json").read_text())
    assert saved["key"] == lm.key
    assert (root / "cache" / "latency" / cache_path(lm.key).name).is_file()


def test_inspect_shows_the_latency_table(cut, capsys):
    root, lm, _, _ = cut
    capsys.readouterr()
    assert main(["inspect", "--latency-table", str(root / "p")]) == 0
    out = capsys.readouterr().out
    assert lm.describe() in out and "held-out" in out
    assert all(t.name in out for t in lm.layers)


def test_inspect_latency_table_of_a_folder_without_one_exits_2(cut, tmp_path, capsys):
    assert main(["inspect", "--latency-table", str(tmp_path)]) == 2
    assert "holds no latency_model.json" in capsys.readouterr().err


def test_a_changed_latency_model_file_is_refused(cut, tmp_path, capsys):
    import shutil

    root, *_ = cut
    copy = shutil.copytree(root / "p", tmp_path / "p")
    raw = json.loads((copy / "latency_model.json").read_text())
    raw["scale"] = 0.1
    write_json_atomic(copy / "latency_model.json", raw)
    assert main(["inspect", "--latency-table", str(copy)]) == 2
    assert "latency_model.json" in capsys.readouterr().err
