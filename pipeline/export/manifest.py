"""Record what a run exported (hashes, sizes, versions, config, metrics) and check it later.

``manifest.json`` sits in the run directory. Artefact paths in it are relative to that
directory, so a run directory can be moved or copied and still verify.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json_atomic
from pipeline.core.environment import versions
from pipeline.core.integrity import file_sha256  # noqa: F401 - also this module's public name

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


def _artefact_entry(out_dir: Path, name: str, path: Path) -> dict[str, Any]:
    full = path if path.is_absolute() else out_dir / path
    if not full.is_file():
        raise FileNotFoundError(
            f"artefact {name!r} should be a file at {full}, but it is missing; write the "
            "artefacts before the manifest, or drop the entry"
        )
    relative = Path(os.path.relpath(full.resolve(), out_dir.resolve()))
    if relative.parts and relative.parts[0] == "..":
        logger.warning(
            "artefact %r at %s lies outside %s; the manifest will not travel with it",
            name,
            full,
            out_dir,
        )
    return {"path": relative.as_posix(), "sha256": file_sha256(full), "bytes": full.stat().st_size}


def write_manifest(
    out_dir: str | os.PathLike[str],
    artefacts: Mapping[str, str | os.PathLike[str]],
    *,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    export: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/manifest.json`` describing ``artefacts``.

    Args:
        out_dir: Run directory; artefact paths are stored relative to it.
        artefacts: Name (e.g. ``"onnx"``, ``"pruned_state"``) to file; relative paths are taken
            relative to ``out_dir``.
        config: The resolved run configuration.
        metrics: Measured results (accuracy, MACs, export error, ...).
        export: How the artefacts were made, for a release: opset, builder flags, input spec,
            and each artefact's verification (error, bound, tolerance). Omitted when None.
        preprocessing: What a deployment must do to an input before the model sees it (size,
            channel order, scaling, mean and std or none, class names:
            ``pipeline.data.datasets.preprocessing``); recorded as null when unknown.

    Returns:
        The manifest path.

    Raises:
        FileNotFoundError: If an artefact does not exist.
    """
    out = Path(out_dir)
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "artefacts": {name: _artefact_entry(out, name, Path(p)) for name, p in artefacts.items()},
        "config": dict(config),
        "metrics": dict(metrics),
        "preprocessing": dict(preprocessing) if preprocessing is not None else None,
    }
    if export is not None:
        manifest["export"] = dict(export)
    path = write_json_atomic(out / MANIFEST_NAME, manifest)
    logger.info("wrote %s (%d artefacts)", path, len(artefacts))
    return path


def _load(manifest_path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no manifest at {manifest_path}; run the export first") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err}); re-run the export") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artefacts"), dict):
        raise ValueError(
            f"{manifest_path} has no 'artefacts' mapping; expected a file from write_manifest"
        )
    return manifest


def _entry_problems(root: Path, name: str, entry: Mapping[str, Any]) -> list[str]:
    path = root / entry.get("path", "")
    if not path.is_file():
        return [f"{name}: missing file {path}; restore it or re-run the export"]
    problems = []
    size = path.stat().st_size
    if size != entry.get("bytes"):
        problems.append(f"{name}: size {size} bytes, manifest says {entry.get('bytes')}")
    digest = file_sha256(path)
    if digest != entry.get("sha256"):
        problems.append(
            f"{name}: sha256 {digest[:12]}… differs from the manifest's "
            f"{str(entry.get('sha256'))[:12]}…; {path} changed after export"
        )
    return problems


def verify_manifest(manifest_path: str | os.PathLike[str]) -> list[str]:
    """Check every artefact listed in a manifest against its recorded size and SHA-256.

    Args:
        manifest_path: A ``manifest.json`` from :func:`write_manifest`.

    Returns:
        One message per problem (missing file, size or hash mismatch); empty when all match.

    Raises:
        FileNotFoundError: If the manifest itself is missing.
        ValueError: If the manifest is not valid JSON or has no artefacts mapping.
    """
    path = Path(manifest_path)
    manifest = _load(path)
    problems = []
    for name, entry in manifest["artefacts"].items():
        problems += _entry_problems(path.parent, name, entry)
    for problem in problems:
        logger.warning("manifest %s: %s", path, problem)
    return problems
