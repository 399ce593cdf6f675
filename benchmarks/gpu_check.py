"""One prepared call for a lent GPU: gpu tests, kernel training steps, dense vs pruned latency.

    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py --out DIR      # on a CUDA machine (~8 min)
    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py --out DIR --dry-run   # wiring check, CPU

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (device, versions, date, every stage's
status and figures) and one ``DIR/<stage>.log`` per stage. Stages, in this order:

- ``tests``: ``pytest -m gpu`` over the test files that hold gpu-marked tests.
- ``latency``: the demo model (``configs/demo.yaml``: VGG-11 at width 0.5, 1x32x32 digits, 10
  classes) dense, against a pruned copy, timed by ``pipeline.bench.sweep.measure`` (the code
  ``recede bench`` runs) as CUDA-graph replays at batches 1, 2, 4, ..., 128 in fp32 and fp16.
- ``kernels``: ``benchmarks/kernel_bench.py``'s per-op table and training steps (eager, Triton, compiled).

Decisions:

- **Deadline.** Each stage runs in its own process session with its own budget, cut to what is
  left of the whole run's ``--deadline`` (480 s by default: the 8 minutes a lent GPU affords).
  A stage past its budget is killed with everything it started and recorded as ``timeout``,
  keeping the figures it had written; a stage that fails is recorded and the next one runs.
  The report is rewritten after every stage, so a run killed from outside keeps what finished.
- **Dependencies.** Only the standard library at the top; each stage imports what it needs
  (torch, numpy, triton, pytest, the repository). A test file whose imports are missing here
  (hypothesis, say) is left out of the pytest call and listed with the missing modules; without
  pytest the ``tests`` stage is ``skipped`` and says so. A missing package never fails a stage
  that does not need it.
- **The pruned copy** is not trained: random importances (seed 0) and the demo's own selection
  rules (``prune.min_channels: 4``, ``prune.max_layer_ratio: 0.5``) dropping half of the groups,
  so every layer loses half its channels. That keeps 0.252 of the dense MACs (9.59 M of 38.05 M;
  the trained demo kept 0.257), and latency depends on the kept widths, not on which channels.
  The removal goes through ``pipeline.prune.stage`` and its exactness check, as a real prune does.
- **Interleaving.** Dense and pruned are timed in alternating order over ``repeats`` rounds per
  batch, so a load change hits both; the pruned/dense ratio is the median of the per-round
  ratios, reported with its min and max.
- **Goals** (issue 23: pruned/dense p50 <= 1 at every batch, speed-up / MAC ratio >= 0.8 at the
  largest batch) are reported as met or missed; they never change the exit code. A dry run
  judges nothing.
- **Exit code.** 0: every stage ok or skipped with a reason; 1: a stage failed, errored or ran
  out of time; 2: bad input (``--out`` is a file; no CUDA without ``--dry-run``).
- ``--dry-run`` runs the same code on the CPU at tiny sizes (a narrower VGG-11, batches 1 and 2,
  torch eager instead of CUDA graphs, the vgg10 eager training step at 16 px, the pytest call
  with every gpu test skipping) and says so at the top of both files.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the checkout importable without install
    sys.path.insert(0, str(ROOT))

STAGES = ("tests", "latency", "kernels")
BUDGETS_S = {"tests": 120.0, "latency": 100.0, "kernels": 240.0}  # sum 460 < the 480 s deadline
RESERVE_S = 5.0  # kept back from every budget to write the report
# configs/demo.yaml (model, data: digits are 1x32x32, 10 classes; prune rules); the test
# tests/test_gpu_check.py checks these against the file, which needs PyYAML to read.
DEMO = {"depth": 11, "width": 0.5, "in_channels": 1, "num_classes": 10, "image_size": 32}
DEMO_RULES = {"min_channels": 4, "max_layer_ratio": 0.5}
DROP_RATIO = 0.5
GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
GOAL_RATIO, GOAL_MAC_SHARE = 1.0, 0.8
OK_STATES = ("ok", "skipped")


class BadInput(Exception):
    """A command-line value that cannot work (exit 2)."""


def importable(name: str) -> bool:
    """Whether module ``name`` can be found here (a finder that refuses counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _write_json(path: Path, obj: Any) -> None:
    from pipeline.core.atomic import write_json_atomic

    write_json_atomic(path, obj)


# --- stage: the gpu-marked tests ------------------------------------------------------------


def gpu_test_files(tests: Path) -> list[Path]:
    """Test files with gpu-marked tests: those saying ``mark.gpu``, and every test file below a
    ``conftest.py`` that does (its fixtures mark a parameter ``gpu``)."""
    marked_dirs = [c.parent for c in tests.rglob("conftest.py") if "mark.gpu" in c.read_text()]
    files = []
    for path in sorted(tests.rglob("test_*.py")):
        if "mark.gpu" in path.read_text() or any(d in path.parents for d in marked_dirs):
            files.append(path)
    return files


def imported_modules(path: Path) -> list[str]:
    """The modules ``path`` imports at module level (absolute imports, dotted names)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return sorted(names - {"__future__"})


_TRY_IMPORTS = """
import importlib, json, sys
missing = {}
for path, modules in json.loads(sys.argv[1]).items():
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            missing.setdefault(path, set()).add((err.name or module).split(".")[0])
print(json.dumps({path: sorted(names) for path, names in missing.items()}))
"""


def missing_imports(files: list[Path], env: dict[str, str], timeout_s: float) -> dict[str, list]:
    """Per file, the packages its module-level imports need, directly or through the
    repository, that cannot be found here (tried in a child process, so this one stays lean).
    """
    wanted = {str(f): imported_modules(f) for f in files}
    cmd = [sys.executable, "-c", _TRY_IMPORTS, json.dumps(wanted)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=child_env(env), capture_output=True, text=True, timeout=timeout_s
    )
    if proc.returncode != 0:
        raise RuntimeError(f"trying the test files' imports failed: {proc.stderr[-500:]}")
    return json.loads(proc.stdout)


def junit_counts(xml_path: Path) -> dict[str, int]:
    """passed/failed/errors/skipped from pytest's ``--junitxml`` report."""
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = {"tests": "tests", "failures": "failed", "errors": "errors", "skipped": "skipped"}
    counts = {v: sum(int(s.get(k, 0)) for s in suites) for k, v in keys.items()}
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return counts


def run_tests_stage(out: Path, dry_run: bool, budget_s: float) -> dict[str, Any]:
    """``pytest -m gpu`` over :func:`gpu_test_files` minus those that cannot import here."""
    if not importable("pytest"):
        return {"status": "skipped", "detail": "pytest is not importable here; install pytest"}
    # Built-in plugins only, as on a bare machine (an installed one that cannot load, e.g.
    # xdist without execnet, would stop pytest).
    env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **triton_env(dry_run)}
    start = time.monotonic()
    candidates = [p.relative_to(ROOT) for p in gpu_test_files(ROOT / "tests")]
    left_out = missing_imports(candidates, env, budget_s)
    files = [str(p) for p in candidates if str(p) not in left_out]
    xml = out / ".tests-junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs"]
    cmd += ["--continue-on-collection-errors", f"--junitxml={xml}", *files]
    result = run_child(cmd, out / "tests.log", budget_s - (time.monotonic() - start), env)
    result.update(command=" ".join(cmd[1:]), files=files, left_out=left_out)
    if xml.is_file():
        result["counts"] = junit_counts(xml)
        xml.unlink()
    if result["status"] == "exited":
        rc = result.pop("returncode")
        result["status"] = {0: "ok", 1: "failed", 5: "skipped"}.get(rc, "error")
        result["detail"] = f"pytest exit code {rc}" + (", no gpu test collected" * (rc == 5))
    return result


