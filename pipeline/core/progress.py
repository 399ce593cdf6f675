"""Progress bars for long loops: tqdm with a rate and an ETA, shown only to someone watching.

Decisions:

- **When a bar shows.** Only when stderr is a terminal, the process is the one that logs (rank
  0 under ``torchrun``), and nobody asked for quiet. Quiet is asked for by the CLI's
  ``--quiet`` (it calls :func:`set_quiet`) or, for the Python API, ``make`` and CI, by the
  environment variable ``RECEDE_QUIET`` set to anything but ``""``/``0``. A redirected log
  therefore never fills with carriage-return frames.
- **Bars never replace log lines.** A bar is transient (``leave=False``): it disappears when
  its loop ends, and the stage's own log line (an epoch line, a summary) stays as the record.
  Quiet turns bars off only; the log level is ``-v``'s business.
- **One wrapper.** Every long loop goes through :func:`progress`, so the rule above lives in
  one place and a disabled bar costs nothing but tqdm's no-op wrapper.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

from pipeline.core import distributed

T = TypeVar("T")

QUIET_ENV = "RECEDE_QUIET"
_quiet = False  # set by the CLI's --quiet


def set_quiet(quiet: bool) -> None:
    """Turn progress bars off (``True``) or back to the default rule for this process."""
    global _quiet
    _quiet = quiet


def bars_enabled() -> bool:
    """Whether a bar would show now (see the module docstring for the rule)."""
    env_quiet = os.environ.get(QUIET_ENV, "") not in ("", "0")
    return not (_quiet or env_quiet) and sys.stderr.isatty() and distributed.is_main()


def progress(
    iterable: Iterable[T], desc: str, *, total: int | None = None, unit: str = "batch"
) -> tqdm:
    """``iterable`` wrapped in a transient tqdm bar (rate and ETA), disabled unless watched.

    Args:
        iterable: The loop's iterable; its ``len`` gives the ETA unless ``total`` is given.
        desc: What the loop does, e.g. ``"train epoch 3/10"``.
        total: Iterations the loop will run when it stops early (e.g. a batch limit).
        unit: What one iteration is, for the rate (``batch/s``).

    Returns:
        The bar; iterate it like ``iterable``. ``set_postfix_str`` works on a disabled bar too.
    """
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        disable=not bars_enabled(),
    )
