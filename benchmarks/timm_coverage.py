"""The timm mode of ``coverage_table.py``: recede and Torch-Pruning over timm's BN CNN families.

Runs ``check_timm`` from ``tests/prune/test_timm_coverage.py`` (the check the test suite asserts) on
one model per family, then the untrained model through the command line (``recede prune --scope
layer``, ``recede export``, ``tests/prune/cli_coverage.py``), and writes
``benchmarks/results/timm_coverage.md``.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from _checks import load_check  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "prune" / "test_timm_coverage.py"
OUT = ROOT / "benchmarks" / "results" / "timm_coverage.md"


def _load_check():
    sys.path.insert(0, str(ROOT / "tests"))  # the check imports tests/sensitivity.py
    return load_check(CHECK, "timm_coverage_check")


def _side(r, side) -> str:
    if side.error:
        return f"failed: {side.error.replace('|', '/')} | | |"
    ok = "verified" if side.verified() else "NOT verified"
    return f"{100 * r.removed(side):.0f}% | {side.onnx_rel_err:.1e} {ok} | {side.seconds:.0f} |"


def _row(family: str, r, check, cli, baseline: str | None = None) -> str:
    """One table row; ``cli``: the untrained model through the command line; ``baseline``:
    Torch-Pruning's three cells kept from an earlier run."""
    first, middle, _ = r.sensitivity
    barriers = "; ".join(sorted(set(r.barriers)))[:160].replace("|", "/") or "0"
    status = "pass" if r.passes() and cli.ok() else "FAIL"
    tp = f"{baseline} |" if baseline is not None else _side(r, r.torch_pruning)
    return (
        f"| {family} | {r.model} | {r.input_size} | {r.params_before / 1e6:.2f} | "
        f"{_side(r, r.recede)} {len(r.barriers)}: {barriers} | {first:.0e} / {middle:.0e} | "
        f"{tp} {cli.cell()} | {status} |"
    )


HEADER = [
    "| family | model | input | params (M) | recede: params removed | recede: ONNX vs PyTorch "
    "(rel) | recede s | barriers | one channel lost: first / middle | Torch-Pruning: params removed "
    "| TP: ONNX vs PyTorch (rel) | TP s | CLI untrained: prune / export | status |",
    "|---|---|---:|---:|---:|---|---:|---|---|---:|---|---:|---|---|",
]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _summary(lines: list[str], check) -> list[str]:
    """Counts read back from the rows, so rows kept by ``--resume`` count too."""
    rows = [_cells(line) for line in lines[len(HEADER) :]]
    passed = sum(r[-1] == "pass" for r in rows)
    cli = [r[-2] for r in rows if len(r) == len(_cells(HEADER[0]))]
    cli_ok = sum(check.CliResult.cell_ok(cell) for cell in cli)
    ok = [(r[1], "verified" in r[5] and "NOT" not in r[5]) for r in rows]
    tp_ok = [
        (model, rec)
        for (model, rec), r in zip(ok, rows, strict=True)
        if "verified" in r[10] and "NOT" not in r[10]
    ]
    missed = [model for model, rec in tp_ok if not rec]
    return [
        f"**{passed} of {len(rows)} families** prune at least "
        f"{100 * check.MIN_PARAMS_REMOVED:.0f}% of their parameters with ONNX verified to "
        f"{check.ONNX_TOL:g} of the output scale by a check that could fail (goal: >= 95%). "
        f"recede exports a verified ONNX for {sum(rec for _, rec in ok)}, Torch-Pruning for "
        f"{len(tp_ok)}; recede misses {len(missed)} of Torch-Pruning's"
        f"{': ' + ', '.join(missed) if missed else ''}. Untrained through the command line, "
        f"{cli_ok} of {len(cli)} exit 0 / 0 or are refused with exit 2 saying why.",
        "",
    ]


def _baselines(check) -> dict[str, str]:
    """Model -> Torch-Pruning's three cells in the committed table."""
    if not OUT.exists():
        return {}
    rows = [_cells(x) for x in OUT.read_text().splitlines() if x.startswith("| ")]
    return {
        c[1]: " | ".join(c[9:12])
        for c in rows
        if len(c) in (13, 14) and c[1] in check.FAMILIES.values()  # 13: before the CLI column
    }


