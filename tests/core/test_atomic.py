"""Atomic writes: the final path holds either the old content or the complete new one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.atomic import (
    atomic_path,
    save_torch_atomic,
    write_json_atomic,
    write_text_atomic,
)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def test_failure_leaves_no_file_at_final_path(tmp_path) -> None:
    final = tmp_path / "out" / "model.onnx"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(final) as tmp:
        tmp.write_bytes(b"half written")
        raise RuntimeError("boom")
    assert not final.exists()
    assert _leftovers(final.parent) == []


def test_failure_keeps_previous_content(tmp_path) -> None:
    final = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(KeyboardInterrupt), atomic_path(final) as tmp:
        tmp.write_text("new")
        raise KeyboardInterrupt
    assert final.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_success_replaces_and_cleans_up(tmp_path) -> None:
    final = tmp_path / "a.txt"
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp != final
        assert tmp.suffix == ".txt"  # writers that infer the format from the suffix still work
        tmp.write_text("content")
        assert not final.exists()  # nothing at the final path until the block succeeds
    assert final.read_text() == "content"
    assert _leftovers(tmp_path) == []


def test_permissions_follow_umask(tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        final = write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    assert final.stat().st_mode & 0o777 == 0o644


def test_block_deleting_temp_file_is_an_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="vanished"), atomic_path(tmp_path / "a") as tmp:
        tmp.unlink()
    assert not (tmp_path / "a").exists()


@dataclass(frozen=True)
class _Result:
    value: float


def test_json_handles_numpy_paths_dataclasses_and_keeps_order(tmp_path) -> None:
    obj = {
        "z": np.float32(0.5),
        "a": np.arange(3),
        "p": Path("x/y"),
        "r": _Result(1.5),
        "n": np.int64(7),
        "t": torch.tensor([1.0, 2.0]),
    }
    path = write_json_atomic(tmp_path / "r.json", obj)
    text = path.read_text()
    assert list(json.loads(text)) == ["z", "a", "p", "r", "n", "t"]
    assert json.loads(text) == {
        "z": 0.5,
        "a": [0, 1, 2],
        "p": "x/y",
        "r": {"value": 1.5},
        "n": 7,
        "t": [1.0, 2.0],
    }
    assert text.startswith('{\n  "z"')  # indent=2


def test_unserialisable_json_writes_nothing(tmp_path) -> None:
    with pytest.raises(TypeError, match="object"):
        write_json_atomic(tmp_path / "r.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_save_torch_atomic_round_trip(tmp_path) -> None:
    state = {"w": torch.arange(4.0)}
    path = save_torch_atomic(state, tmp_path / "ckpt" / "s.pt")
    assert torch.equal(torch.load(path)["w"], state["w"])
    assert _leftovers(path.parent) == []
