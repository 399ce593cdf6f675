"""Check that an output folder is still what recede wrote: every file against its SHA-256.

Just before :func:`pipeline.core.output_folders.staged_folder` moves a finished run, train, prune or export
folder into place, it records the SHA-256 of every file in it (``config.yaml``, reports,
``checkpoints/``, ``pruned/``, ONNX files, plots, the release ``manifest.json``) in the folder's
marker ``.recede.json`` under ``files``. :func:`verify_folder` recomputes them: a changed,
missing or added file is refused, so ``recede inspect`` and ``recede bench`` never report or
time a folder that mixes two runs.

This file index is separate from the release ``manifest.json`` (``pipeline.export.manifest``),
which lists only the artefacts a user ships together with versions and metrics; the index
covers every byte of the folder, the manifest included. A sub-folder that carries its own
marker (``recede export`` into a run's ``pruned/``) is checked against its own index, which
supersedes the parent's entries below it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = ".recede.json"  # the same name as pipeline.core.output_folders.MARKER
_SHOWN = 5


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class IntegrityError(ValueError):
    """A folder's files do not match its index (CLI exit 2); the message names each file."""


def _files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Files below ``folder`` except its marker, and the sub-folders that carry their own
    marker (whose files their own index covers)."""
    found, nested = [], []
    for here, dirs, names in os.walk(folder):
        own = [d for d in dirs if (Path(here, d) / MARKER).is_file()]
        nested += [Path(here, d) for d in own]
        dirs[:] = sorted(set(dirs) - set(own))
        found += [Path(here, n) for n in names if not (n == MARKER and Path(here) == folder)]
    return sorted(found), sorted(nested)


def index_files(folder: str | os.PathLike[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of every file :func:`verify_folder` will check."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in _files(root)[0]}


def _read_index(root: Path) -> dict[str, str]:
    try:
        index = json.loads((root / MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        index = None
    if not isinstance(index, dict):
        raise IntegrityError(
            f"{root / MARKER} holds no file index (expected 'files': path -> sha256, as recede "
            "writes since it checks folders); rerun the command that wrote the folder, or pass "
            "--force to use it unchecked"
        )
    return index


def _problems(root: Path) -> list[str]:
    """What differs between ``root``'s files and its index, nested indexed folders included."""
    files, nested_roots = _files(root)
    below = tuple(f"{n.relative_to(root).as_posix()}/" for n in nested_roots)
    index = {k: v for k, v in _read_index(root).items() if not k.startswith(below or ("/",))}
    problems = []
    on_disk = {p.relative_to(root).as_posix(): p for p in files}
    for name, expected in index.items():
        if name not in on_disk:
            problems.append(f"{name} is missing (expected sha256 {expected[:16]}...)")
        elif (got := file_sha256(on_disk[name])) != expected:
            problems.append(f"{name} has sha256 {got[:16]}..., expected {expected[:16]}...")
    problems += [f"{name} is not in the index (added later)" for name in on_disk.keys() - index]
    for nested in nested_roots:
        problems += [f"{nested.relative_to(root)}/{p}" for p in _problems(nested)]
    return problems


def indexed_root(path: str | os.PathLike[str]) -> Path | None:
    """The folder whose index covers ``path``: itself, or its parent (a run's ``pruned/``)."""
    path = Path(path)
    for candidate in (path, path.parent):
        if (candidate / MARKER).is_file():
            return candidate
    return None


_WRITTEN_BY_RECEDE = (  # files only a recede command writes, with what they mark
    ("config.yaml", "report.json"),
    ("plan.json", "model.pt"),
    ("config.yaml", "model"),
    ("manifest.json",),
)


def _refuse_unindexed(path: Path) -> None:
    for folder in (path, path.parent):
        for names in _WRITTEN_BY_RECEDE:
            if folder.is_dir() and all((folder / n).exists() for n in names):
                raise IntegrityError(
                    f"{folder} holds {' and '.join(names)}, as recede writes them, but no "
                    f"index {MARKER}: it was deleted, so the files cannot be checked; rerun the "
                    "command that wrote the folder, or pass --force to use it unchecked"
                )


def verify_folder(path: str | os.PathLike[str]) -> None:
    """Raise :class:`IntegrityError` unless every file under ``path``'s folder matches its index.

    A bare model folder without a marker (``pipeline.models.checkpoint.save_pruned`` from a user's own
    code) has no index and passes; a folder a recede command wrote (known by its files) whose
    marker was deleted is refused, or deleting it would switch the check off.
    """
    root = indexed_root(path)
    if root is None:
        _refuse_unindexed(Path(path))
        return
    problems = _problems(root)
    if problems:
        shown = "; ".join(problems[:_SHOWN])
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise IntegrityError(
            f"{root} was changed after recede wrote it: {shown}{more}; rerun the command that "
            "wrote it (or restore the files), or pass --force to use it unchecked"
        )
    logger.debug("%s: every file matches its index", root)