def timm_main(
    names: list[str], *, fast: bool = False, resume: bool = False, reuse_baseline: bool = False
) -> int:
    """Run the timm table over ``names`` (default: every family, or the fast handful).

    ``resume`` keeps the rows already in the table and runs only the models it lacks;
    ``reuse_baseline`` keeps Torch-Pruning's cells from the table and reruns only recede.
    """
    check = _load_check()
    families = {m: f for f, m in check.FAMILIES.items()}
    picked = names or [m for m in families if not fast or m in check.FAST]
    baselines = _baselines(check) if reuse_baseline else {}
    lines = list(HEADER)
    if resume and OUT.exists():
        lines += [
            x
            for x in OUT.read_text().splitlines()[1:]
            if x.startswith("| ")
            and len(_cells(x)) > 2
            and _cells(x)[1] in families
            and x not in HEADER
        ]
    done = {_cells(x)[1] for x in lines[len(HEADER) :]}
    results = []
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in picked if m not in done]:
            baseline = baselines.get(name)
            size = check.INPUT_SIZE.get(name, check.DEFAULT_SIZE)
            cli = check.cli_untrained(f"timm:{name}", size, Path(tmp))
            r = check.check_timm(name, Path(tmp), with_torch_pruning=baseline is None)
            results.append((r, cli))
            lines.append(_row(families.get(name, name), r, check, cli, baseline))
            print(lines[-1], flush=True)
            reused = sum(r.model in baselines for r, _ in results)
            _write(picked, start, load_start, lines, check, reused)
    return 0 if all(r.passes() and cli.ok() for r, cli in results) else 1


def _write(picked, start, load_start, lines, check, reused: int = 0) -> None:
    """Rewrite the table after every model, so a run cut short still leaves its rows.

    ``reused``: rows whose Torch-Pruning cells came from the previous table.
    """
    total = time.perf_counter() - start
    command = "python " + " ".join(["benchmarks/coverage_table.py", *sys.argv[1:]])
    kept = (
        f"; Torch-Pruning's cells of {reused} models kept from the previous run of the same "
        "check (that side does not depend on recede's code)"
        if reused
        else ""
    )
    cpu = platform.processor() or platform.machine()
    header = [
        "# timm coverage: recede beside Torch-Pruning",
        "",
        (check.__doc__ or "").split("\n\n", 1)[1].strip(),
        "",
        "*params removed* counts every parameter (the 1000-class head included). *barriers* are",
        "the ops whose channels recede pins (and why), including submodules the tracing fallback",
        "kept whole. *one channel lost* is how far zeroing one live kept BN channel moves the pruned",
        "model's output (median over the live ones of ten channels of the BN at 1/6 and 1/2 of the",
        "network; live: its loss changes the output on the example at all): it must",
        f"exceed {check.ONNX_TOL:g}, or the ONNX check could not see such an error. *status* is the",
        "issue's goal for recede: >= 30% of parameters removed, verified, check sensitive, and the",
        "untrained model through the command line (*CLI untrained*: `recede prune --model",
        "timm:NAME --input-shape 1,3,S,S --scope layer`, then `recede export`, each in its own",
        "process; the two exit codes and every check's verdict) exiting 0 / 0 or refused with",
        "exit 2 saying why, never exit 1 or a traceback.",
        "",
        f"Command: `{command}` "
        f"({len(lines) - len(HEADER)} of {len(picked)} models{kept}; this run {total:.0f} s; "
        f"timm {check.timm.__version__}, torch "
        f"{torch.__version__}, {cpu}, 2-core CPU, no GPU, shared with other jobs: load "
        f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end; {time.strftime('%Y-%m-%d')}).",
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    done = {_cells(x)[1] for x in lines[len(HEADER) :]}
    missing = [m for m in picked if m not in done]
    if missing:  # a run cut short says what it did not reach
        header += [f"Not run (yet): {', '.join(missing)}.", ""]
    OUT.write_text("\n".join(header + _summary(lines, check) + lines) + "\n")
