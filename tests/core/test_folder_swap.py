"""A release folder is never lost to a kill: a writer SIGKILLed at every step of writing and
swapping it in, then every kind of command that may follow; after each, a complete release is
under its own name (its files match its index), and nothing deleted a release it did not
replace. Both swap paths are covered: the atomic exchange and the two-rename fallback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.core import folder_swap
from pipeline.core.atomic import exchange_paths
from pipeline.core.integrity import verify_folder
from pipeline.core.output_folders import (
    MARKER,
    OutputError,
    check_out_folder,
    recover_interrupted_swap,
    staged_folder,
)

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("_swap_child.py")
MODES = ("exchange", "fallback")


def _write(out: Path, kind: str, version: str, files: dict[str, str] | None = None) -> None:
    with staged_folder(out, kind=kind) as stage:
        for name, text in (files or {"model.bin": "weights"}).items():
            (stage / name).write_text(text)
        (stage / "version").write_text(version)


def _complete(out: Path, kind: str) -> str:
    """Assert ``out`` is a complete ``kind`` folder (every file matches its index); its version."""
    assert out.is_dir() and not out.is_symlink(), f"{out} is missing"
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == kind and "files" in marker, marker
    verify_folder(out)
    return (out / "version").read_text()


def _kill_writer(out: Path, kind: str, mode: str, kill: int, source: Path) -> int:
    """Run the child writer, SIGKILLed before step ``kill`` (-1: never); returns its step count."""
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(kill), mode, str(out), kind, str(source)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,  # a hung child, not a slow machine: each takes well under a second
    )
    if kill < 0:
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)
    assert proc.returncode in (0, -9), proc.stderr  # 0: the write ended before step `kill`
    return -1


# --- what may follow a kill (each returns the version it expects at ``out`` afterwards) -------
def _read(out: Path, kind: str, before: str | None) -> str | None:
    """bench, inspect, export DIR: every command recovers its paths before reading them."""
    recover_interrupted_swap(out)
    return before


def _rewrite(out: Path, kind: str, before: str | None) -> str | None:
    check_out_folder(out, kind=kind, force=False, flag="--out")
    _write(out, kind, "v3")
    return "v3"


def _rewrite_fails(out: Path, kind: str, before: str | None) -> str | None:
    check_out_folder(out, kind=kind, force=False, flag="--out")
    with pytest.raises(RuntimeError), staged_folder(out, kind=kind) as stage:
        (stage / "version").write_text("half")
        raise RuntimeError("verification failed")
    return before


def _other_command(out: Path, kind: str, before: str | None) -> str | None:
    """``recede prune --out rel`` over an export release: refused, the release kept."""
    with pytest.raises(OutputError, match="holds a `recede export` folder"):
        check_out_folder(out, kind="prune", force=False, flag="--out")
    return before


def _other_command_forced(out: Path, kind: str, before: str | None) -> str | None:
    check_out_folder(out, kind="prune", force=True, flag="--out")
    _write(out, "export", "v3")  # kind kept "export" so _complete's check applies
    return "v3"


FOLLOWERS: dict[str, Callable[[Path, str, str | None], str | None]] = {
    "read": _read,
    "rewrite": _rewrite,
    "rewrite_fails": _rewrite_fails,
    "other_command": _other_command,
    "other_command_forced": _other_command_forced,
}


def _world(tmp_path: Path, mode: str) -> tuple[Path, Path, int]:
    """A complete export release v1 at ``world/rel``, the files a second write copies, and the
    number of steps that write takes (counted on a copy)."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "model.bin").write_text("weights v2")
    rel = tmp_path / "world" / "rel"
    _write(rel, "export", "v1")
    count = shutil.copytree(rel.parent, tmp_path / "count", symlinks=True)
    return rel, source, _kill_writer(Path(count) / "rel", "export", mode, -1, source)


WRITERS = ("rewrite", "rewrite_fails", "other_command_forced")  # they take the lock and tidy