# --- stage: dense vs pruned latency ---------------------------------------------------------


def demo_pair(dry_run: bool) -> dict[str, Any]:
    """The demo's dense VGG and a pruned copy (see the module docstring), with their MACs."""
    import random

    import torch

    from pipeline.graph.channel_graph import build_channel_graph
    from pipeline.graph.costs import count_macs
    from pipeline.models.zoo import VGG
    from pipeline.prune.stage import SelectionRules, make_plan, remove_groups, select_groups

    width = 0.125 if dry_run else DEMO["width"]  # VGG-11 pools 5 times: 32 px is its minimum
    torch.manual_seed(0)
    dense = VGG(DEMO["depth"], DEMO["num_classes"], DEMO["in_channels"], width).eval()
    shape = (DEMO["in_channels"], DEMO["image_size"], DEMO["image_size"])
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    graph = build_channel_graph(dense, example)
    rng = random.Random(0)
    importance = {g.id: rng.random() for g in graph.removable_groups}
    rules = SelectionRules(DEMO_RULES["min_channels"], DEMO_RULES["max_layer_ratio"])
    dropped = select_groups(importance, graph, ratio=DROP_RATIO, rules=rules)
    plan = make_plan(graph, dropped, mode="ratio", value=DROP_RATIO)
    pruned, removal = remove_groups(dense, graph, plan, example)
    macs = {"dense": count_macs(dense, shape), "pruned": count_macs(pruned, shape)}
    return {
        "models": {"dense": dense, "pruned": pruned},
        "input_shape": shape,
        "macs": macs,
        "description": {
            "model": f"VGG-{DEMO['depth']} width {width}, input {'x'.join(map(str, shape))}",
            "pruning": f"random importances (seed 0), {DROP_RATIO:.0%} of groups dropped, "
            f"min_channels {rules.min_channels}, max_layer_ratio {rules.max_layer_ratio}",
            "channels_kept": plan.channels_kept,
            "channels_total": plan.channels_total,
            "removal_max_rel_err": removal.max_rel_err,
        },
    }


