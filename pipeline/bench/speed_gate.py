"""A pruned model slower than the dense one is never shipped silently.

Pruning removes arithmetic, but the kernels decide the speed: widths that are not multiples of
the backend's vector block (8 or 16 on ONNX Runtime's CPU convolutions) leave the fast layouts,
and a model with fewer MACs can run slower (a new user's MobileNetV3 ran at 0.31x the dense
speed at batch 1 with exit 0). A row of the model's own latency table flagged ``slower``
(:func:`pipeline.bench.timing.annotated_rows`: slower than the dense model at the same precision
by more than the measurement's spread) makes ``recede run`` exit 1 after writing its folder,
naming the rows and the fix, unless the user allows it (``--allow-slower``,
``export.allow_slower: true``); allowed, the rows stay flagged in the report and the plot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.bench.timing import LatencyRow, annotated_rows
from pipeline.core.checks import VerificationError

FIX = (
    "round the kept widths to what the kernels run fast (prune.round_to=8, or 16 on AVX-512 "
    "CPUs), or pass --allow-slower (export.allow_slower: true) to ship it anyway"
)


class SlowerError(VerificationError):
    """The pruned model is slower than the dense one beyond noise (CLI exit code 1)."""


def slower_rows(
    rows: Sequence[LatencyRow], macs: Mapping[str, int | None] | None = None
) -> list[dict[str, Any]]:
    """The annotated rows flagged ``slower``."""
    return [a for a in annotated_rows(rows, macs) if "slower" in a["flags"]]


def refuse_slower(rows: Sequence[LatencyRow], *, allow: bool, where: str) -> list[str]:
    """Raise :class:`SlowerError` when a row is flagged ``slower`` and ``allow`` is off; the
    flagged rows, described, otherwise (for a warning)."""
    flagged = [
        f"{r['backend']} {r['device']} {r['precision']} batch {r['batch']} ({r['model']})"
        for r in slower_rows(rows)
    ]
    if flagged and not allow:
        raise SlowerError(
            f"the pruned model is slower than the dense one beyond the measured noise on "
            f"{'; '.join(flagged)}; {FIX}; {where}"
        )
    return flagged
