"""Measure whether a reader ever finds an output folder missing while recede swaps new versions in.

A writer replaces ``rel`` ``--swaps`` times with ``staged_folder`` (each version a marker and
one file); a reader in another process, unsynchronised, checks ``rel/.recede.json`` in a tight
loop and counts the checks that found it missing. Run once with the OS's atomic exchange
(``renameat2(RENAME_EXCHANGE)`` on Linux) and once with the two-rename fallback that file systems
without it get; the decision and its figures are in docs/decisions.md ("Crash-safe folder swap").
The deterministic version of this check, after every system call, is
``tests/core/test_folder_swap.py``.

    PYTHONPATH=. python benchmarks/folder_swap_atomicity.py --swaps 2000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
from pathlib import Path

from pipeline.core import folder_swap
from pipeline.core.output_folders import MARKER, staged_folder


def _read(marker: Path, stop, counts) -> None:
    checks = missing = 0
    while not stop.is_set():
        checks += 1
        missing += not os.path.exists(marker)
    counts.put((checks, missing))


def measure(mode: str, swaps: int) -> tuple[int, int]:
    """(reader checks, checks that found the folder missing) over ``swaps`` swaps."""
    if mode == "fallback":
        folder_swap.exchange_paths = lambda a, b: False
    with tempfile.TemporaryDirectory() as tmp:
        rel = Path(tmp) / "rel"
        with staged_folder(rel, kind="export") as stage:
            (stage / "model.bin").write_text("v0")
        stop, counts = multiprocessing.Event(), multiprocessing.Queue()
        reader = multiprocessing.Process(target=_read, args=(rel / MARKER, stop, counts))
        reader.start()
        for i in range(swaps):
            with staged_folder(rel, kind="export") as stage:
                (stage / "model.bin").write_text(f"v{i + 1}")
        stop.set()
        result = counts.get()
        reader.join()
    return result


def _measure_into(mode: str, swaps: int, out) -> None:
    out.put(measure(mode, swaps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--swaps", type=int, default=2000, help="versions swapped in (default 2000)"
    )
    args = parser.parse_args()
    print(f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, {args.swaps} swaps")
    for mode in ("exchange", "fallback"):
        result = multiprocessing.Queue()  # a fresh process each, so the fallback patch stays there
        worker = multiprocessing.Process(target=_measure_into, args=(mode, args.swaps, result))
        worker.start()
        checks, missing = result.get()
        worker.join()
        print(f"{mode:9s} reader checks {checks:>10,d}  found rel missing {missing:>7,d}")


if __name__ == "__main__":
    main()