def summarise_pairs(rows: list[dict[str, Any]], mac_ratio: float) -> list[dict[str, Any]]:
    """Per precision and batch: the median pruned/dense p50 ratio over rounds, its min and max,
    the speed-up and the speed-up divided by the MAC ratio (dense MACs / pruned MACs)."""
    cells: dict[tuple[str, int], dict[int, dict[str, float]]] = {}
    for row in rows:
        key = (row["precision"], row["batch"])
        cells.setdefault(key, {}).setdefault(row["round"], {})[row["model"]] = row["p50_ms"]
    out = []
    for (precision, batch), rounds in cells.items():
        pairs = [r for r in rounds.values() if "dense" in r and "pruned" in r]
        if not pairs:
            continue
        ratios = [r["pruned"] / r["dense"] for r in pairs]
        ratio = statistics.median(ratios)
        out.append(
            {
                "precision": precision,
                "batch": batch,
                "rounds": len(pairs),
                "dense_p50_ms": statistics.median(r["dense"] for r in pairs),
                "pruned_p50_ms": statistics.median(r["pruned"] for r in pairs),
                "ratio_p50": ratio,
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "speedup": 1.0 / ratio,
                "speedup_over_mac_ratio": 1.0 / ratio / mac_ratio,
            }
        )
    return out


def judge_latency(pairs: list[dict[str, Any]], dry_run: bool) -> dict[str, Any]:
    """Issue 23's GPU goals per precision: ratio <= 1 everywhere; speed-up / MAC ratio >= 0.8 at
    the largest batch. ``None`` (not judged) in a dry run or without rows."""
    goals: dict[str, Any] = {}
    for precision in dict.fromkeys(p["precision"] for p in pairs):
        mine = [p for p in pairs if p["precision"] == precision]
        largest = max(mine, key=lambda p: p["batch"])
        goals[precision] = {
            "ratio_le_1_every_batch": None if dry_run else all(p["ratio_p50"] <= 1 for p in mine),
            f"speedup_over_mac_ratio_ge_{GOAL_MAC_SHARE}_at_batch_{largest['batch']}": None
            if dry_run
            else largest["speedup_over_mac_ratio"] >= GOAL_MAC_SHARE,
        }
    return goals


