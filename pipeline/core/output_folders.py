"""Output folders (run, train, prune, export) appear complete or not at all, and never mix writers.

A folder is built in ``.<name>.partial`` beside its target under a lock (:func:`staged_folder`)
and swapped into place only when every file is there (``pipeline.core.folder_swap``: the name
holds a complete folder at every instant, even across a kill); the marker ``.recede.json``
records which command wrote it and every file's SHA-256. :func:`check_out_folder` refuses,
before any work, an ``--out`` that cannot be written (nor its parent, where the new folder is
built), is in use, holds foreign files or another recede folder, lies inside one, or cannot be
swapped as a whole (a symlink, a mount point). Single files are written by
``pipeline.core.atomic``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.atomic import file_lock, remove_stale_temps, write_json_atomic
from pipeline.core.folder_swap import (
    lock_path,
    recover_interrupted_swap,
    recover_swap_locked,
    swap_into_place,
)

logger = logging.getLogger(__name__)

# A run, train, prune or export folder is written into ``.<name>.partial`` beside it and swapped
# into place only when every file is there, under a lock (``.<name>.lock``, removed after) held
# for the whole write, so a reader never sees a folder mixing two writers or two versions.

MARKER = ".recede.json"
_KIND_FILES = {  # folders written before the marker existed, recognised by their files
    "run": ("config.yaml", "report.json"),
    "train": ("config.yaml", "model"),
    "prune": ("plan.json", "model.pt"),
}


class OutputError(ValueError):
    """An output folder cannot be written, is in use, or holds foreign files (CLI exit 2)."""


def folder_kind(path: Path) -> str | None:
    """Which recede command wrote ``path`` (``run``, ``train``, ``prune``), or None."""
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8"))["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for kind, names in _KIND_FILES.items():
        if all((path / n).exists() for n in names):
            return kind
    return None


def _unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be created in ``folder``, or None; leaves nothing behind.

    Mode bits are not the whole story (root passes ``os.access`` on /proc, where no file can
    be created), so a uniquely named probe file is created and removed at once, and the
    folder's times are put back.
    """
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return "read-only file system"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    probe, before = folder / f".recede-probe-{secrets.token_hex(4)}", folder.stat()
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as err:
        return f"creating a file there fails: {err.strerror}"
    probe.unlink()
    os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))  # as if never probed
    return None


def check_writable(path: str | os.PathLike[str], flag: str) -> None:
    """Raise unless files can be created in ``path``'s nearest existing folder."""
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(
            f"{flag} {path}: {folder} is a file, expected a folder; pick another path"
        )
    reason = _unwritable_reason(folder)
    if reason is not None:
        raise OutputError(
            f"{flag} {path}: cannot write in {folder} ({reason}); expected a writable folder; "
            "fix its permissions or pick another path"
        )


def nested_outputs(folder: str | os.PathLike[str]) -> list[Path]:
    """Folders below ``folder`` (not itself) that another recede command wrote, e.g. a release
    exported with ``export DIR --out DIR/rel``: each carries its own marker. Unfinished writes
    (``.<name>.partial``) do not count: they hold nothing complete."""
    root = Path(folder)
    return sorted(
        marker.parent
        for marker in root.rglob(MARKER)
        if marker.parent != root
        and marker.is_file()
        and not any(part.endswith(".partial") for part in marker.relative_to(root).parts)
    )


def _check_no_nested_outputs(out: Path, path: str | os.PathLike[str], flag: str, force: bool):
    """Replacing ``out`` deletes every folder inside it; one recede wrote is never deleted
    silently: refused, or with ``force`` deleted with a warning naming it."""
    nested = nested_outputs(out)
    if not nested:
        return
    names = ", ".join(str(p) for p in nested[:5]) + (" ..." if len(nested) > 5 else "")
    if force:
        logger.warning(
            "--force: replacing %s deletes the recede output folders in it: %s", out, names
        )
        return
    raise OutputError(
        f"{flag} {path} holds another recede output folder ({names}, `recede "
        f"{folder_kind(nested[0]) or 'export'}`), which replacing {path} would delete; expected "
        f"a folder without recede outputs inside; move it out, pick another {flag}, or pass "
        "--force to delete it with the folder"
    )


def check_replaceable(path: str | os.PathLike[str], flag: str) -> None:
    """Refuse a folder that cannot be swapped for a new version as a whole: a symlink, a
    mount point, or one whose parent takes no files (the new version is built beside it)."""
    out = Path(path).absolute()
    _refuse_unreplaceable(out, path, flag)
    _check_staging_writable(out, path, flag)


def _refuse_unreplaceable(out: Path, path: str | os.PathLike[str], flag: str) -> None:
    """Refuse an ``out`` that cannot be swapped as a whole: a symlink or a mount point."""
    if out.is_symlink():
        target = os.readlink(out)
        raise OutputError(
            f"{flag} {path} is a symbolic link (to {target}); recede replaces an output folder "
            "as a whole, which would put a folder where the link is and leave its target as it "
            f"was; expected a real folder; pass {flag} {out.resolve()} to write there, or remove "
            "the link"
        )
    if os.path.ismount(out):
        raise OutputError(
            f"{flag} {path} is a mount point; recede builds the new folder beside it and renames "
            "it into place, which cannot cross file systems; expected a folder on the file "
            f"system that holds its parent; pass a folder inside it, e.g. {flag} {out / 'release'}"
        )


