"""Write artefacts atomically: a file (or a whole output folder) appears complete or not at all.

Every artefact recede writes (checkpoints, ONNX graphs, engines, JSON, reports, plots) goes
through :func:`atomic_path`. The writer fills a temporary file in the destination directory,
and only once it returns without error is the temporary file flushed to disk and renamed onto
the final path with :func:`os.replace`, which is atomic on POSIX and Windows when both paths
are on the same filesystem (hence the same directory). A crash, an exception or Ctrl-C leaves
the previous file, if any, untouched and no temporary file behind.

Output folders are written the same way by ``pipeline.core.output_folders.staged_folder``, built on
the helpers here (:func:`file_lock`, :func:`remove_stale_temps`, :func:`fsync_dir`,
:func:`exchange_paths`). A folder cannot be replaced by ``os.replace`` (it refuses a non-empty
target), so :func:`exchange_paths` swaps two folders in one system call where the OS offers one:
``renameat2(RENAME_EXCHANGE)`` on Linux (3.15 and later; ext4, xfs, btrfs, tmpfs, overlayfs),
``renamex_np(RENAME_SWAP)`` on macOS (APFS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_MAX_NAME_TRIES = 16


def _reserve_temp(final: Path) -> Path:
    """Create an empty, uniquely named temporary file next to ``final``.

    ``os.open`` with mode 0o666 lets the process umask decide the permissions, so the final
    file gets the same mode an ordinary ``open(path, "w")`` would give it (``mkstemp`` would
    force 0o600).
    """
    for _ in range(_MAX_NAME_TRIES):
        # Keep the final suffix: some writers (matplotlib, onnx) infer the format from it.
        candidate = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp{final.suffix}")
        try:
            fd = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(
        f"could not reserve a temporary file next to {final} after {_MAX_NAME_TRIES} tries; "
        "remove stale '.*.tmp*' files from that directory"
    )


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(directory: Path) -> None:
    """Persist the rename itself; not supported on every platform, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` only if the block succeeds.

    The parent directory is created if needed. The temporary file already exists (empty) when
    the block starts; writers that open by path simply overwrite it.

    Args:
        path: Final destination of the artefact.

    Yields:
        A temporary path in the same directory as ``path``, to be written by the block.

    Raises:
        FileNotFoundError: If the block deleted or moved the temporary file.
        BaseException: Whatever the block raised; the temporary file is removed first and the
            final path is left as it was.

    Example:
        >>> with atomic_path("runs/x/model.onnx") as tmp:  # doctest: +SKIP
        ...     onnx.save(proto, tmp)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve_temp(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(
                f"the temporary file {tmp} for {final} vanished inside atomic_path; the block "
                "must write to the yielded path, not move or delete it"
            )
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    logger.debug("wrote %s", final)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically.

    Args:
        path: Destination file.
        text: Content to write.
        encoding: Text encoding.

    Returns:
        The final path.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def _json_default(obj: Any) -> Any:
    """Convert the non-JSON types recede results contain; anything else is an error."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    # numpy scalars and arrays, torch tensors: all expose tolist() (scalars return a number).
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    raise TypeError(
        f"cannot write an object of type {type(obj).__qualname__} to JSON; expected JSON "
        "types, paths, dataclasses, sets, numpy values or tensors; convert it before writing"
    )


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (keys in insertion order) to ``path`` atomically.

    Paths become strings, dataclasses dicts, sets sorted lists, and numpy values or torch
    tensors their ``tolist()``. The object is serialised before the file is touched, so an
    unserialisable object never reaches the disk.

    Args:
        path: Destination file.
        obj: JSON-serialisable object.

    Returns:
        The final path.

    Raises:
        TypeError: If ``obj`` contains a value that cannot be converted.
    """
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    return write_text_atomic(path, text)


def save_torch_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically.

    Args:
        obj: Anything ``torch.save`` accepts, typically a state dict.
        path: Destination file.

    Returns:
        The final path.
    """
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


# --- Whole folders --------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276}  # for a libc without the wrapper
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


@functools.cache
def _exchange_call() -> Callable[[bytes, bytes], int] | None:
    """The system call that swaps two paths atomically, or None where there is none."""
    import ctypes
    import platform

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    system = platform.system()
    if system == "Linux" and hasattr(libc, "renameat2"):
        return lambda a, b: libc.renameat2(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    if system == "Linux" and platform.machine() in _RENAMEAT2_SYSCALL:
        number = _RENAMEAT2_SYSCALL[platform.machine()]
        return lambda a, b: libc.syscall(number, _AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    if system == "Darwin" and hasattr(libc, "renamex_np"):
        return lambda a, b: libc.renamex_np(a, b, _RENAME_SWAP)
    return None


def exchange_paths(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap what ``a`` and ``b`` name in one atomic step; False where the OS cannot.

    Both must exist on the same file system. A reader of either name sees the old entry or the
    new one, never none, and a kill cannot stop the swap half way. Returns False, having
    changed nothing, when this OS or file system has no such call (NFS, FUSE, old kernels).

    Raises:
        OSError: The call exists and failed for another reason (a path missing, permissions).
    """
    import ctypes

    call = _exchange_call()
    if call is None:
        return False
    if call(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), os.fspath(a), None, os.fspath(b))


def is_stale_temp(path: Path) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_path` (``.<name>.<hex>.tmp<ext>``)."""
    return path.name.startswith(".") and ".tmp" in path.name and path.is_file()


def remove_stale_temps(directory: str | os.PathLike[str]) -> int:
    """Delete leftover temporary files below ``directory`` (a SIGKILL leaves them behind).

    Only call this while holding the folder's lock: a live writer's temporary file looks the
    same as a dead one's.
    """
    stale = [p for p in Path(directory).rglob(".*.tmp*") if is_stale_temp(p)]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d stale temporary files under %s", len(stale), directory)
    return len(stale)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, a file created for it and removed on release.

    Lock files do not persist, so no ``.lock`` clutters a run folder's parent or the data cache.
    Removing a lock file is safe because every taker checks, once ``flock`` returns, that
    ``path`` still names the file it locked, and starts over if not: a waiter that was granted
    the lock on a file its holder had just removed would otherwise hold it beside a newcomer
    locking a new file of the same name. The holder removes the file before it releases the
    lock. The OS drops the lock when a process dies; a killed holder leaves an empty file that
    the next taker locks and removes.

    Raises:
        BlockingIOError: ``wait`` is false and another process holds the lock.
    """
    import fcntl

    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held, named = os.fstat(fd), os.stat(path)
        except (BlockingIOError, FileNotFoundError) as err:
            os.close(fd)
            if isinstance(err, BlockingIOError):
                raise
            continue  # removed by its holder between our open and flock: take the new one
        if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
