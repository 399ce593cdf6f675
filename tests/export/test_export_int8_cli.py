"""`recede export --format onnx-int8`: a calibrated, verified INT8 graph, or exit 2 with nothing
written; a run folder exports its pruned model, and not when its own table shows it slower."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pipeline.cli.main import main  # noqa: E402
from pipeline.models.checkpoint import WEIGHTS  # noqa: E402
from tests.export.int8_models import digits_inputs  # noqa: E402

TINY = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]
TRAINED = ["--model", "tests.export.int8_models:trained_bn_factory", "--input-shape", "1,1,16,16"]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("src") / "pruned"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A pruned trained digits model (no data of its own) and 800 digits inputs as a .npy."""
    base = tmp_path_factory.mktemp("trained")
    out = base / "pruned"
    args = ["prune", *TRAINED, "--ratio", "0.25", "--scope", "layer", "--out", str(out)]
    assert main(args) == 0
    np.save(base / "digits.npy", digits_inputs(800))
    return out, base / "digits.npy"


def test_onnx_int8_without_data_exits_2_naming_calibration(untrained, tmp_path, capsys) -> None:
    out = tmp_path / "rel"
    assert main(["export", str(untrained), "--format", "onnx-int8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--calibration PATH" in err and "carries no data" in err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_all_without_data_warns_and_skips_only_int8(untrained, tmp_path, caplog) -> None:
    out = tmp_path / "rel"
    assert main(["export", str(untrained), "--format", "all", "--out", str(out)]) == 0
    assert (out / "model.onnx").is_file() and not (out / "model.int8.onnx").exists()
    assert "skipping onnx-int8" in caplog.text and "--calibration" in caplog.text


def test_a_calibration_array_gives_a_verified_int8_graph_twice_the_same(trained, tmp_path) -> None:
    model, npy = trained
    args = ["--format", "onnx-int8", "--calibration", str(npy), "--int8-max-drop", "2"]
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["export", str(model), *args, "--out", str(first)]) == 0
    assert main(["export", str(model), *args, "--out", str(second)]) == 0
    assert (first / "model.int8.onnx").read_bytes() == (second / "model.int8.onnx").read_bytes()
    manifest = json.loads((first / "manifest.json").read_text())
    assert {"onnx", "onnx-int8"} <= set(manifest["artefacts"])
    metrics = manifest["metrics"]["onnx-int8"]
    assert metrics["verdict"] == "ok" and metrics["drop"] <= 2 and metrics["sensitivity"] >= 2
    int8 = manifest["export"]["int8"]
    assert int8["calibration"]["from"] == str(npy)
    assert int8["calibration"]["heldout_samples"] == 200 and not int8["calibration"]["labelled"]
    assert int8["calibration"]["cpu"]["machine"] and "reduce_range" in int8["calibration"]
    assert manifest["preprocessing"] is None  # a --model folder records no data config


@pytest.mark.parametrize(
    "make, flags, match",
    [
        (lambda d: np.save(d / "x.npy", np.zeros((40, 3, 16, 16), np.float32)), [],
         "expected inputs of shape [N, 1, 16, 16]"),
        (lambda d: (d / "imgs").mkdir(), [], "holds no images"),
        (lambda d: None, [], "no such file or folder"),
        (lambda d: np.save(d / "x.npy", digits_inputs(40)), ["--int8-max-drop", "-1"],
         "--int8-max-drop: expected a number in"),
    ],
)  # fmt: skip
def test_bad_int8_input_exits_2_before_any_work(trained, tmp_path, capsys, make, flags, match):
    model, _ = trained
    make(tmp_path)
    source = tmp_path / ("imgs" if match == "holds no images" else "x.npy")
    out = tmp_path / "rel"
    args = ["export", str(model), "--format", "onnx-int8", "--calibration", str(source)]
    assert main([*args, *flags, "--out", str(out)]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_an_int8_engine_where_none_can_be_built_is_refused_plainly(untrained, tmp_path, capsys):
    from pipeline.export.tensorrt import tensorrt_available

    if tensorrt_available():
        pytest.skip("this machine can build TensorRT engines")
    out = tmp_path / "rel"
    assert main(["export", str(untrained), "--format", "all", "--int8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot build one" in err and "(or all)" not in err and "model.int8.onnx" in err
    assert main(["export", str(untrained), "--format", "onnx", "--int8", "--out", str(out)]) == 2
    assert "--format onnx-int8, without --int8" in capsys.readouterr().err
    assert not out.exists()


# --- a run folder: its pruned model, unless its own table shows it slower --------------------


def _run_folder(base: Path, untrained: Path, *, slower: bool) -> Path:
    """A run folder: ``trained/`` and ``pruned/`` (the same tiny model) and a report whose
    latency rows show the pruned model 3x slower than dense, or 3x faster."""
    import shutil

    run = base / "run"
    for sub in ("trained", "pruned"):
        shutil.copytree(untrained, run / sub)
    factor = 3.0 if slower else 1 / 3
    rows = [
        {"backend": "onnxruntime", "device": "cpu", "model": m, "batch": 1, "threads": 1,
         "p50_ms": p, "p90_ms": p, "p99_ms": p, "blocks_ms": [p] * 5}
        for m, p in (("dense", 1.0), ("pruned", factor))
    ]  # fmt: skip
    (run / "report.json").write_text(json.dumps({"latency": rows}))
    return run


@pytest.mark.parametrize("slower", [False, True])
def test_a_run_folder_exports_its_pruned_model(untrained, tmp_path, capsys, slower) -> None:
    run = _run_folder(tmp_path, untrained, slower=slower)
    out = tmp_path / "rel"
    code = main(["export", str(run), "--out", str(out)])
    if slower:
        assert code == 1 and not out.exists()
        err = capsys.readouterr().err
        assert "slower than the dense one" in err and "--allow-slower" in err
        assert main(["export", str(run), "--allow-slower", "--out", str(out)]) == 0
    else:
        assert code == 0
    source = json.loads((out / "manifest.json").read_text())["config"]["source"]["path"]
    assert Path(source).name == "pruned"  # not trained/: the model the run made to ship


def test_a_run_folder_without_its_pruned_model_is_refused(untrained, tmp_path, capsys) -> None:
    run = _run_folder(tmp_path, untrained, slower=False)
    (run / "pruned" / WEIGHTS).unlink()
    assert main(["export", str(run), "--out", str(tmp_path / "rel")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'pruned' / WEIGHTS} is missing" in err and "trained" in err