def latency_stage(progress: Path, dry_run: bool) -> dict[str, Any]:
    """Time the demo pair at every batch and precision, rounds interleaved; returns the result
    (also written to ``progress`` after every batch, for a stage cut off by its budget)."""
    import torch

    from pipeline.bench.artefacts import Artefact
    from pipeline.bench.sweep import SweepConfig, measure
    from pipeline.bench.timing import Setting

    pair = demo_pair(dry_run)
    mac_ratio = pair["macs"]["dense"] / pair["macs"]["pruned"]
    artefacts = [
        Artefact(label, "in memory", pair["input_shape"], model, None, macs=pair["macs"][label])
        for label, model in pair["models"].items()
    ]
    if dry_run:
        settings = [Setting("torch", "cpu", "eager", p, None) for p in ("fp32", "fp16")]
        cfg, rounds = SweepConfig((1, 2), threads=1, runs=50, warmup=1), 2
    else:
        settings = [Setting("torch", "cuda", "cuda-graph", p, False) for p in ("fp32", "fp16")]
        cfg, rounds = SweepConfig(GPU_BATCHES, torch.get_num_threads(), 200, 20), 3
    result: dict[str, Any] = {
        **pair["description"],
        "macs": pair["macs"],
        "mac_ratio": mac_ratio,
        "settings": [dataclasses.asdict(s) for s in settings],
        "runs": cfg.runs,
        "warmup": cfg.warmup,
        "rounds": rounds,
        "rows": [],
        "errors": [],
    }
    for s in settings:
        for batch in cfg.batches:
            for r in range(rounds):
                for a in artefacts if r % 2 == 0 else artefacts[::-1]:  # alternate the order
                    try:
                        row = measure(a, s, cfg, batch).to_dict()
                    except Exception as err:  # recorded; the other rows still run
                        result["errors"].append(f"{a.label} {s.precision} b{batch}: {err!r}")
                        continue
                    result["rows"].append({**row, "round": r})
            result["pairs"] = summarise_pairs(result["rows"], mac_ratio)
            _write_json(progress, result)
    result["goals"] = judge_latency(result["pairs"], dry_run)
    result["status"] = "failed" if result["errors"] else "ok"
    return result


# --- stage: kernel training steps -----------------------------------------------------------


def kernels_stage(progress: Path, dry_run: bool) -> dict[str, Any]:
    """``benchmarks/kernel_bench.py``: the per-op table (CUDA only) and the training steps, one case and
    variant at a time, so one that fails (recorded in ``errors``) or is cut off by the budget
    keeps the rows before it; ``speedup`` is against the same case's eager step."""
    from benchmarks.kernel_bench import CASES, VARIANTS, cuda_op_timings, step_timings

    result: dict[str, Any] = {"ops": [], "steps": [], "errors": []}
    if dry_run:
        opts = dict(device="cpu", variants=["eager"], batch_size=2, image_size=16, steps=2)
        opts.update(warmup=1, cases=["vgg10"])
        result["ops_skipped"] = "dry run: the per-op table needs CUDA"
    else:
        opts = dict(device="cuda", variants=list(VARIANTS), batch_size=None, image_size=None)
        opts.update(steps=50, warmup=10, cases=list(CASES))
        try:
            result["ops"] = [{**r, "speedup": r["torch"] / r["triton"]} for r in cuda_op_timings()]
        except Exception as err:  # recorded; the training steps still run
            result["errors"].append(f"per-op table: {err!r}")
    result["settings"] = dict(opts)
    _write_json(progress, result)
    for case in opts["cases"]:
        for variant in opts["variants"]:
            args = {**opts, "cases": [case], "variants": [variant], "compile_backend": "inductor"}
            try:
                result["steps"] += step_timings(argparse.Namespace(**args))
            except Exception as err:
                result["errors"].append(f"{case} {variant}: {err!r}")
            eager = {r["case"]: r["step"] for r in result["steps"] if r["variant"] == "eager"}
            for row in result["steps"]:
                row["speedup"] = eager[row["case"]] / row["step"] if row["case"] in eager else None
            _write_json(progress, result)
    result["status"] = "failed" if result["errors"] else "ok"
    return result


# --- running stages -------------------------------------------------------------------------


