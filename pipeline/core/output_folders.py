"""Output folders (run, train, prune, export) appear complete or not at all, and never mix writers.

A folder is built in ``.<name>.partial`` beside its target under a lock (:func:`staged_folder`)
and swapped into place only when every file is there; the marker ``.recede.json`` records which
command wrote it and every file's SHA-256. :func:`check_out_folder` refuses, before any work,
an ``--out`` that cannot be written, is in use, holds foreign files or another recede folder.
Single files are written by ``pipeline.core.atomic``.
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

from pipeline.core.atomic import file_lock, fsync_dir, remove_stale_temps, write_json_atomic

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


def check_out_folder(path: str | os.PathLike[str], *, kind: str, force: bool, flag: str) -> Path:
    """Refuse an output path that is a file, unwritable, or a folder of something else.

    A folder written by the same command (``kind``) is replaced as a whole; any other non-empty
    folder only with ``force``. A folder holding another recede output folder below it (a
    release exported into it with ``export DIR --out DIR/rel``) is refused without ``force``,
    even when the same command wrote it: replacing it would delete that release, and a release
    is never deleted silently (with ``force`` it is deleted with a warning naming it).
    """
    out = Path(path).absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"{flag} {path} is an existing file, expected a folder (new or empty); "
            "pick another path or remove the file"
        )
    check_writable(out, flag)
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
            stack.enter_context(file_lock(final.parent / f".{final.name}.lock", wait=False))
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


def _old_copies(final: Path) -> list[Path]:
    """The ``.<name>.old.*`` folders a swap leaves while it runs, oldest first."""
    olds = [p for p in final.parent.glob(f".{final.name}.old.*") if p.is_dir()]
    return sorted(olds, key=lambda p: p.stat().st_ctime)


def _restore_orphan(final: Path) -> None:
    """Put back the last complete copy a swap killed between its two renames left hidden.

    Such a kill leaves ``final`` missing and the previous folder as ``.<name>.old.*``; it is
    the only complete copy there is, so it goes back into place before anything else happens.
    """
    olds = _old_copies(final)
    if final.exists() or not olds:
        return
    os.rename(olds[-1], final)
    fsync_dir(final.parent)
    logger.warning(
        "restored %s from %s, left hidden by a write killed while swapping it in",
        final,
        olds[-1].name,
    )


def _prepare_partial(final: Path, partial: Path, start: str) -> None:
    _restore_orphan(final)
    if partial.exists() and start != "resume":
        shutil.rmtree(partial)
    if start != "empty" and not partial.exists() and final.is_dir():
        shutil.copytree(final, partial, symlinks=True)
    partial.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(partial)


def _swap_into_place(partial: Path, final: Path) -> None:
    """Rename ``partial`` onto ``final``; older copies are deleted only once it is in place."""
    if final.exists():
        os.rename(final, final.parent / f".{final.name}.old.{secrets.token_hex(4)}")
    os.rename(partial, final)
    fsync_dir(final.parent)
    for old in _old_copies(final):
        shutil.rmtree(old, ignore_errors=True)


def _write_index(folder: Path, kind: str) -> None:
    """Record every file's SHA-256 in the marker (checked by ``pipeline.core.integrity``)."""
    from pipeline.core.integrity import index_files

    write_json_atomic(folder / MARKER, {"kind": kind, "files": index_files(folder)})


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
        keep_on_error: Keep the partial folder when the block raises (to resume from it).

    The marker ``.recede.json`` records the command and, once the block succeeded, the SHA-256
    of every file in the folder (``pipeline.core.integrity``).

    Raises:
        OutputError: If another process is writing ``final``.
    """
    final = Path(final).absolute()
    partial = partial_folder(final)
    with _folder_lock(final):
        _prepare_partial(final, partial, start)
        write_json_atomic(partial / MARKER, {"kind": kind})
        try:
            yield partial
        except BaseException:
            if not keep_on_error:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        _write_index(partial, kind)
        _swap_into_place(partial, final)
    logger.info("wrote %s", final)
