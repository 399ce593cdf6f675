"""benchmarks/quality.py --quick and its RESULTS.md renderer (a tiny grid), and its set-up checks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_grid_writes_every_cell_at_the_macs_budget_and_renders(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch_pruning")
    quality, report = _load("quality"), _load("quality_report")
    int8 = sys.modules["quality_int8"]  # timed as a quick look: the test checks shape, not speed
    monkeypatch.setattr(int8, "RUNS", 5)
    monkeypatch.setattr(int8, "WARMUP", 1)
    monkeypatch.setattr(int8, "CALIBRATION", 128)
    out = tmp_path / "quality.json"
    argv = ["--quick", "--methods", "receding", "ucs", "tp-mag", "--macs-kept", "0.3"]
    assert quality.main([*argv, "--epochs", "3", "--finetune-epochs", "0", "--out", str(out)]) == 0
    cells = json.loads(out.read_text())["cells"]
    assert {(c["method"], c["kept"]) for c in cells} == {
        ("receding", 0.3),
        ("ucs", 0.3),
        ("tp-mag", 0.3),
    }
    for c in cells:
        assert 0.0 <= c["acc_raw"] <= 1.0 and c["params"] < c["params_dense"]
        assert c["macs_kept"] <= 0.3 * 1.02 + 1e-9  # every method fits the same budget
        assert c["ort_p50_b1"] > 0 and c["ort_p50_b32"] > 0
        _assert_int8(c)
    receding = next(c for c in cells if c["method"] == "receding")
    assert receding["strength"] is not None and receding["macs_kept"] > 0.1
    assert report.main([str(out), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| vgg | 30% | receding |" in text and "### Goals" in text
    assert (tmp_path / "results" / "quality_pareto.png").stat().st_size > 0
    assert "### INT8 per cell" in text and "| vgg | 30% | receding | 0 |" in text
    assert (tmp_path / "results" / "quality_int8_pareto.png").stat().st_size > 0


def _assert_int8(cell: dict) -> None:
    """Issue 28: every cell quantized by recede's INT8 export, verified on the whole test set
    and timed beside its dense model (dense/pruned x fp32/INT8)."""
    assert 0.0 <= cell["acc_int8"] <= 1.0 and cell["int8_verdict"] == "ok"
    drop = 100 * (cell["acc_fp32_onnx"] - cell["acc_int8"])
    assert cell["int8_drop"] == pytest.approx(drop, abs=1e-6) and cell["int8_drop"] <= 0.5
    assert abs(cell["acc_fp32_onnx"] - cell["acc_ft"]) <= 0.005  # the ONNX graph is the model
    check = cell["int8"]["check"]  # the check could fail: a corrupted graph is caught
    assert check["wrong"]["agreement"] < check["measured"]["agreement"] - 10
    assert cell["dense_int8"]["int8_verdict"] == "ok"
    for batch in ("b1", "b32"):
        rows = cell["latency"][batch]
        assert set(rows) == {"dense_fp32", "pruned_fp32", "pruned_int8", "dense_int8"}
        assert all(r["p50_ms"] > 0 and r["speedup"] > 0 for r in rows.values())
        assert rows["dense_fp32"]["speedup"] == 1.0
        low, high = rows["pruned_int8"]["speedup_range"]
        assert low <= rows["pruned_int8"]["speedup"] <= high


def _int8_cell(method: str, fp32: float, int8: float) -> dict:
    timing = {"p50_ms": 1.0, "speedup": 2.0, "speedup_range": [1.5, 2.5]}
    latency = {b: {g: dict(timing) for g in ("dense_fp32", "pruned_fp32", "pruned_int8",
                                               "dense_int8")} for b in ("b1", "b32")}  # fmt: skip
    dense = {"acc_fp32_onnx": 0.9, "acc_int8": 0.9}
    return {
        "model": "vgg", "method": method, "kept": 0.3, "seed": 0, "acc_fp32_onnx": fp32,
        "acc_int8": int8, "int8_drop": 100 * (fp32 - int8), "int8_agreement": 0.99,
        "int8_verdict": "ok", "int8_excluded": [], "dense_int8": dense,
        "latency": {"setting": "cpu", "runs": 50, **latency},
    }  # fmt: skip


def test_int8_section_marks_a_cell_past_half_a_point_missed(tmp_path):
    int8_report = _load("quality_int8_report")
    within = [_int8_cell("receding", 0.900, 0.896), _int8_cell("l1", 0.890, 0.888)]
    text = int8_report.section(within, tmp_path)
    assert "2 of 2 within 0.5 points" in text and "**missed**" not in text
    past = [within[0], _int8_cell("l1", 0.890, 0.884)]  # 0.6 points
    text = int8_report.section(past, tmp_path)
    assert "1 of 2 within 0.5 points" in text and "+0.60 points (**missed**" in text
    assert "2.00× (1.50–2.50)" in text  # dense fp32 -> pruned INT8 with its quartiles
    assert (tmp_path / "quality_int8_pareto.png").stat().st_size > 0
    assert int8_report.section([{**within[0], "latency": None}], tmp_path) is None


def test_missing_torch_pruning_exits_2_before_any_training(tmp_path, monkeypatch, capsys):
    quality = _load("quality")
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import raises ImportError
    out = tmp_path / "q.json"
    assert quality.main(["--quick", "--methods", "tp-group", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "torch_pruning" in err and "recede[bench]" in err
    assert not out.exists()


def test_missing_data_exits_2_naming_the_data(tmp_path, monkeypatch, capsys):
    quality = _load("quality")
    from pipeline.data.datasets import DataError

    def missing(*args, **kwargs):
        raise DataError("data.name=fashion_mnist: no copy found")

    monkeypatch.setattr(quality, "load_tensor_data", missing)
    code = quality.main(["--methods", "receding", "--out", str(tmp_path / "q.json")])
    assert code == 2 and "--data fashion_mnist" in capsys.readouterr().err


# --- every flag checked before any training (issue 32 item 12) ----------------------------------


class Trained(Exception):
    """Raised by a stand-in for the data loader: the grid got past its checks."""


@pytest.fixture
def quality_untrained(monkeypatch):
    """benchmarks/quality.py with its data loader replaced by one that raises :class:`Trained`."""
    quality = _load("quality")

    def load(*args, **kwargs):
        raise Trained

    monkeypatch.setattr(quality, "load_tensor_data", load)
    return quality


def _corrupt(text: str):
    return lambda out: out.write_text(text)


BAD_FLAGS = {
    "seeds_0": ([], ["--seeds", "0"], "argument --seeds: expected an integer >= 1, got '0'"),
    "macs_kept_above_1": ([], ["--macs-kept", "1.5"], "argument --macs-kept: expected a share"),
    "macs_kept_0": ([], ["--macs-kept", "0.3", "0"], "argument --macs-kept: expected a share"),
    "macs_kept_nan": ([], ["--macs-kept", "nan"], "argument --macs-kept: expected a share"),
    "batch_size_0": ([], ["--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    "threads_negative": ([], ["--threads", "-1"], "argument --threads: expected an integer >= 1"),
    "threads_0": ([], ["--threads", "0"], "argument --threads: expected an integer >= 1"),
    "seeds_huge": ([], ["--seeds", "9" * 400], "argument --seeds: expected an integer >= 1"),
    "epochs_0": ([], ["--epochs", "0"], "argument --epochs: expected an integer >= 1"),
    "finetune_negative": ([], ["--finetune-epochs", "-1"], "argument --finetune-epochs"),
    "image_size_0": ([], ["--image-size", "0"], "argument --image-size: expected an integer"),
    "start_0": ([], ["--starts", "0"], "argument --starts: expected a finite strength > 0"),
    "out_is_a_folder": ([], ["--out", "{tmp}"], "--out {tmp}: a folder; expected a results file"),
    "out_under_a_file": ([], ["--out", "{tmp}/f/q.json"], "is not a writable folder"),
    "resume_not_json": (
        [_corrupt("{not json")],
        ["--resume"],
        "--resume reads {out}: not UTF-8 JSON",
    ),
    "resume_not_cells": (
        [_corrupt('{"cells": [{"model": "vgg"}]}')],
        ["--resume"],
        "--resume reads {out}: cells[0] is not a cell with model, method, kept, seed",
    ),
    "ablation_reads_a_corrupt_out": (
        [_corrupt('{"cells": 3}')],
        ["--ablation"],
        "--ablation reads {out}: expected 'cells' to be a list, got int",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_a_bad_flag_exits_2_naming_it_before_any_training(
    case, quality_untrained, tmp_path, capsys
) -> None:
    damage, flags, fragment = BAD_FLAGS[case]
    out = tmp_path / "q.json"
    (tmp_path / "f").write_text("a file, not a folder")
    for write in damage:
        write(out)
    before = sorted(p.name for p in tmp_path.iterdir())
    fill = {"tmp": str(tmp_path), "out": str(out)}
    argv = ["--quick", "--out", str(out), *(f.format(**fill) for f in flags)]
    assert quality_untrained.main(argv) == 2  # Trained would mean it got past the checks
    err = capsys.readouterr().err
    assert fragment.format(**fill) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written or made


def test_good_flags_get_past_the_checks_and_make_no_folder_before_it(quality_untrained, tmp_path):
    out = tmp_path / "new" / "q.json"
    with pytest.raises(Trained):  # the data loader is reached: the flags were accepted
        quality_untrained.main(["--quick", "--seeds", "1", "--macs-kept", "0.5", "--out", str(out)])
    assert not out.parent.exists()


def test_quick_honours_the_flags_it_is_given() -> None:
    quality = _load("quality")
    args = quality.build_parser("q", quality.MODELS, ["receding"], quality.RECEDING_VARIANTS)
    grid = quality.grid_from_args(
        args.parse_args(["--quick", "--seeds", "3", "--batch-size", "32"])
    )
    assert grid.seeds == (0, 1, 2) and grid.data.batch_size == 32 and grid.data.name == "digits"
    full = quality.grid_from_args(args.parse_args([]))
    assert full.seeds == (0, 1) and full.data.name == "fashion_mnist" and full.kept == (0.3, 0.1)


def test_a_torch_pruning_sparse_cell_trains_prunes_and_measures(tmp_path):
    # Issue 31 item 15: every tp-slim and tp-group cell crashed at its first epoch's log line.
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch_pruning")
    quality = _load("quality")
    out = tmp_path / "q.json"
    argv = ["--quick", "--methods", "tp-slim", "--epochs", "1", "--finetune-epochs", "0"]
    argv += ["--train-limit", "128", "--macs-kept", "0.9"]  # 0.9: a few of the 400 steps
    assert quality.main([*argv, "--out", str(out)]) == 0
    (cell,) = json.loads(out.read_text())["cells"]
    assert (cell["method"], cell["kept"]) == ("tp-slim", 0.9)
    assert 0 < cell["macs_kept"] <= 0.9 and cell["params"] < cell["params_dense"]
    assert 0.0 <= cell["acc_raw"] <= 1.0 and cell["ort_p50_b1"] > 0
