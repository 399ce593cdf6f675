"""Replace a folder by another as a unit, so that a kill at any moment never loses the last one.

An output folder (``pipeline.core.output_folders``) is finished in a hidden staging folder and
then swapped into place. This module does the swap, and the recovery after a swap was killed.

Decision (docs/decisions.md, "Crash-safe folder swap"): ``os.replace`` cannot put a folder over
a non-empty one, and two renames (the old folder aside, the new one in) leave the name missing
between them; a SIGKILL there once left the last complete release hidden as ``.<name>.old.*``.
So the swap exchanges the two folders in one system call, ``renameat2(RENAME_EXCHANGE)`` on
Linux or ``renamex_np(RENAME_SWAP)`` on macOS (``pipeline.core.atomic.exchange_paths``), and
the name holds a complete folder at every instant. A symlink flip would be atomic everywhere,
but it makes every output folder a link and the release folder a moving target for tools that
copy it; a journal would still leave the name missing between its renames. Where the file
system has no exchange (NFS, some FUSE mounts), the two renames remain, and the gap is closed by
:func:`recover_interrupted_swap`, which every command runs on its paths before it reads or
judges them. ``tests/core/test_folder_swap.py`` kills a writer at every step of the swap, on
both paths, and checks a complete folder under its name after each command that may follow.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.atomic import exchange_paths, file_lock, fsync_dir

logger = logging.getLogger(__name__)


# A finished folder replaces ``final`` in three steps, each one system call:
#   1. rename ``.<name>.partial`` -> ``.<name>.new.<hex>`` (``final`` untouched);
#   2. exchange ``.<name>.new.<hex>`` and ``final`` (``exchange_paths``: one atomic call), so
#      ``final`` is the new folder and ``.<name>.new.<hex>`` the one it replaced;
#   3. delete ``.<name>.new.<hex>``.
# ``final`` names a complete folder before, during and after: a kill at any point leaves at
# most a hidden ``.<name>.new.*``, which is either the killed command's own output (before 2)
# or the folder it replaced (after 2), so the next command deletes it. Where the OS or file
# system has no atomic exchange, step 2 is two renames (``final`` -> ``.<name>.old.<hex>``, then
# the new folder -> ``final``); a kill between them leaves ``final`` missing until the next
# command restores ``.<name>.old.*`` first thing (``recover_interrupted_swap``).
def _hidden(final: Path, tag: str) -> Path:
    return final.parent / f".{final.name}.{tag}.{secrets.token_hex(4)}"


def _leftovers(final: Path, tag: str) -> list[Path]:
    """The ``.<name>.<tag>.*`` folders a killed swap left, oldest first."""
    found = [
        p
        for p in final.parent.glob(f".{glob.escape(final.name)}.{tag}.*")
        if p.is_dir() and not p.is_symlink()
    ]
    return sorted(found, key=lambda p: p.stat().st_ctime_ns)


def recover_swap_locked(final: Path) -> None:
    """Under ``final``'s lock: restore what a killed fallback swap hid, delete what it left."""
    olds = _leftovers(final, "old")
    if not os.path.lexists(final) and olds:
        os.rename(olds[-1], final)
        fsync_dir(final.parent)
        logger.warning(
            "restored %s from %s, left hidden by a write killed while swapping it in",
            final,
            olds[-1].name,
        )
        olds = olds[:-1]
    for stale in (*olds, *_leftovers(final, "new")):  # replaced folders, or killed outputs
        shutil.rmtree(stale, ignore_errors=True)


def lock_path(final: Path) -> Path:
    """The lock file a writer of ``final`` holds (beside it, removed on release)."""
    return final.parent / f".{final.name}.lock"


def recover_interrupted_swap(path: str | os.PathLike[str]) -> None:
    """Finish what a swap killed at ``path`` left, so a complete folder is at ``path`` again.

    Does nothing (and writes nothing) unless a killed swap left hidden folders beside ``path``,
    or while another process holds ``path``'s lock (its own swap is under way).
    """
    final = Path(path).absolute()
    if not final.parent.is_dir():
        return
    if not (_leftovers(final, "old") or _leftovers(final, "new")):
        return
    try:
        with file_lock(lock_path(final), wait=False):
            recover_swap_locked(final)
    except BlockingIOError:
        logger.debug("%s is being written; its writer finishes the swap", final)
    except OSError as err:  # a reader in a folder it cannot write: the next writer recovers
        logger.debug("cannot recover %s here: %s", final, err)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends (a swap is a few system calls, so an
    interrupt lands before or after it, never between its steps); SIGKILL cannot be held."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, OSError, ValueError):  # no pthread_sigmask here
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _swap(partial: Path, final: Path) -> Path | None:
    """Steps 1 and 2 of the swap; returns the folder ``final`` replaced (to delete), if any."""
    if not os.path.lexists(final):
        os.rename(partial, final)  # nothing to replace: one atomic rename
        fsync_dir(final.parent)
        return None
    staged, old = _hidden(final, "new"), None
    os.rename(partial, staged)
    try:
        if exchange_paths(staged, final):
            fsync_dir(final.parent)
            return staged  # it now holds the previous folder
        old = _hidden(final, "old")
        os.rename(final, old)  # the fallback: final is missing until the next rename
        os.rename(staged, final)
    except OSError:  # a refusal by the OS (not a kill): put everything back
        if old is not None and old.exists() and not os.path.lexists(final):
            os.rename(old, final)
        os.rename(staged, partial)
        raise
    fsync_dir(final.parent)
    return old


def swap_into_place(partial: Path, final: Path) -> None:
    """Replace ``final`` by ``partial`` (see the comment above); the folder it replaced is
    deleted only once the new one is in place."""
    with _signals_deferred():
        replaced = _swap(partial, final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