def triton_env(dry_run: bool) -> dict[str, str]:
    """Triton compiles on the GPU and interprets in a dry run, whatever the caller's shell set."""
    return {"TRITON_INTERPRET": "1" if dry_run else "0"}


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment with the checkout first on ``PYTHONPATH``, plus ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def run_child(cmd: list[str], log: Path, budget_s: float, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` in its own session with output to ``log``; kill the session at ``budget_s``.

    Returns ``{"status": "exited", "returncode": rc}`` or ``{"status": "timeout"}``, with the
    elapsed time and the log's last lines.
    """
    start = time.monotonic()
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(env), stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            result = {"status": "exited", "returncode": proc.wait(timeout=budget_s)}
        except subprocess.TimeoutExpired:
            result = {"status": "timeout", "detail": f"killed after its budget of {budget_s:.0f} s"}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child and whatever it started
            proc.wait()
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    return {**result, "elapsed_s": round(time.monotonic() - start, 1), "log_tail": tail}


def run_python_stage(name: str, out: Path, dry_run: bool, budget_s: float) -> dict[str, Any]:
    """Run stage ``name`` in a child process (``--stage``) and collect what it wrote."""
    progress = out / f".{name}.json"
    progress.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(out)]
    log = out / f"{name}.log"
    result = run_child(cmd + ["--dry-run"] * dry_run, log, budget_s, triton_env(dry_run))
    written = json.loads(progress.read_text()) if progress.is_file() else {}
    progress.unlink(missing_ok=True)
    if result["status"] == "exited":
        rc = result.pop("returncode")
        if rc != 0 or "status" not in written:
            last = result["log_tail"][-1] if result["log_tail"] else "no output"
            result.update(status="error", detail=f"exit code {rc}: {last}")
        else:
            result["status"] = written.pop("status")
    return {**written, **result}


def stage_main(name: str, out: Path, dry_run: bool) -> int:
    """Child side of :func:`run_python_stage`: run one stage, its result in ``.<name>.json``."""
    progress = out / f".{name}.json"
    stage = {"latency": latency_stage, "kernels": kernels_stage}[name]
    _write_json(progress, stage(progress, dry_run))
    return 0


def machine(dry_run: bool) -> dict[str, Any]:
    """Where the figures come from: device, CPU, package versions."""
    from pipeline.core.environment import (
        cpu_model,
        gpu_description,
        package_version,
        usable_cores,
        versions,
    )

    found = {**versions(), "numpy": package_version("numpy")}
    gpu = gpu_description()
    device = gpu or f"CPU only ({cpu_model()})"
    return {
        "device": f"{device} (dry run)" if dry_run else device,
        "gpu": gpu,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "versions": found,
    }


def run_all(out: Path, dry_run: bool, deadline_s: float, stages: list[str]) -> dict[str, Any]:
    """Run ``stages`` within ``deadline_s``; the report is rewritten after each one."""
    start = time.monotonic()
    report: dict[str, Any] = {
        "tool": "benchmarks/gpu_check.py",
        "dry_run": dry_run,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "deadline_s": deadline_s,
        **machine(dry_run),
        "stages": {},
    }
    for name in stages:
        left = deadline_s - (time.monotonic() - start) - RESERVE_S
        budget = min(BUDGETS_S[name], left)
        if budget < 1:
            result = {"status": "timeout", "detail": "not started: the run's deadline had passed"}
        elif name == "tests":
            result = run_tests_stage(out, dry_run, budget)
        else:
            result = run_python_stage(name, out, dry_run, budget)
        report["stages"][name] = {"budget_s": round(budget, 1), **result}
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        write_report(out, report)
    return report


# --- the Markdown -----------------------------------------------------------------------------


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats with 3 significant decimals, None as a dash."""

    def cell(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def _latency_md(lat: dict[str, Any]) -> list[str]:
    if not lat.get("pairs"):
        return []
    head = f"{lat['model']}; pruned: {lat['pruning']}; MACs {lat['macs']['dense']:,} -> "
    head += f"{lat['macs']['pruned']:,} (MAC ratio {lat['mac_ratio']:.2f}x). "
    head += f"p50 of {lat['runs']} runs after {lat['warmup']} warm-up, median of "
    head += f"{lat['rounds']} interleaved rounds."
    rows = [
        [p["precision"], p["batch"], p["dense_p50_ms"], p["pruned_p50_ms"], p["ratio_p50"]]
        + [f"{p['ratio_min']:.3f}–{p['ratio_max']:.3f}", p["speedup"], p["speedup_over_mac_ratio"]]
        for p in lat["pairs"]
    ]
    header = ["precision", "batch", "dense p50 ms", "pruned p50 ms", "pruned/dense"]
    header += ["ratio min–max", "speed-up", "speed-up ÷ MAC ratio"]
    goals = [f"- {prec}: {goal} — " + {True: "met", False: "missed", None: "not judged"}[v]
             for prec, g in lat.get("goals", {}).items() for goal, v in g.items()]  # fmt: skip
    return ["## Latency: dense vs pruned", head, table(header, rows), "Goals:\n" + "\n".join(goals)]


def _kernels_md(ker: dict[str, Any]) -> list[str]:
    parts = []
    if ker.get("ops"):
        rows = [[r["op"], r["torch"], r["triton"], r["speedup"]] for r in ker["ops"]]
        parts += ["## Kernel ops", table(["op", "torch ms", "triton ms", "speed-up"], rows)]
    if ker.get("steps"):
        rows = [
            [r["case"], r["variant"], r["step"], r["speedup"], r["penalty"], r["share"]]
            for r in ker["steps"]
        ]
        header = ["training step", "variant", "ms per step", "vs eager", "penalty ms", "share %"]
        parts += ["## Training steps (benchmarks/kernel_bench.py)", table(header, rows)]
    return parts


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: machine, stage table, latency and kernel tables."""
    title = "# GPU check" + (
        " — DRY RUN on the CPU: wiring only, no figure here" * report["dry_run"]
    )
    v = report["versions"]
    facts = [
        f"- **device**: {report['device']}",
        f"- **date**: {report['date']}",
        f"- **versions**: torch {v.get('torch')}, triton {v.get('triton')}, onnxruntime "
        f"{v.get('onnxruntime')}, numpy {v.get('numpy')}, python {v.get('python')}",
        f"- **command**: `{report['command']}` (deadline {report['deadline_s']:.0f} s, "
        f"took {report.get('elapsed_s', 0):.0f} s)",
    ]
    stages = report["stages"]
    rows = [
        [
            n,
            s["status"],
            f"{s.get('elapsed_s', 0):.1f}",
            f"{s['budget_s']:.0f}",
            s.get("detail", ""),
        ]
        for n, s in stages.items()
    ]
    parts = [title, "\n".join(facts), "## Stages"]
    parts.append(table(["stage", "status", "seconds", "budget s", "detail"], rows))
    if "counts" in stages.get("tests", {}):
        c = stages["tests"]["counts"]
        line = ", ".join(f"{c[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
        left = stages["tests"].get("left_out") or {}
        line += "".join(f"\n- left out {f}: needs {', '.join(m)}" for f, m in left.items())
        parts += ["## pytest -m gpu", line]
    parts += _latency_md(stages.get("latency", {})) + _kernels_md(stages.get("kernels", {}))
    for name in ("latency", "kernels"):
        errors = stages.get(name, {}).get("errors")
        parts += [f"## {name} errors\n\n" + "\n".join(f"- {e}" for e in errors)] if errors else []
    return "\n\n".join(parts) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    from pipeline.core.atomic import write_text_atomic

    _write_json(out / "gpu_check.json", report)
    write_text_atomic(out / "gpu_check.md", render_markdown(report))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the JSON, Markdown, logs"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: wiring only")
    parser.add_argument("--deadline", type=float, default=480.0, help="whole run, seconds")
    parser.add_argument(
        "--stages", type=lambda s: s.split(","), default=list(STAGES), help=",".join(STAGES)
    )
    parser.add_argument("--stage", choices=STAGES[1:], help=argparse.SUPPRESS)  # child side
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot work before any stage runs."""
    if args.out.exists() and not args.out.is_dir():
        raise BadInput(f"--out {args.out} is a file, expected a folder; pick another path")
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        raise BadInput(f"--stages: unknown {unknown}; expected a comma list from {STAGES}")
    if args.deadline <= RESERVE_S:
        raise BadInput(f"--deadline {args.deadline}: expected more than {RESERVE_S} seconds")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise BadInput(
            "no CUDA device: torch.cuda.is_available() is False; run on a CUDA machine, or "
            "pass --dry-run to check the wiring on the CPU"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage:
        return stage_main(args.stage, args.out, args.dry_run)
    try:
        check_args(args)
    except BadInput as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_all(args.out, args.dry_run, args.deadline, args.stages)
    states = {n: s["status"] for n, s in report["stages"].items()}
    print(f"gpu_check: {states}; wrote {args.out / 'gpu_check.md'} and gpu_check.json")
    return 0 if all(s in OK_STATES for s in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
