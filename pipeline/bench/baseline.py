"""Check a ``--compare`` baseline before any timing: its values, its noise, its machine, its models.

A baseline is a ``recede bench --json``/``--save-baseline`` report. The gate's verdict is only as
good as the baseline it divides by, so a baseline is refused (:class:`BaselineError`, CLI exit 2,
naming ``--compare`` and the file) before a single run is timed when:

- it is not a report: not UTF-8 JSON, no ``machine``, no ``rows``, a row missing a field or
  holding the wrong type (a p50 of 0, null or a string, a block of 0 ms, a batch of 0);
- a row is noisy (its block medians spread over :data:`~pipeline.bench.timing.NOISE_LIMIT`,
  recorded or recomputed) or preempted (:mod:`pipeline.bench.preemption`): a slowdown measured
  against the load is no slowdown of the model;
- it was measured on another machine (CPU model, usable cores, OS and architecture, GPU), unless
  ``--allow-other-machine``;
- a row it shares with this bench timed another model (the sha256 of the weights for torch rows,
  of the ONNX file otherwise, and the input shape), unless ``--allow-other-model``: a label such
  as ``pruned`` names a role, not a network;
- none of its rows is one this bench will time (other threads, clock, batches or models).

With an ``--allow-*`` flag the difference is compared anyway and said: printed and recorded in
the report's ``gate`` section.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bench.latency_gate import KEY_FIELDS, BaselineError, row_key
from pipeline.bench.timing import CLOCKS, NOISE_LIMIT, LatencyRow

if TYPE_CHECKING:
    from torch import nn

    from pipeline.bench.artefacts import Artefact

HOW = "re-create it with `recede bench MODEL --save-baseline PATH` on this machine"
_STRINGS = ("model", "backend", "device", "mode", "precision", "clock", "model_sha256")
_POSITIVE = ("p50_ms", "p90_ms", "p99_ms")
_CHOICES = {
    "backend": ("torch", "onnxruntime", "tensorrt"),  # sweep.BACKENDS
    "device": ("cpu", "cuda"),  # backends.DEVICES
    "clock": tuple(CLOCKS),
}


def machine() -> dict[str, Any]:
    """What a latency depends on besides the model: CPU model, usable cores, OS and
    architecture (not the kernel release: an update does not make another machine), GPU."""
    from pipeline.core.environment import cpu_model, gpu_description, usable_cores

    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "platform": f"{platform.system()} {platform.machine()}",
        "gpu": gpu_description(),
    }


def weights_sha256(model: nn.Module) -> str:
    """sha256 of a model's architecture (its ``repr``) and every tensor of its state dict
    (name, dtype, shape, bytes), in name order."""
    import torch

    digest = hashlib.sha256(repr(model).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {flat.dtype} {tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def identity(artefact: Artefact) -> dict[str, Any]:
    """What rows of ``artefact`` timed: ``torch`` (:func:`weights_sha256` of the model) and
    ``onnx`` (sha256 of the file), None where it has none, and its ``input_shape``."""
    from pipeline.core.integrity import file_sha256

    return {
        "torch": None if artefact.model is None else weights_sha256(artefact.model),
        "onnx": None if artefact.onnx is None else file_sha256(artefact.onnx),
        "input_shape": list(artefact.input_shape),
    }


def row_identity(row: Mapping[str, Any], identities: Mapping[str, Mapping[str, Any]]) -> dict:
    """``model_sha256`` and ``input_shape`` of a row of the model labelled ``row["model"]``:
    torch rows timed the weights, the other backends the ONNX file."""
    found = identities[row["model"]]
    return {
        "model_sha256": found["torch" if row["backend"] == "torch" else "onnx"],
        "input_shape": found["input_shape"],
    }


def stamp(report: dict[str, Any], identities: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``report`` with what makes it a baseline: ``machine``, each model's sha256 and each
    row's ``model_sha256`` and ``input_shape``."""
    for model in report["models"]:
        found = identities[model["label"]]
        model["sha256"] = {"torch": found["torch"], "onnx": found["onnx"]}
    report["rows"] = [{**r, **row_identity(r, identities)} for r in report["rows"]]
    report["machine"] = machine()
    return report


# --- reading and validating a baseline -----------------------------------------------------------


