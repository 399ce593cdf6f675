"""torchvision's segmenters and detectors through ``recede prune`` and ``recede export``, beside
Torch-Pruning on the same model and ratio; writes a section of ``docs/torchvision_coverage.md``.

recede's side is the command line a user runs, in a child process with one thread
(``OMP_NUM_THREADS=1``):

    recede prune --model torchvision:NAME --num-classes K --input-shape 1,3,S,S \\
        --ratio 0.3 --scope layer --out DIR
    recede export DIR --out DIR.release

and the table records each exit code (0 ok, 1 verification failed, 2 refused: with the
message), MACs before and after, and every verification verdict of the release (the trunk's
``model.onnx`` and, for detectors, the whole ``detector.onnx``). Torch-Pruning's side
(``torch_pruning`` as installed) is ``MagnitudePruner`` (L2 magnitude, ``pruning_ratio=0.3``,
per layer) on the same module recede prunes (a segmenter, or a detector's trunk from
``pipeline.models.detection``), with the convolutions that write the model's outputs ignored
(and a one-stage head's last convolutions, :data:`HEAD_OUTPUTS`),
then ``torch.onnx.export`` and ONNX Runtime against PyTorch on every output.

    python benchmarks/dense_coverage.py                 # all 18 models
    python benchmarks/dense_coverage.py lraspp_mobilenet_v3_large fcos_resnet50_fpn
    python benchmarks/dense_coverage.py --budget 2700    # start no model after 45 minutes
    python benchmarks/dense_coverage.py --render         # only rewrite the section

Each model's result is written to ``benchmarks/results/dense_coverage/NAME.json`` as soon as it
is done (atomically, so two runs on different models may go side by side), and the section is
rendered after each one from every result on file, in :data:`ORDER`: a later run of some models
replaces their rows and keeps the others, and a model never run is listed as not run. Each
row says when it ran and the machine's load average then.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.outputs import flatten  # noqa: E402
from pipeline.models.detection import DETECTORS  # noqa: E402
from pipeline.models.segmentation import SEGMENTERS  # noqa: E402

RATIO = 0.3
SIZE = {"lraspp_mobilenet_v3_large": 256, "ssd300_vgg16": 300}  # the goal figure's size; SSD300's
# unpadded extra layers need 300 px; the others run small
DEFAULT_SIZE = 128
CLASSES = {"keypointrcnn_resnet50_fpn": 2}  # person + background, as torchvision trains it
START, END = "<!-- dense-coverage:start -->", "<!-- dense-coverage:end -->"
RESULTS = ROOT / "benchmarks" / "results" / "dense_coverage"


ORDER = (  # lightest first, so a budget-stopped run covers the most models
    "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fcn_resnet50",
    "deeplabv3_resnet50", "retinanet_resnet50_fpn", "fcos_resnet50_fpn", "fasterrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn_v2", "fcn_resnet101",
    "deeplabv3_resnet101", "ssd300_vgg16",
)  # fmt: skip


def _classes(name: str) -> int:
    return CLASSES.get(name, 91 if name in DETECTORS else 21)


def _cli(args: list[str], timeout: float) -> tuple[int, str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
            env=env, timeout=timeout, cwd=ROOT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, "", f"timed out after {timeout:.0f} s"
    return done.returncode, done.stdout, done.stderr


def _why(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("recede ")]
    return (lines[-1] if lines else (err.strip().splitlines() or [""])[-1])[:300].replace("|", "/")


def run_recede(name: str, size: int, work: Path, timeout: float) -> dict:
    """recede prune and export through the command line; exit codes, MACs and verdicts."""
    out, release, start = (
        work / name,
        work / f"{name}.release",
        time.perf_counter(),
    )  # --out outside the model folder
    shape = f"1,3,{size},{size}"
    rc, _, err = _cli(
        ["prune", "--model", f"torchvision:{name}", "--num-classes", str(_classes(name)),
         "--input-shape", shape, "--ratio", str(RATIO), "--scope", "layer", "--out", str(out)],
        timeout,
    )  # fmt: skip
    row = {"prune": rc, "why": "" if rc == 0 else _why(err)}
    if rc == 0:
        report = json.loads((out / "report.json").read_text())
        row["macs"] = (report["macs"]["before"], report["macs"]["after"])
        row["kept_whole"] = sorted(report.get("kept_whole", {}))
        rc, _, err = _cli(["export", str(out), "--out", str(release)], timeout)
        row["export"], row["why"] = rc, "" if rc == 0 else _why(err)
        manifest = release / "manifest.json"
        if manifest.is_file():
            export = json.loads(manifest.read_text())["export"]
            row["verdicts"] = {c["what"]: c["verdict"] for c in export["verification"]}
            row["withheld"] = [
                f"{w['path']} withheld ({w['verdict']}: {w['cause'][:160]})".replace("|", "/")
                for w in export.get("withheld", [])
            ]  # fmt: skip
    row["seconds"] = time.perf_counter() - start
    return row


def _output_convs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.nn.Module]:
    """The convolutions whose output is returned as is (Torch-Pruning must keep them)."""
    leaves = {id(t) for t in flatten(model(x)).values()}
    found = []

    def hook(module, _, output):  # noqa: ANN001
        if id(output) in leaves:
            found.append(module)

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


HEAD_OUTPUTS = re.compile(
    r"head\.(classification|regression)_head\.(cls_logits|bbox_reg|bbox_ctrness|module_list\.\d+(\.1)?)$"
)
"""A one-stage head's last convolutions (RetinaNet, FCOS, SSD, SSDlite): their channels are anchors
times classes (or box coordinates), which the head reshapes, so Torch-Pruning must keep them
(as its own detection examples do); without them it cut 819 class channels of RetinaNet to 573
and failed in ``view``."""


def _head_outputs(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and HEAD_OUTPUTS.search(n)
    ]


def run_torch_pruning(name: str, size: int, work: Path) -> dict:
    """Torch-Pruning's MagnitudePruner at the same ratio, then ONNX export and parity."""
    import onnxruntime as ort
    import torch_pruning as tp

    from pipeline.models.zoo import _torchvision

    start = time.perf_counter()
    try:
        model = _torchvision(name, _classes(name), 3).eval()
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        macs_before = tp.utils.count_ops_and_params(model, x)[0]
        ignored = _output_convs(model, x) + _head_outputs(model)
        pruner = tp.pruner.MagnitudePruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=RATIO,
            ignored_layers=ignored,
        )  # fmt: skip
        pruner.step()
        macs_after = tp.utils.count_ops_and_params(model, x)[0]
        with torch.no_grad():
            want = {n: t.numpy() for n, t in flatten(model(x)).items()}
        path = work / f"{name}.tp.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(copy.deepcopy(model), (x,), str(path), opset_version=17,
                              dynamo=False, output_names=list(want))  # fmt: skip
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    except Exception as err:  # noqa: BLE001 - a failed baseline is a table entry
        first = (str(err).strip().splitlines() or [""])[0][:200].replace("|", "/")
        return {"error": f"{type(err).__name__}: {first}", "seconds": time.perf_counter() - start}
    rel = max(
        float(abs(g - w).max()) / max(float(abs(w).max()), 1e-12)
        for g, w in zip(got, want.values(), strict=True)
    )
    return {
        "macs": (macs_before, macs_after),
        "onnx_rel_err": rel,
        "seconds": time.perf_counter() - start,
    }


