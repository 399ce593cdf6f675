"""Repeat the demo's interleaved dense-vs-pruned bench and report how much the speed-up moves.

Each repeat is one ``recede bench runs/demo`` sweep (dense and pruned timed in alternating
blocks, the speed-up the median of per-block ratios). Over ``--repeats`` sweeps this prints, per
backend and batch, the median speed-up, its min and max, and the relative spread
``(max - min) / median``: the issue's goal is <= 10% between an idle run and one beside a
2-process CPU load (start ``stress-ng --cpu 2`` or two ``yes > /dev/null`` yourself for the
loaded run; this script does not load the machine).

    make demo                                           # writes runs/demo
    PYTHONPATH=. python benchmarks/latency_noise.py --repeats 5 --out bench/noise_idle.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from pipeline.bench.artefacts import ArtefactError, open_artefacts
from pipeline.bench.interleave import relative_spread
from pipeline.bench.sweep import SweepConfig, available_settings, bench_report, sweep
from pipeline.config import load_config


def run_threads(run: Path) -> int:
    """``bench.threads`` of the run's config.yaml: the setting its report was timed with."""
    config = run / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{config} is missing: is {run} a `recede run` folder?")
    return load_config(config).bench.threads


def speedups(
    run: Path, cfg: SweepConfig, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    """Per ``"<backend> <device> <model>[ int8] batch <n>"``: each non-reference row's speed-up
    (an INT8 row's over dense fp32) in each repeat, that speed-up
    divided by the MAC ratio (1.0: latency fell as much as the arithmetic did), and in how many
    repeats the dense or the pruned row was flagged ``noisy``."""
    artefacts = open_artefacts(run)
    settings = available_settings(devices=("cpu",))
    found: dict[str, list[float]] = defaultdict(list)
    per_mac: dict[str, list[float]] = defaultdict(list)
    noisy: dict[str, int] = defaultdict(int)
    for r in range(repeats):
        report = bench_report(sweep(artefacts, settings, cfg), artefacts, cfg)
        flagged = set()
        for row in report["rows"]:
            precision = "" if row["precision"] == "fp32" else f" {row['precision']}"
            key = f"{row['backend']} {row['device']} {row['model']}{precision} batch {row['batch']}"
            if "noisy" in row["flags"]:
                flagged.add(key)
            if row["model"] != artefacts[0].label and row["speedup"] is not None:
                found[key].append(row["speedup"])
                if row["speedup_per_mac_ratio"] is not None:
                    per_mac[key].append(row["speedup_per_mac_ratio"])
        for key in flagged:
            noisy[key] += 1
        print(f"repeat {r + 1}/{repeats} done", file=sys.stderr)
    return dict(found), dict(per_mac), {key: noisy[key] for key in found}


def summary(found: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, min, max and relative spread (max - min over median) of each row's speed-ups."""
    return {
        key: {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "spread": (max(values) - min(values)) / statistics.median(values),
            "iqr_spread": relative_spread(values),
            "repeats": len(values),
        }
        for key, values in found.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a `recede run` folder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per row")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--threads", type=int, help="threads per session (default: the run's bench.threads)"
    )
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="see `recede bench --clock`"
    )
    parser.add_argument("--out", help="also write the per-repeat speed-ups and summary as JSON")
    args = parser.parse_args(argv)
    try:
        if args.threads is None:
            args.threads = run_threads(Path(args.run))
        cfg = SweepConfig(tuple(args.batches), args.threads, args.runs, args.warmup, args.clock)
        if args.repeats < 1:
            raise ValueError(f"--repeats: expected >= 1, got {args.repeats}")
        found, per_mac, noisy = speedups(Path(args.run), cfg, args.repeats)
    except (ArtefactError, ValueError) as err:
        print(f"latency_noise: {err}; make the run first with `make demo`", file=sys.stderr)
        return 2
    table = summary(found)
    per_mac_table = summary(per_mac)
    print(
        "| Row | Speed-up median | min | max | spread (max-min)/median "
        "| speed-up / MAC ratio: median (min-max) | repeats | flagged noisy |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, s in table.items():
        m = per_mac_table.get(key)
        mac_cell = "—" if m is None else f"{m['median']:.2f} ({m['min']:.2f}–{m['max']:.2f})"
        print(
            f"| {key} | {s['median']:.2f}× | {s['min']:.2f}× | {s['max']:.2f}× | "
            f"{s['spread']:.1%} | {mac_cell} | {s['repeats']} | {noisy[key]} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "run": args.run,
            "sweep": vars(args),
            "speedups": found,
            "speedup_per_mac_ratio": per_mac,
            "noisy_repeats": noisy,
            "summary": table,
            "per_mac_summary": per_mac_table,
        }
        Path(args.out).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