def _check_staging_writable(out: Path, path: str | os.PathLike[str], flag: str) -> None:
    """The new folder is built and locked beside ``out``: its parent must take files too."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    reason = _unwritable_reason(parent) if parent.is_dir() else None
    if reason is not None:
        raise OutputError(
            f"{flag} {path}: cannot write in {parent} ({reason}), where recede builds the new "
            f"folder (.{out.name}.partial) and its lock beside {out.name}; expected a writable "
            "parent folder; fix its permissions or pick another path"
        )


def _check_outside_outputs(out: Path, path: str | os.PathLike[str], flag: str) -> None:
    """Refuse an ``out`` inside another recede output folder (``export DIR --out DIR/rel``):
    replacing that folder would delete it, and its file index would not list it."""
    for folder in out.parents:
        if (folder / MARKER).is_file():
            raise OutputError(
                f"{flag} {path} is inside {folder}, a `recede {folder_kind(folder) or 'output'}` "
                f"folder; writing there puts a folder that replacing {folder.name} would delete "
                f"and that its file index does not list; expected a folder outside it; pass e.g. "
                f"{flag} {folder.parent / out.name}"
            )


def check_out_folder(path: str | os.PathLike[str], *, kind: str, force: bool, flag: str) -> Path:
    """Refuse an output path that is a file, unwritable, or a folder of something else.

    A folder written by the same command (``kind``) is replaced as a whole; any other non-empty
    folder only with ``force``. A folder holding another recede output folder below it (a
    release exported into it with ``export DIR --out DIR/rel``) is refused without ``force``,
    even when the same command wrote it: replacing it would delete that release, and a release
    is never deleted silently (with ``force`` it is deleted with a warning naming it). A
    symlink, a mount point, a path inside another recede output folder and a parent folder
    that takes no files (the new folder is built beside ``path``) are refused too. A swap that
    a kill interrupted is recovered first, so the folder judged is the complete one.
    """
    out = Path(path).absolute()
    _refuse_unreplaceable(out, path, flag)
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"{flag} {path} is an existing file, expected a folder (new or empty); "
            "pick another path or remove the file"
        )
    check_writable(out, flag)
    _check_staging_writable(out, path, flag)
    recover_interrupted_swap(out)
    _check_outside_outputs(out, path, flag)
    if out.is_dir() and any(out.iterdir()) and not force and folder_kind(out) != kind:
        found = folder_kind(out)
        what = f"a `recede {found}` folder" if found else "files recede did not write"
        raise OutputError(
            f"{flag} {path} holds {what}, expected an empty folder or one from `recede {kind}`; "
            f"pick another folder, or pass --force to replace its contents as a whole"
        )
    if out.is_dir():
        _check_no_nested_outputs(out, path, flag, force)
    return out


@contextlib.contextmanager
def _folder_lock(final: Path) -> Iterator[None]:
    final.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(lock_path(final), wait=False))
        except BlockingIOError:
            raise OutputError(
                f"{final} is being written by another recede process (lock "
                f".{final.name}.lock held); wait for it to finish or pick another folder"
            ) from None
        yield


def partial_folder(final: str | os.PathLike[str]) -> Path:
    """Where :func:`staged_folder` builds ``final`` (kept after a failure, for ``--resume``)."""
    final = Path(final).absolute()
    return final.parent / f".{final.name}.partial"


def _prepare_partial(final: Path, partial: Path, start: str) -> None:
    recover_swap_locked(final)
    if partial.exists() and start != "resume":
        shutil.rmtree(partial)
    if start != "empty" and not partial.exists() and final.is_dir():
        shutil.copytree(final, partial, symlinks=True)
    partial.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(partial)


def _write_index(folder: Path, kind: str) -> None:
    """Record every file's SHA-256 in the marker (checked by ``pipeline.core.integrity``)."""
    from pipeline.core.integrity import index_files

    write_json_atomic(folder / MARKER, {"kind": kind, "files": index_files(folder)})


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


_NOTHING_TO_RESUME = {MARKER, "config.yaml"}  # written before any work


def _resumable(partial: Path) -> bool:
    """Whether ``partial`` holds work to resume from: a file besides the marker and config."""
    return partial.is_dir() and any(
        p.is_file() and p.relative_to(partial).as_posix() not in _NOTHING_TO_RESUME
        for p in partial.rglob("*")
    )


@contextlib.contextmanager
def staged_folder(
    final: str | os.PathLike[str], *, kind: str, start: str = "empty", keep_on_error: bool = False
) -> Iterator[Path]:
    """Yield a hidden folder beside ``final`` that replaces it only if the block succeeds.

    Args:
        final: The output folder.
        kind: The command writing it (``run``, ``train``, ``prune``), recorded in the folder.
        start: ``empty`` (a fresh folder), ``copy`` (a copy of ``final``, to add files to it) or
            ``resume`` (the partial folder a failed or killed write left, else a copy).
        keep_on_error: Keep the partial folder when the block raises (to resume from it), if
            it holds anything besides its marker and ``config.yaml``.

    The marker ``.recede.json`` records the command and, once the block succeeded, the SHA-256
    of every file in the folder (``pipeline.core.integrity``). When the block raises (or
    Ctrl-C lands while the index is written), ``final`` is left as it was, and so is its parent:
    folders created for it are removed again.

    Raises:
        OutputError: If another process is writing ``final``.
    """
    final = Path(final).absolute()
    partial = partial_folder(final)
    created = _missing_folders(final.parent)
    try:
        with _folder_lock(final):
            _prepare_partial(final, partial, start)
            write_json_atomic(partial / MARKER, {"kind": kind})
            try:
                yield partial
                _write_index(partial, kind)
                swap_into_place(partial, final)
            except BaseException:
                if not (keep_on_error and _resumable(partial)):
                    shutil.rmtree(partial, ignore_errors=True)
                raise
    except BaseException:
        _remove_if_empty(created)
        raise
    logger.info("wrote %s", final)
