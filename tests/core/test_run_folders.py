"""Output folders are written as a unit: staged beside the target, swapped in, locked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.core.atomic import file_lock
from pipeline.core.output_folders import OutputError, partial_folder, staged_folder
from pipeline.models.checkpoint import load_pruned
from tests.conftest import finish_or_skip, kill_children

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]


def test_success_replaces_the_folder_as_a_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_folder(out, kind="prune") as stage:
        assert stage == partial_folder(out) and not (stage / "old.txt").exists()
        (stage / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # nothing at the final path until the end
    assert (out / "new.txt").read_text() == "new" and not (out / "old.txt").exists()
    assert not partial_folder(out).exists()


def test_failure_leaves_the_folder_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), staged_folder(out, kind="prune") as stage:
        (stage / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert not partial_folder(out).exists()


def test_resume_keeps_the_partial_folder_and_drops_stale_temps(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_folder(out, kind="train", keep_on_error=True) as s:
        (s / "checkpoints").mkdir()
        (s / "checkpoints" / "train_last.pt").write_bytes(b"ckpt")
        (s / "checkpoints" / ".train_last.pt.ab12cd34.tmp.pt").write_bytes(b"half")  # SIGKILL
        raise RuntimeError("killed")
    with staged_folder(out, kind="train", start="resume") as stage:
        assert (stage / "checkpoints" / "train_last.pt").read_bytes() == b"ckpt"
        assert not list(stage.rglob(".*.tmp*"))
    assert (out / "checkpoints" / "train_last.pt").is_file()


def test_a_failure_before_any_work_keeps_no_partial_folder_to_resume(tmp_path):
    """A run refused before its first checkpoint (a model without BN, say) left .o.partial,
    with nothing in it to resume from; one that trained keeps it."""
    out = tmp_path / "o"
    with pytest.raises(ValueError), staged_folder(out, kind="run", keep_on_error=True) as s:
        (s / "config.yaml").write_text("train: {}\n")
        raise ValueError("model.name has no BatchNorm")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(ValueError), staged_folder(out, kind="run", keep_on_error=True) as s:
        (s / "config.yaml").write_text("train: {}\n")
        (s / "checkpoints").mkdir()
        (s / "checkpoints" / "train_last.pt").write_bytes(b"ckpt")
        raise ValueError("threshold: auto found no valley")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.partial"]


def _kill_between_the_renames(out: Path) -> Path:
    """The disk as a SIGKILL between a swap's two renames leaves it: ``out`` missing, its last
    complete copy hidden as ``.out.old.*`` and the new folder still partial."""
    with staged_folder(out, kind="prune") as stage:
        (stage / "model.txt").write_text("v1")
    old = out.parent / f".{out.name}.old.deadbeef"
    os.rename(out, old)
    partial_folder(out).mkdir()
    (partial_folder(out) / "model.txt").write_text("v2")
    return old


def test_a_kill_mid_swap_never_loses_the_last_complete_copy(tmp_path, caplog):
    out = tmp_path / "out"
    old = _kill_between_the_renames(out)
    # The next write fails (or is killed) before its own folder is complete.
    with pytest.raises(RuntimeError), staged_folder(out, kind="prune") as stage:
        assert (out / "model.txt").read_text() == "v1"  # restored before any work
        (stage / "model.txt").write_text("half")
        raise RuntimeError("killed again")
    assert (out / "model.txt").read_text() == "v1"
    assert not old.exists()
    assert "restored" in caplog.text and old.name in caplog.text


def test_what_a_killed_swap_left_beside_a_complete_folder_is_tidied(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out, kind="prune") as stage:
        (stage / "model.txt").write_text("v1")
    (tmp_path / ".out.old.0badf00d").mkdir()  # a fallback swap killed after its second rename
    (tmp_path / ".out.new.0badf00d").mkdir()  # an exchange killed before deleting what it replaced
    with staged_folder(out, kind="prune") as stage:
        assert (out / "model.txt").read_text() == "v1"
        (stage / "model.txt").write_text("v2")
    assert (out / "model.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_writer_is_refused_while_the_first_writes(tmp_path):
    out = tmp_path / "out"
    busy = pytest.raises(OutputError, match="being written by another recede process")
    with staged_folder(out, kind="prune"), busy, staged_folder(out, kind="prune"):
        pass
    assert out.is_dir()


def test_reprune_leaves_no_stale_onnx(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", *TINY, "--ratio", "0.5", "--out", str(out)]) == 0
    assert main(["export", str(out)]) == 0
    assert (out / "model.onnx").is_file()
    assert main(["prune", *TINY, "--ratio", "0.25", "--out", str(out)]) == 0
    assert not (out / "model.onnx").exists()
    assert json.loads((out / "report.json").read_text())["threshold"]["value"] == 0.25


def test_force_replaces_a_foreign_folder_as_a_whole(tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["prune", *TINY, "--out", str(out)]) == 2
    assert main(["prune", *TINY, "--out", str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.pt").is_file()


def _consistent(out: Path) -> None:
    """report.json, plan.json and model.pt all come from the same prune."""
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    model, _ = load_pruned(out)
    assert plan["threshold_value"] == report["threshold"]["value"]
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"]


def test_two_prunes_into_one_folder_never_mix(tmp_path, children):
    out = tmp_path / "p"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["nice", "-n", "19", sys.executable, "-m", "pipeline.cli.main", "prune", *TINY]
    procs = [
        children(
            [*cli, "--ratio", ratio, "--out", str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ratio in ("0.25", "0.5")
    ]
    results = [finish_or_skip(p, "recede prune") for p in procs]
    assert all(code in (0, 2) for code, _ in results), results
    assert any(code == 0 for code, _ in results)
    for code, err in results:
        assert code == 0 or "being written by another recede process" in err
    _consistent(out)
    assert not partial_folder(out).exists()


def test_a_slow_child_skips_the_test_and_is_killed(tmp_path):
    """On a busy machine a child that takes too long is a skip, not a failure, and is ended."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        with pytest.raises(pytest.skip.Exception, match="machine too slow"):
            finish_or_skip(proc, "sleeper", timeout=0.01)
    finally:
        kill_children([proc])
    assert proc.returncode == -signal.SIGKILL


def test_no_lock_file_is_left_beside_the_folder(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out, kind="prune"):
        assert (tmp_path / ".out.lock").is_file()  # held while writing
    with pytest.raises(RuntimeError), staged_folder(out, kind="prune"):
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _count_under_lock(lock: Path, counter: Path, rounds: int) -> None:
    for _ in range(rounds):
        with file_lock(lock):
            value = int(counter.read_text())
            time.sleep(0.0005)  # widen the window a second holder would need
            counter.write_text(str(value + 1))


def test_removed_lock_files_still_exclude(tmp_path):
    """Holders remove the lock file on release; a waiter granted the lock on the removed file
    must notice and start over, or two holders would overlap and lose increments."""
    lock, counter = tmp_path / "c.lock", tmp_path / "count"
    counter.write_text("0")
    threads = [
        threading.Thread(target=_count_under_lock, args=(lock, counter, 100)) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(counter.read_text()) == 400
    assert not lock.exists()


def test_a_lock_left_by_a_killed_holder_is_taken_over(tmp_path):
    lock = tmp_path / "c.lock"
    lock.write_text("")  # what a SIGKILL leaves: the OS already dropped the lock
    busy = pytest.raises(BlockingIOError)
    with file_lock(lock, wait=False), busy, file_lock(lock, wait=False):
        pass
    assert not lock.exists()
