"""benchmarks/dense_coverage.py renders its section from the results on file: one row per
model in its order (a model without a result is listed as not run), a Markdown-safe cell per
result, and counts that follow the results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "dense_coverage", ROOT / "benchmarks" / "dense_coverage.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_section_has_a_row_per_model_and_counts_what_is_on_file(tmp_path, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    ok = {"prune": 0, "export": 0, "macs": (2e9, 1e9), "verdicts": {"onnx": "ok"}, "seconds": 3.0}
    failed = {"prune": 2, "why": "no | pipes", "seconds": 1.0}
    for name, recede in ((bench.ORDER[0], ok), (bench.ORDER[1], failed)):
        bench.save({"model": name, "size": 64, "recede": recede, "when": "2026-12-07 19:00",
                    "torch_pruning": {"error": "RuntimeError: x", "seconds": 1.0}, "load": 1.0})  # fmt: skip
    section = bench._section(bench.on_file())
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][
        1:
    ]
    assert [r.split(" | ")[0][2:] for r in rows] == list(bench.ORDER)
    assert {r.count("|") for r in rows} == {bench.HEADER[0].count("|")}  # no cell splits
    assert "prune exit 2: no | pipes" not in section and "not run" in rows[-1]
    assert (
        "recede exported and verified 1 of 18, Torch-Pruning pruned and exported 0 of 18" in section
    )
    assert json.loads((tmp_path / f"{bench.ORDER[0]}.json").read_text())["recede"]["export"] == 0
