"""``recede bench --compare/--save-baseline``: the release gate's side of the command line.

The gate's flags are checked with the others, before any model is opened; the baseline is read
and checked against the machine and the models before any timing
(:mod:`pipeline.bench.baseline`). After timing, a row slower than ``--max-slowdown`` times the
baseline beyond the noise is measured again and fails (exit 1) only if it fails again
(:mod:`pipeline.bench.latency_gate`); rows on one side only are reported. A baseline is written
only from a measurement that could serve as one: never when the gate failed (the next build
would pass against the slow figures), nor with a noisy or preempted row (the next
``--compare`` would refuse it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.cli.args import EXIT_OK, EXIT_VERIFY, UsageError

_WITH_COMPARE = ("--max-slowdown", "--allow-other-machine", "--allow-other-model")


def check_gate_flags(args: argparse.Namespace) -> None:
    """Refuse a gate flag without ``--compare`` (it would be ignored); default
    ``--max-slowdown`` to :data:`~pipeline.bench.latency_gate.DEFAULT_MAX_SLOWDOWN`."""
    from pipeline.bench.latency_gate import DEFAULT_MAX_SLOWDOWN

    given = [
        flag
        for flag in _WITH_COMPARE
        if getattr(args, flag.lstrip("-").replace("-", "_")) not in (None, False)
    ]
    if given and not args.compare:
        raise UsageError(
            f"{' '.join(given)} only apply to the --compare gate, but no --compare was given; "
            f"expected --compare BASELINE.json with them; add it, or drop {' '.join(given)}"
        )
    if args.max_slowdown is None:
        args.max_slowdown = DEFAULT_MAX_SLOWDOWN
    for flag in ("--json", "--markdown", "--plot"):
        path = getattr(args, flag.lstrip("-"))
        if args.compare and path and Path(path).absolute() == Path(args.compare).absolute():
            raise UsageError(
                f"{flag} {path} is the --compare baseline: the report would replace it whether "
                f"the gate passes or fails; expected another path, or --save-baseline {path} "
                "to roll the baseline forward (written only when the gate passes)"
            )


def gate(
    args: argparse.Namespace,
    report: dict,
    remeasure: Callable[[], dict],
    baseline: dict,
    allowed: list[str],
) -> dict:
    """Compare ``report`` with the checked ``baseline``; a failing row is measured again and
    fails only if it fails again. Returns the report (the repeat's, if any) with its ``gate``
    section: rows compared and failing, rows on one side only, differences allowed."""
    from pipeline.bench.latency_gate import compare_rows, missing_rows

    old = baseline["rows"]
    failing, compared = compare_rows(report["rows"], old, args.max_slowdown)
    repeated = bool(failing)
    if repeated:
        print(f"{len(failing)} rows slower than the baseline; measuring again", file=sys.stderr)
        report = remeasure()
        again, compared = compare_rows(report["rows"], old, args.max_slowdown)
        failing = [f for f in again if f.key in {first.key for first in failing}]
    only_new, only_old = missing_rows(report["rows"], old)
    report["gate"] = {
        "baseline": str(args.compare),
        "max_slowdown": args.max_slowdown,
        "compared": compared,
        "repeated": repeated,
        "failing": [f.describe() for f in failing],
        "missing_in_baseline": only_new,
        "missing_in_measurement": only_old,
        "allowed": allowed,
    }
    return report


def baseline_refusal(args: argparse.Namespace, report: dict) -> str | None:
    """Why ``--save-baseline`` must not be written from ``report``, or None (also None when
    the flag was not given)."""
    from pipeline.bench.timing import LatencyRow

    if not args.save_baseline:
        return None
    if report.get("gate", {}).get("failing"):
        return (
            f"--save-baseline {args.save_baseline} not written: the gate failed, and a baseline "
            "of the slow figures would pass the next build; fix the slowdown, or save a "
            "baseline without --compare once the slowdown is meant"
        )
    rows = [LatencyRow.from_mapping(r) for r in report["rows"]]
    bad = [f"{r.setting} {r.model} batch {r.batch}" for r in rows if r.noisy or r.preempted]
    if bad:
        return (
            f"--save-baseline {args.save_baseline} not written: {len(bad)} of {len(rows)} rows "
            f"are noisy or preempted ({'; '.join(bad)}), and --compare refuses such a baseline; "
            "rerun on an idle machine, with more --runs, or with --threads 1 --clock cpu"
        )
    return None


def _print_sides(gate_: dict[str, Any]) -> None:
    """Warn about rows on one side only and about differences compared anyway."""
    only_new, only_old = gate_["missing_in_baseline"], gate_["missing_in_measurement"]
    if only_new:
        print(
            f"recede bench: warning: {len(only_new)} rows timed have no row in the baseline "
            f"{gate_['baseline']} (not gated): {'; '.join(only_new)}",
            file=sys.stderr,
        )
    if only_old:
        print(
            f"recede bench: warning: {len(only_old)} baseline rows were not timed (not "
            f"gated): {'; '.join(only_old)}",
            file=sys.stderr,
        )
    for difference in gate_["allowed"]:
        print(f"recede bench: warning: compared anyway: {difference}", file=sys.stderr)


def gate_verdict(report: dict, refusal: str | None) -> int:
    """Print the gate's outcome and any ``--save-baseline`` refusal; exit 1 on either."""
    gate_ = report.get("gate")
    if gate_ is not None:
        _print_sides(gate_)
    if gate_ is not None and gate_["failing"]:
        lines = "\n  ".join(gate_["failing"])
        print(
            f"recede bench: verification failed: {len(gate_['failing'])} of "
            f"{gate_['compared']} rows slower than {gate_['max_slowdown']}x the baseline "
            f"{gate_['baseline']} beyond the measured noise, in two measurements:\n  {lines}",
            file=sys.stderr,
        )
    elif gate_ is not None:
        print(
            f"latency gate: {gate_['compared']} rows compared with {gate_['baseline']}, none "
            f"slower than {gate_['max_slowdown']}x beyond the measured noise"
        )
    if refusal is not None:
        print(f"recede bench: verification failed: {refusal}", file=sys.stderr)
    failed = refusal is not None or (gate_ is not None and gate_["failing"])
    return EXIT_VERIFY if failed else EXIT_OK
