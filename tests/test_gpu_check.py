"""benchmarks/gpu_check.py: the dry run on a bare interpreter, its JSON and Markdown, stage
isolation and the deadline, and the demo constants against configs/demo.yaml."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a lent GPU machine may lack: everything but torch, triton, onnxruntime, numpy, pytest.
HIDDEN = ("yaml", "hypothesis", "xdist", "tqdm", "sklearn", "matplotlib", "torchvision", "timm")
HIDDEN += ("onnx", "onnxscript", "onnxslim", "scipy", "torch_pruning")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _hide_packages(folder: Path) -> dict[str, str]:
    """An environment whose Pythons cannot import :data:`HIDDEN` (a ``sitecustomize`` on
    ``PYTHONPATH`` refuses them), so the dry run proves what it needs."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(f"""
        import sys
        from importlib.machinery import PathFinder
        class _Hide(PathFinder):  # absent as on a bare machine: find_spec gives None
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name.split(".")[0] in {set(HIDDEN)!r}:
                    return None
                return PathFinder.find_spec(name, path, target)
        sys.meta_path[:] = [_Hide if f is PathFinder else f for f in sys.meta_path]
        """)
    )
    return {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run on a bare interpreter: (exit code, stderr, JSON, Markdown, out folder)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = _hide_packages(tmp / "site")
    env.pop("TRITON_INTERPRET", None)
    out = tmp / "out"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--dry-run"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    report = json.loads((out / "gpu_check.json").read_text())
    return proc.returncode, proc.stderr, report, (out / "gpu_check.md").read_text(), out


def test_dry_run_runs_every_stage_without_the_hidden_packages(dry_run):
    rc, err, report, _, out = dry_run
    assert rc == 0, {n: (s["status"], s.get("detail")) for n, s in report["stages"].items()}
    assert report["dry_run"] is True and "(dry run)" in report["device"]
    assert {"date", "versions", "deadline_s", "elapsed_s"} <= set(report)
    assert {"torch", "triton", "onnxruntime", "numpy"} <= set(report["versions"])
    assert list(report["stages"]) == list(gpu_check.STAGES)
    assert {s["status"] for s in report["stages"].values()} == {"ok"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu_check.json", "gpu_check.md", "tests.log", "latency.log", "kernels.log"]
    )  # stage scratch files are gone


def test_dry_run_leaves_out_test_files_that_cannot_import(dry_run):
    tests = dry_run[2]["stages"]["tests"]
    assert tests["left_out"]["tests/bench/test_timing.py"] == ["hypothesis"]
    assert "tests/bench/test_bench.py" in tests["files"]
    counts = tests["counts"]
    assert counts["skipped"] > 0 and counts["failed"] == counts["errors"] == 0  # no CUDA here


def test_dry_run_latency_pairs_every_batch_and_precision(dry_run):
    lat = dry_run[2]["stages"]["latency"]
    cells = {(p["precision"], p["batch"]) for p in lat["pairs"]}
    assert cells == {(p, b) for p in ("fp32", "fp16") for b in (1, 2)}
    assert len(lat["rows"]) == 4 * 2 * lat["rounds"]  # cells x models x rounds
    assert 0.2 < lat["macs"]["pruned"] / lat["macs"]["dense"] < 0.3  # the demo's ~0.26
    for p in lat["pairs"]:
        assert p["ratio_min"] <= p["ratio_p50"] <= p["ratio_max"]
        assert p["speedup_over_mac_ratio"] == pytest.approx(1 / p["ratio_p50"] / lat["mac_ratio"])
    assert all(v is None for g in lat["goals"].values() for v in g.values())  # not judged


def test_dry_run_markdown_says_dry_run_and_shows_every_stage(dry_run):
    md, report = dry_run[3], dry_run[2]
    assert md.startswith("# GPU check — DRY RUN")
    assert report["device"] in md and report["date"] in md
    assert md.count("| fp32 |") == 2 and md.count("| fp16 |") == 2
    for section in ("## Stages", "## pytest -m gpu", "## Latency", "## Training steps"):
        assert section in md
    assert "left out tests/bench/test_timing.py: needs hypothesis" in md


def test_summary_takes_the_median_round_ratio():
    rows = [
        {"precision": "fp16", "batch": 8, "round": r, "model": m, "p50_ms": ms}
        for r, (d, p) in enumerate([(2.0, 1.0), (2.0, 1.5), (4.0, 1.0)])
        for m, ms in (("dense", d), ("pruned", p))
    ]
    (pair,) = gpu_check.summarise_pairs(rows, mac_ratio=4.0)
    assert pair["ratio_p50"] == 0.5 and (pair["ratio_min"], pair["ratio_max"]) == (0.25, 0.75)
    assert pair["speedup_over_mac_ratio"] == pytest.approx(0.5)
    goals = gpu_check.judge_latency([pair], dry_run=False)["fp16"]
    assert list(goals.values()) == [True, False]  # ratio <= 1; 0.5 < 0.8 of the MAC ratio


def test_a_stage_past_its_budget_is_killed_and_recorded(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(1e6)"]
    result = gpu_check.run_child(cmd, tmp_path / "x.log", budget_s=2.0, env={})
    assert result["status"] == "timeout" and "budget of 2 s" in result["detail"]


def test_stages_past_the_deadline_are_recorded_not_run(tmp_path):
    report = gpu_check.run_all(tmp_path, True, gpu_check.RESERVE_S + 0.5, ["latency", "kernels"])
    assert [s["status"] for s in report["stages"].values()] == ["timeout", "timeout"]
    assert (
        "deadline"
        in json.loads((tmp_path / "gpu_check.json").read_text())["stages"]["kernels"]["detail"]
    )


def test_without_pytest_the_test_stage_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "importable", lambda name: name != "pytest")
    result = gpu_check.run_tests_stage(tmp_path, True, budget_s=60)
    assert result["status"] == "skipped" and "pytest" in result["detail"]


def test_missing_imports_follow_imported_modules_and_name_top_level_packages(tmp_path):
    (tmp_path / "helper_mod.py").write_text("import no_such_pkg.sub\n")
    path = tmp_path / "test_x.py"
    path.write_text("import os\nimport helper_mod\nfrom torch import nn\nfrom . import y\n")
    assert gpu_check.imported_modules(path) == ["helper_mod", "os", "torch"]
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    assert gpu_check.missing_imports([path], env, 600) == {str(path): ["no_such_pkg"]}


def test_out_that_is_a_file_is_bad_input(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert gpu_check.main(["--out", str(tmp_path / "f"), "--dry-run"]) == 2
    assert "--out" in capsys.readouterr().err


def test_demo_constants_match_configs_demo_yaml():
    from pipeline.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    demo = gpu_check.DEMO
    assert (cfg.model.name, cfg.model.depth, cfg.model.width) == (
        "vgg",
        demo["depth"],
        demo["width"],
    )
    assert (cfg.data.name, cfg.data.image_size) == ("digits", demo["image_size"])  # 1 channel
    rules = gpu_check.DEMO_RULES
    assert (cfg.prune.min_channels, cfg.prune.max_layer_ratio) == tuple(rules.values())


def test_a_stage_that_crashes_is_recorded_with_its_last_line(tmp_path, monkeypatch):
    fake = tmp_path / "fake_stage.py"
    fake.write_text("raise RuntimeError('boom in the stage')\n")
    monkeypatch.setattr(gpu_check, "__file__", str(fake))
    result = gpu_check.run_python_stage("kernels", tmp_path, True, budget_s=600)
    assert result["status"] == "error" and "boom in the stage" in result["detail"]
    assert (tmp_path / "kernels.log").is_file() and not (tmp_path / ".kernels.json").exists()


def _recording_python(path: Path) -> Path:
    """An executable at ``path`` that writes the arguments it got to ``path.args`` and exits 0:
    which interpreter `make gpu-check` starts, and with what."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "$@" > "{path}.args"\n')
    path.chmod(0o755)
    return path


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_runs_the_venv_python_where_there_is_one_else_python3(tmp_path):
    # A CPU machine's system python3 has no torch: the dry run must use the venv's interpreter;
    # a lent GPU machine has no .venv and a python3 with torch.
    venv_python = _recording_python(tmp_path / "venv" / "bin" / "python")
    system = _recording_python(tmp_path / "bin" / "python3")
    env = {**os.environ, "PATH": f"{system.parent}{os.pathsep}{os.environ['PATH']}"}
    make = ["make", "-s", "-C", str(ROOT), "gpu-check", "GPU_CHECK_ARGS=--dry-run"]
    out = f"GPU_CHECK_OUT={tmp_path / 'out'}"
    subprocess.run([*make, out, f"VENV={venv_python.parents[1]}"], env=env, check=True)
    assert Path(f"{venv_python}.args").read_text().split() == [
        "benchmarks/gpu_check.py",
        "--out",
        str(tmp_path / "out"),
        "--dry-run",
    ]
    assert not Path(f"{system}.args").exists()
    subprocess.run([*make, out, f"VENV={tmp_path / 'no-venv'}"], env=env, check=True)
    assert Path(f"{system}.args").read_text().split()[0] == "benchmarks/gpu_check.py"
