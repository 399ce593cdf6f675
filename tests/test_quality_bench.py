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


def test_quick_grid_writes_every_cell_at_the_macs_budget_and_renders(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch_pruning")
    quality, report = _load("quality"), _load("quality_report")
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
    receding = next(c for c in cells if c["method"] == "receding")
    assert receding["strength"] is not None and receding["macs_kept"] > 0.1
    assert report.main([str(out), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| vgg | 30% | receding |" in text and "### Goals" in text
    assert (tmp_path / "results" / "quality_pareto.png").stat().st_size > 0


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