def _macs(pair: tuple[float, float] | None) -> str:
    if not pair:
        return "—"
    before, after = pair
    return f"{before / 1e9:.2f}G → {after / 1e9:.2f}G ({100 * after / before:.0f}%)"


def _recede_cell(r: dict) -> str:
    if r["prune"] != 0:
        return f"prune exit {r['prune']}: {r['why']}"
    verdicts = ", ".join(f"{k} {v}" for k, v in r.get("verdicts", {}).items())
    if r.get("export") != 0:
        return f"export exit {r['export']}: {r['why']}" + (f" ({verdicts})" if verdicts else "")
    withheld = "; ".join(r.get("withheld", []))
    return f"ok: {verdicts}" + (f"; {withheld}" if withheld else "")


def _tp_cell(t: dict) -> str:
    if "error" in t:
        return f"failed: {t['error']}"
    return f"ok: ONNX vs PyTorch {t['onnx_rel_err']:.1e}"


def row(result: dict) -> str:
    name, size, r, t = result["model"], result["size"], result["recede"], result["torch_pruning"]
    whole = ", ".join(w.removeprefix("detector.") for w in r.get("kept_whole", [])) or "—"
    cells = [_recede_cell(r).replace("|", "/"), _tp_cell(t).replace("|", "/")]  # Markdown-safe
    return (
        f"| {name} | {size} | {_classes(name)} | {_macs(r.get('macs'))} | {cells[0]} | "
        f"{whole} | {r['seconds']:.0f} | {_macs(t.get('macs'))} | {cells[1]} | {t['seconds']:.0f} "
        f"| {result['when']}, load {result['load']:.1f} |"
    )


HEADER = [
    "| model | input | classes | recede MACs | recede: prune, export, verify | kept whole "
    "| recede s | Torch-Pruning MACs | Torch-Pruning: prune, ONNX | TP s | ran (UTC) |",
    "|---|---:|---:|---|---|---|---:|---|---|---:|---|",
]


def _not_run(name: str) -> str:
    return f"| {name} | {SIZE.get(name, DEFAULT_SIZE)} | {_classes(name)} | — | not run | — | — | — | not run | — | — |"