def _number(value: Any, *, positive: bool = True) -> bool:
    """A real number (not a bool), finite, and positive (or at least 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        finite = math.isfinite(value)  # an int past float's range overflows
    except OverflowError:
        return False
    return finite and (value > 0 if positive else value >= 0)


def _count(value: Any) -> bool:
    """A whole number in [1, 2**31) (a batch, a thread count, a dimension)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2**31


def row_problem(row: Any) -> str | None:
    """What is wrong with one baseline row, or None: every field a bench row has, typed."""
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    missing = [k for k in (*KEY_FIELDS, *_POSITIVE, "blocks_ms", "input_shape") if k not in row]
    missing += [] if "model_sha256" in row else ["model_sha256"]
    if missing:
        return f"missing {', '.join(missing)}"
    bad = [k for k in _STRINGS if not isinstance(row[k], str) or not row[k]]
    bad += [k for k, choices in _CHOICES.items() if k not in bad and row[k] not in choices]
    bad += [k for k in ("batch", "threads") if not _count(row[k])]
    bad += [k for k in _POSITIVE if not _number(row[k])]
    blocks, shape = row["blocks_ms"], row["input_shape"]
    if not isinstance(blocks, list) or not all(_number(b) for b in blocks):
        bad.append("blocks_ms")
    if not isinstance(shape, list) or not shape or not all(_count(d) for d in shape):
        bad.append("input_shape")
    for key in ("wall_p50_ms", "cpu_p50_ms", "noise"):
        value = row.get(key)
        if value is not None and not _number(value, positive=key != "noise"):
            bad.append(key)
    if bad:
        got = ", ".join(f"{k}={row[k]!r}"[:80] for k in bad)
        return (
            f"invalid {got} (expected non-empty strings, backend, device and clock among "
            f"{_CHOICES}, counts >= 1, and latencies, blocks and clock medians as finite "
            "numbers > 0)"
        )
    if not _number(row["p90_ms"] - row["p50_ms"], positive=False):
        return f"p90_ms {row['p90_ms']!r} below p50_ms {row['p50_ms']!r}"
    return None


def _unreliable(row: Mapping[str, Any]) -> str | None:
    """Why a valid row cannot be compared against (noisy or preempted), or None."""
    latency = LatencyRow.from_mapping(row)
    noise = max(latency.noise or 0.0, row.get("noise") or 0.0)
    if noise > NOISE_LIMIT:
        return f"{row_key(row)}: noise {noise:.0%}"
    if latency.preempted or row.get("preempted") is True:
        return (
            f"{row_key(row)}: preempted (wall {row.get('wall_p50_ms')} ms, cpu "
            f"{row.get('cpu_p50_ms')} ms)"
        )
    return None


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaselineError(f"--compare {path}: no such file; {HOW}") from None
    except (OSError, ValueError) as err:
        raise BaselineError(
            f"--compare {path}: expected a bench report (UTF-8 JSON), got {type(err).__name__}: "
            f"{str(err)[:200]}; {HOW}"
        ) from None


def _machine_problem(found: Any) -> str | None:
    if not isinstance(found, dict):
        return "no 'machine' object (a report written before recede recorded the machine)"
    wrong = [k for k in ("cpu", "platform") if not isinstance(found.get(k), str)]
    wrong += [] if _count(found.get("cores")) else ["cores"]
    wrong += [] if found.get("gpu") is None or isinstance(found.get("gpu"), str) else ["gpu"]
    return f"'machine' with invalid {', '.join(wrong)}" if wrong else None


def load_baseline(path: str | Path) -> dict[str, Any]:
    """A ``--compare`` baseline, checked (see the module docstring) before any timing.

    Raises:
        BaselineError: naming ``--compare``, the file, what is wrong and how to fix it.
    """
    path = Path(path)
    report = _read(path)
    rows = report.get("rows") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not rows:
        problem = "expected an object with a non-empty list 'rows' of latency rows"
        raise BaselineError(f"--compare {path}: {problem}; {HOW}")
    problem = _machine_problem(report.get("machine"))
    problems = [f"row {i}: {p}" for i, r in enumerate(rows) if (p := row_problem(r))]
    problems = ([problem] if problem else []) + problems
    if problems:
        listed = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if problems[5:] else ""
        )
        raise BaselineError(f"--compare {path}: not a bench baseline: {listed}; {HOW}")
    keys = [row_key(r) for r in rows]
    if twice := sorted({k for k in keys if keys.count(k) > 1}):
        raise BaselineError(f"--compare {path}: rows measured twice: {'; '.join(twice)}; {HOW}")
    if unreliable := [u for r in rows if (u := _unreliable(r))]:
        raise BaselineError(
            f"--compare {path}: {len(unreliable)} of {len(rows)} baseline rows measured the "
            f"machine's load, so no slowdown against them means anything: {'; '.join(unreliable)}"
            f"; expected noise at most {NOISE_LIMIT:.0%} and no preempted row; re-save the "
            "baseline on an idle machine, with more --runs, or with --threads 1 --clock cpu"
        )
    return report


