"""Smoke test of benchmarks/quality.py --quick and its RESULTS.md renderer (a tiny grid)."""

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


def test_quick_grid_writes_every_cell_and_renders(tmp_path):
    pytest.importorskip("onnxruntime")
    quality, report = _load("quality"), _load("quality_report")
    out = tmp_path / "quality.json"
    argv = ["--quick", "--methods", "receding", "ucs", "--targets", "0.5", "--epochs", "3"]
    assert quality.main([*argv, "--finetune-epochs", "0", "--out", str(out)]) == 0
    cells = json.loads(out.read_text())["cells"]
    assert {(c["method"], c["target"]) for c in cells} == {("receding", 0.5), ("ucs", 0.5)}
    for c in cells:
        assert 0.0 <= c["acc_raw"] <= 1.0 and c["params"] < c["params_dense"]
        assert c["ort_p50_b1"] > 0 and c["ort_p50_b32"] > 0
        assert len(c["importances"]) > 0
    receding = next(c for c in cells if c["method"] == "receding")
    assert receding["strength"] is not None and 0.0 < receding["pruned_groups"] < 1.0
    assert report.main([str(out), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| vgg | 0.50 | receding |" in text and "## Goals" in text
    assert (tmp_path / "results" / "quality_accuracy.png").stat().st_size > 0