@pytest.mark.parametrize("mode", MODES)
def test_a_kill_at_every_step_never_loses_the_release(mode, tmp_path):
    rel, source, steps = _world(tmp_path, mode)
    assert steps >= 8  # mkdir, marker, index, three renames or an exchange, fsyncs, rmtree
    for kill in range(steps):
        world = tmp_path / f"kill{kill}"
        shutil.copytree(rel.parent, world, symlinks=True)
        _kill_writer(world / "rel", "export", mode, kill, source)
        if mode == "exchange":  # at every instant, before any command recovers anything
            assert _complete(world / "rel", "export") in ("v1", "v2"), kill
        for name, follow in FOLLOWERS.items():
            after = tmp_path / f"kill{kill}-{name}"
            shutil.copytree(world, after, symlinks=True)
            recover_interrupted_swap(after / "rel")  # a command's first step (cli.main)
            before = _complete(after / "rel", "export")
            expected = follow(after / "rel", "export", before)
            assert _complete(after / "rel", "export") == expected, (kill, name)
            hidden = sorted(p.name for p in after.iterdir() if p.name != "rel")
            assert name not in WRITERS or hidden == [], (kill, name, hidden)


@pytest.mark.parametrize("mode", MODES)
def test_a_second_kill_after_the_first_still_loses_nothing(mode, tmp_path):
    rel, source, steps = _world(tmp_path, mode)
    for kill in range(0, steps, 2):  # every other step twice: the space is steps x steps
        world = tmp_path / f"kill{kill}"
        shutil.copytree(rel.parent, world, symlinks=True)
        _kill_writer(world / "rel", "export", mode, kill, source)
        _kill_writer(world / "rel", "export", mode, steps - 1 - kill, source)
        recover_interrupted_swap(world / "rel")
        assert _complete(world / "rel", "export") in ("v1", "v2"), kill


def _observed(monkeypatch, out: Path, kind: str, mode: str) -> list[str]:
    """Write ``out`` again, checking after every system call of the swap that a complete
    folder is at ``out``; returns the calls after which it was not."""
    gaps: list[str] = []

    def watch(name: str, fn):
        def call(*args, **kwargs):
            result = fn(*args, **kwargs)
            try:
                _complete(out, kind)
            except (AssertionError, OSError, ValueError):
                gaps.append(name)
            return result

        return call

    exchange = (lambda a, b: False) if mode == "fallback" else folder_swap.exchange_paths
    monkeypatch.setattr(folder_swap, "exchange_paths", watch("exchange", exchange))
    monkeypatch.setattr(folder_swap.os, "rename", watch("rename", os.rename))
    monkeypatch.setattr(folder_swap, "fsync_dir", watch("fsync", folder_swap.fsync_dir))
    monkeypatch.setattr(folder_swap.shutil, "rmtree", watch("rmtree", shutil.rmtree))
    _write(out, kind, "v2")
    return gaps


def test_the_exchange_leaves_no_instant_without_the_folder(tmp_path, monkeypatch):
    """Each system call is atomic, so checking after every one is checking every instant."""
    out = tmp_path / "rel"
    _write(out, "export", "v1")
    assert _observed(monkeypatch, out, "export", "exchange") == []
    assert _complete(out, "export") == "v2"


def test_the_observer_catches_the_fallback_gap(tmp_path, monkeypatch):
    """The same check on the two-rename fallback sees ``rel`` missing between the renames:
    evidence that the check above could fail."""
    out = tmp_path / "rel"
    _write(out, "export", "v1")
    assert _observed(monkeypatch, out, "export", "fallback") == ["rename"]
    assert _complete(out, "export") == "v2"


def test_exchange_paths_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not exchange_paths(a, b):
        pytest.skip("this OS or file system has no atomic exchange")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    with pytest.raises(FileNotFoundError):
        exchange_paths(a, tmp_path / "missing")


TINY = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]


def test_a_release_a_killed_swap_hid_is_restored_and_kept_from_another_command(tmp_path, capsys):
    """The reported case: a kill between the fallback's two renames hid the release as
    ``.rel.old.*``; ``recede prune --out rel`` restored it and then deleted it. Now the
    restored release is judged first: refused (exit 2), kept, and complete."""
    from pipeline.cli.main import main

    model, rel = tmp_path / "model", tmp_path / "rel"
    assert main(["prune", *TINY, "--out", str(model)]) == 0
    assert main(["export", str(model), "--out", str(rel)]) == 0
    files = sorted(p.name for p in rel.iterdir())
    os.rename(rel, tmp_path / ".rel.old.0badf00d")  # the disk as the kill left it
    capsys.readouterr()
    assert main(["prune", *TINY, "--out", str(rel)]) == 2
    assert "holds a `recede export` folder" in capsys.readouterr().err
    assert sorted(p.name for p in rel.iterdir()) == files
    verify_folder(rel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "rel"]