def save(result: dict) -> None:
    from pipeline.core.atomic import atomic_path

    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(RESULTS / f"{result['model']}.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n")


def on_file() -> dict[str, dict]:
    """Every model's latest result, by name."""
    found = {}
    for name in ORDER:
        path = RESULTS / f"{name}.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


def _section(results: dict[str, dict]) -> str:
    from importlib.metadata import version

    lines = [row(results[n]) if n in results else _not_run(n) for n in ORDER]
    done = [r for r in results.values() if r["recede"].get("export") == 0]
    tp_done = [r for r in results.values() if "error" not in r["torch_pruning"]]
    return "\n".join(
        [
            START,
            "## Segmentation and detection",
            "",
            f"Every torchvision segmenter and detector, untrained (`weights=None, "
            f"weights_backbone=None`), pruned at {RATIO:.0%} per layer (`--scope layer`) and",
            "exported through the command line (module docstring of `benchmarks/dense_coverage.py`);",
            "Torch-Pruning's `MagnitudePruner` on the same module at the same ratio, its output",
            "convolutions ignored, exported with `torch.onnx` and run by ONNX Runtime. A detector's",
            "module is its trunk (backbone, FPN, dense heads: `pipeline.models.detection`); recede's",
            "release also holds the whole detector (`detector.onnx`, `onnx-detector`) where torch's",
            "exporter can export it. MACs are each tool's own count (recede: convs and linears;",
            "Torch-Pruning: `count_ops_and_params`). Verdicts: `ok`, or `twin-ok` where the untrained",
            "model's own outputs barely move with its input and the check ran on its twin: BN",
            "statistics calibrated (`docs/how-it-works.md`); for the whole detector also the score",
            "thresholds at 0 and every layer scaled to unit output spread (`pipeline/export/detector.py`).",
            "A whole detector whose check does not pass is *withheld*: not shipped, named in the",
            "manifest with its check, while the verified trunk ships (`docs/cli.md`); that happened",
            "to the R-CNNs with RoiAlign-fed heads behind BN or with masks and keypoints (ONNX",
            "Runtime's RoiAlign is another implementation than torchvision's; pasted masks and heatmap",
            "argmaxes flip between near-ties on an untrained twin). Seconds are wall clock on a",
            "machine shared with other jobs (the last column: when each row ran and the 1-minute load",
            "average then).",
            "",
            "recede ranks BN-gated channels by their BN scale and, under `--scope layer`, channels no",
            "BN gates by filter norm (SSD300's VGG has no BN at all). A layer called once per level",
            "(the RPN head, RetinaNet's and FCOS's heads) is kept whole, and so are the FPN channels",
            "it reads: one set of weights serves every level, and one constant correction cannot be",
            "exact for each. Its MAC cut on those detectors is therefore smaller than Torch-Pruning's,",
            "which narrows shared heads too.",
            "",
            f"Command: `python benchmarks/dense_coverage.py [MODEL ...]` (one thread; torch "
            f"{torch.__version__}, Torch-Pruning {version('torch-pruning')} (its `__version__` says "
            f"1.6.0); this project's 2-core CPU; rows in "
            f"`benchmarks/results/dense_coverage/`). recede exported and verified "
            f"{len(done)} of {len(ORDER)}, Torch-Pruning pruned and exported {len(tp_done)} of "
            f"{len(ORDER)}.",
            "",
            *HEADER,
            *lines,
            END,
        ]
    )


def write_section(path: Path, section: str) -> None:
    text = path.read_text()
    if START in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: all 18, lightest first)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "torchvision_coverage.md")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per command, seconds")
    parser.add_argument(
        "--budget", type=float, default=None, help="start no model after this many seconds"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the section from the results on file"
    )
    args = parser.parse_args()
    assert set(ORDER) == {*SEGMENTERS, *DETECTORS}, "ORDER must list every model"
    unknown = sorted(set(args.models) - set(ORDER))
    if unknown:
        parser.error(f"unknown models {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    torch.set_num_threads(1)
    names = [] if args.render else [n for n in ORDER if n in args.models] or list(ORDER)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recede-dense-") as tmp:
        for name in names:
            if args.budget is not None and time.perf_counter() - start > args.budget:
                print(f"past --budget {args.budget:.0f} s: {name} and after not run", flush=True)
                break
            size, load = SIZE.get(name, DEFAULT_SIZE), os.getloadavg()[0]
            result = {
                "model": name, "size": size,
                "recede": run_recede(name, size, Path(tmp), args.timeout),
                "torch_pruning": run_torch_pruning(name, size, Path(tmp)),
                "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "load": max(load, os.getloadavg()[0]),
            }  # fmt: skip
            save(result)
            print(row(result), flush=True)
            write_section(args.out, _section(on_file()))
    write_section(args.out, _section(on_file()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
