"""manifest.json: contents, and verification that catches changed or missing artefacts."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.export.manifest import verify_manifest, write_manifest


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"onnx bytes")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "pruned.pt").write_bytes(b"\x00" * 1000)
    return tmp_path


def _write(run_dir):
    return write_manifest(
        run_dir,
        {"onnx": run_dir / "model.onnx", "pruned_state": "ckpt/pruned.pt"},
        config={"prune": {"threshold": "otsu"}},
        metrics={"accuracy": 0.91, "max_abs_err": 3e-7},
    )


def test_manifest_records_hashes_versions_config_metrics(run_dir) -> None:
    manifest = json.loads(_write(run_dir).read_text())
    onnx_entry = manifest["artefacts"]["onnx"]
    assert onnx_entry == {
        "path": "model.onnx",
        "sha256": hashlib.sha256(b"onnx bytes").hexdigest(),
        "bytes": len(b"onnx bytes"),
    }
    assert manifest["artefacts"]["pruned_state"]["path"] == "ckpt/pruned.pt"
    assert manifest["artefacts"]["pruned_state"]["bytes"] == 1000
    versions = manifest["versions"]
    assert {"recede", "torch", "torchvision", "onnx", "onnxruntime", "python"} <= set(versions)
    assert versions["torch"] and versions["python"] and versions["recede"]
    assert manifest["created_utc"].endswith("+00:00")
    assert manifest["config"] == {"prune": {"threshold": "otsu"}}
    assert manifest["metrics"]["accuracy"] == 0.91
    assert verify_manifest(run_dir / "manifest.json") == []


def test_verify_detects_modified_artefact(run_dir) -> None:
    path = _write(run_dir)
    (run_dir / "model.onnx").write_bytes(b"onnx bytez")  # same size, different content
    problems = verify_manifest(path)
    assert len(problems) == 1
    assert "onnx" in problems[0] and "sha256" in problems[0]


def test_verify_detects_missing_artefact(run_dir) -> None:
    path = _write(run_dir)
    (run_dir / "ckpt" / "pruned.pt").unlink()
    problems = verify_manifest(path)
    assert len(problems) == 1 and "missing" in problems[0]


def test_moved_run_directory_still_verifies(run_dir, tmp_path_factory) -> None:
    _write(run_dir)
    moved = tmp_path_factory.mktemp("moved") / "run"
    run_dir.rename(moved)
    assert verify_manifest(moved / "manifest.json") == []


def test_missing_artefact_refused_at_write(run_dir) -> None:
    with pytest.raises(FileNotFoundError, match="'weights'"):
        write_manifest(run_dir, {"weights": "nope.pt"}, config={}, metrics={})
    assert not (run_dir / "manifest.json").exists()


def test_invalid_manifest_is_an_error(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        verify_manifest(tmp_path / "manifest.json")
