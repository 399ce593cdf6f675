"""A writer that is killed at one step of writing an output folder (run by tests/core/test_folder_swap.py).

``python tests/core/_swap_child.py KILL MODE OUT KIND SOURCE``: write ``OUT`` with
``staged_folder(kind=KIND)``, its files copied from ``SOURCE`` plus ``version`` = ``v2``, and
SIGKILL this process just before the step numbered ``KILL`` (-1: never). A step is one call
that changes the file system (rename, replace, exchange, mkdir, unlink, rmtree, fsync of a
folder). ``MODE`` is ``exchange`` (the OS's atomic exchange) or ``fallback`` (as where the file
system has none). Prints the number of steps taken, so a run with KILL -1 counts them.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

from pipeline.core import atomic, folder_swap
from pipeline.core.output_folders import staged_folder


def main() -> None:
    kill, mode, out, kind, source = sys.argv[1:6]
    taken = [0]

    def step(fn):
        def counted(*args, **kwargs):
            if taken[0] == int(kill):
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs, as with a real kill
            taken[0] += 1
            return fn(*args, **kwargs)

        return counted

    if mode == "fallback":
        folder_swap.exchange_paths = lambda a, b: False
    folder_swap.exchange_paths = step(folder_swap.exchange_paths)
    folder_swap.fsync_dir = atomic.fsync_dir = step(atomic.fsync_dir)
    for name in ("rename", "replace", "mkdir", "unlink"):
        setattr(os, name, step(getattr(os, name)))
    shutil.rmtree = step(shutil.rmtree)
    with staged_folder(out, kind=kind) as stage:
        for path in Path(source).iterdir():
            if not path.name.startswith("."):
                (stage / path.name).write_bytes(path.read_bytes())
        (stage / "version").write_text("v2")
    print(taken[0])


if __name__ == "__main__":
    main()