# --- this bench against the baseline, before timing ----------------------------------------------


def _loose(row: Mapping[str, Any]) -> tuple:
    """A row's key without its precision (an ONNX graph's precision is known once opened)."""
    return tuple(row[k] for k in KEY_FIELDS if k != "precision")


def planned_rows(
    artefacts: Sequence[Artefact],
    settings: Sequence[Any],
    cfg: Any,
    identities: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The rows a sweep of ``artefacts`` under ``settings`` and ``cfg`` (a
    :class:`~pipeline.bench.sweep.SweepConfig`) will time: key fields and model identity."""
    from pipeline.bench.sweep import runnable

    rows = []
    for batch in cfg.batches:
        for s in settings:
            clock = cfg.clock if s.device == "cpu" else "wall"
            for a in (a for a in artefacts if runnable(a, s)):
                row = {"model": a.label, "backend": s.backend, "device": s.device, "mode": s.mode}
                row |= {"precision": s.precision, "batch": batch, "threads": cfg.threads}
                row |= {"clock": clock}
                rows.append({**row, **row_identity(row, identities)})
    return rows


def _spans(rows: Sequence[Mapping[str, Any]]) -> str:
    def values(key: str) -> str:
        return "/".join(str(v) for v in dict.fromkeys(r[key] for r in rows))

    return (
        f"models {values('model')}, backends {values('backend')}, batches {values('batch')}, "
        f"threads {values('threads')}, clock {values('clock')}"
    )


def check_against(
    baseline: Mapping[str, Any],
    planned: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    allow_machine: bool = False,
    allow_model: bool = False,
) -> list[str]:
    """Check a loaded baseline against the rows this bench will time (``planned``: key fields,
    ``model_sha256`` and ``input_shape``), before timing them.

    Returns:
        What differs but was allowed (``--allow-other-machine``/``--allow-other-model``).

    Raises:
        BaselineError: Another machine or model without its flag, or no row in common.
    """
    allowed = []
    here, there = machine(), baseline["machine"]
    differs = [
        f"{k} {there.get(k)!r} there, {v!r} here" for k, v in here.items() if there.get(k) != v
    ]
    if differs:
        if not allow_machine:
            raise BaselineError(
                f"--compare {path}: measured on another machine ({'; '.join(differs)}); a "
                f"latency is only comparable on the machine that measured it; {HOW}, or pass "
                "--allow-other-machine to compare anyway"
            )
        allowed.append(f"machine: {'; '.join(differs)}")
    rows = {_loose(r): r for r in baseline["rows"]}
    shared = [(p, rows[_loose(p)]) for p in planned if _loose(p) in rows]
    if not shared:
        raise BaselineError(
            f"--compare {path}: none of the {len(planned)} rows this bench times is in the "
            f"baseline's {len(rows)}: the baseline has {_spans(baseline['rows'])}; this bench "
            f"times {_spans(planned)}; pass the baseline's flags, or {HOW}"
        )
    other = [
        f"{row_key(p)}: sha256 {old['model_sha256'][:12]}… input {old['input_shape']} in the "
        f"baseline, {str(p['model_sha256'])[:12]}… input {p['input_shape']} now"
        for p, old in shared
        if (old["model_sha256"], old["input_shape"]) != (p["model_sha256"], p["input_shape"])
    ]
    if other and not allow_model:
        raise BaselineError(
            f"--compare {path}: {len(other)} of the {len(shared)} rows shared with the baseline "
            "timed another model under the same label: "
            f"{'; '.join(other[:4])}{'; …' if other[4:] else ''}; a label names a role, not a "
            f"network; {HOW} for this model, or pass --allow-other-model to compare anyway"
        )
    return allowed + [f"model: {o}" for o in other]
