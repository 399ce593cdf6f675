"""Folder integrity: inspect and bench refuse a run folder whose files changed after recede wrote it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.core.integrity import IntegrityError, verify_folder
from pipeline.run.pipeline import run_pipeline

SMALL = [
    "data.image_size=16", "model.width=0.125", "train.epochs=1", "train.penalty.strength=0.01",
    "prune.threshold=ratio", "prune.ratio=0.4", "prune.finetune_epochs=1", "bench.batches=[1]",
    "bench.runs=50", "bench.warmup=2", "export.allow_slower=true", "export.int8.enabled=false",
]  # fmt: skip
KINDS = [
    "config.yaml", "report.md", "report.json", "plan.json", "manifest.json", "dense.onnx",
    "pruned.onnx", "importance_hist.png", "pruned/model.pt", "pruned/shapes.json",
    "trained/model.pt", "checkpoints/train_last.pt", "checkpoints/train_epoch001.pt",
]  # fmt: skip
BENCH = ["--batches", "1", "--runs", "50"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("made") / "run"
    run_pipeline(load_config("configs/demo.yaml", SMALL), out)
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run", symlinks=True))


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_file_of_the_folder_is_indexed(run_dir):
    index = json.loads((run_dir / ".recede.json").read_text())["files"]
    on_disk = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert set(index) == on_disk - {".recede.json"}
    assert set(KINDS) <= set(index)


def test_an_untouched_folder_passes(run_dir, capsys):
    verify_folder(run_dir)
    assert main(["inspect", str(run_dir)]) == 0
    assert main(["bench", str(run_dir / "pruned"), *BENCH]) == 0
    assert "p50" in capsys.readouterr().out


@pytest.mark.parametrize("name", KINDS)
def test_one_changed_byte_is_refused_by_inspect_and_bench(run_dir, tmp_path, capsys, name):
    folder = _copy(run_dir, tmp_path)
    _flip_one_byte(folder / name)
    for argv in (["inspect", str(folder)], ["bench", str(folder / "pruned"), *BENCH]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{name} has sha256" in err and "expected" in err, err
        assert "rerun the command that wrote it" in err and "--force" in err
    assert main(["inspect", str(folder), "--force"]) == 0  # the user's explicit override


@pytest.mark.parametrize("change", ["added", "missing"])
def test_an_added_or_missing_file_is_refused(run_dir, tmp_path, capsys, change):
    folder = _copy(run_dir, tmp_path)
    if change == "added":
        (folder / "pruned" / "model.onnx").write_bytes(b"stale")  # e.g. an old export
    else:
        (folder / "report.md").unlink()
    with pytest.raises(IntegrityError, match="model.onnx is not in the index|report.md is missing"):
        verify_folder(folder / "pruned")
    assert main(["bench", str(folder), *BENCH]) == 2


def test_an_export_into_the_run_keeps_the_folder_valid(run_dir, tmp_path, capsys):
    folder = _copy(run_dir, tmp_path)
    assert main(["export", str(folder / "pruned")]) == 0
    assert (folder / "pruned" / ".recede.json").is_file()  # its own index supersedes the run's
    verify_folder(folder)
    _flip_one_byte(folder / "pruned" / "model.onnx")
    with pytest.raises(IntegrityError, match=r"pruned/model.onnx has sha256"):
        verify_folder(folder)


def test_a_marker_without_an_index_is_refused(run_dir, tmp_path):
    folder = _copy(run_dir, tmp_path)
    (folder / ".recede.json").write_text('{"kind": "run"}')
    with pytest.raises(IntegrityError, match="holds no file index"):
        verify_folder(folder)


@pytest.mark.parametrize("sub", ["", "pruned"])
def test_deleting_the_index_does_not_switch_the_check_off(run_dir, tmp_path, capsys, caplog, sub):
    folder = _copy(run_dir, tmp_path)
    (folder / ".recede.json").unlink()
    with pytest.raises(IntegrityError, match="no index .recede.json: it was deleted"):
        verify_folder(folder / sub)
    assert main(["bench", str(folder / sub), *BENCH]) == 2
    assert main(["inspect", str(folder), "--force"]) == 0
    assert "UNCHECKED" in caplog.text


def test_a_stale_onnx_beside_re_saved_weights_is_never_timed(run_dir, tmp_path, capsys):
    """Even with the index deleted and --force, the release manifest's SHA-256 of the weights
    decides whether the ONNX beside them may be timed as that model."""
    import torch

    folder = _copy(run_dir, tmp_path)
    (folder / ".recede.json").unlink()
    weights = folder / "pruned" / "model.pt"
    state = torch.load(weights, weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] * 1.5  # the weights change, pruned.onnx does not
    torch.save(state, weights)
    assert main(["bench", str(folder), *BENCH, "--force"]) == 2
    err = capsys.readouterr().err
    assert "no longer match" in err and "manifest.json" in err and "recede export" in err
    shutil.rmtree(folder)
    folder = _copy(run_dir, tmp_path)  # the same, untouched but for the index: it is timed
    (folder / ".recede.json").unlink()
    assert main(["bench", str(folder), *BENCH, "--force"]) == 0
