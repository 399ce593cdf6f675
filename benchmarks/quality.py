"""Accuracy against MACs kept: recede's budget-driven methods beside Torch-Pruning at its strongest.

Every method gets the same data, model, total epochs (``--epochs`` of training, then
``--finetune-epochs`` after the cut), learning rates and seed, and every cell is pruned to the
same budget, stated as the share of the dense model's MACs that is *kept* (``--macs-kept``):

- ``receding``, ``l1``, ``polarization``, ``ista`` (recede): trained with ``train.target = 1 -
  kept`` counted in MACs (``train.target_cost: macs``); the budget controller drives the
  strength from a deliberately weak start. Pruned at the automatic valley threshold; when the
  valley is refused or keeps more than the budget (2% slack), at the receded level
  ``train.receded_below`` (the set the budget counted); else the cut moves up the importance
  ranking until the MACs fit (the cell records ``cut``: ``auto``, ``receded`` or ``macs``).
- ``ucs``: trained without a penalty (plain BN), pruned per layer by smallest |gamma| at one
  shared fraction, raised until the MACs fit (the seed paper's reference code).
- ``tp-mag``: the same unpenalised model, pruned by Torch-Pruning 1.6's ``MagnitudePruner`` (L1
  magnitude, the ``l1`` method of its ``benchmarks/main.py``).
- ``tp-slim``: Network Slimming through Torch-Pruning: ``BNScalePruner`` (reg 1e-5) with its sparse
  training (``pruner.regularize(model)`` after every ``backward()``, ``update_regularizer()``
  every epoch), as ``--method slim`` of Torch-Pruning's CIFAR benchmark.
- ``tp-group``: the DepGraph paper's group regularisation: ``GroupNormPruner`` with
  ``GroupMagnitudeImportance(p=2)`` (reg 5e-4, alpha 4) and the same sparse training, as
  ``--method group_sl`` there.

Torch-Pruning's pruners follow its benchmark's ``progressive_pruning``: global ranking,
``iterative_steps=400``, ``pruning_ratio=1.0``, step until the MACs fit; ``max_pruning_ratio`` is
``--max-layer-ratio`` (0.95, recede's own ceiling, where Torch-Pruning's benchmark uses 1.0, which
can delete whole layers of these small nets). The classifier is ignored, as there.

Per cell: accuracy before fine-tuning, after BN recalibration and after fine-tuning; params; MACs
(and the kept fraction); ONNX Runtime CPU p50 at batch 1 and 32 of the folded model. The dense
reference is the unpenalised plain-BN model trained for the same total epochs. Unless
``--no-int8``, every cell is also quantized to INT8 by recede's export, verified on the whole test
set, and timed interleaved beside the dense model: dense fp32, pruned fp32, pruned INT8 and dense
INT8 on ONNX Runtime CPU, one thread, CPU clock (``benchmarks/quality_int8.py``).

Models: VGG-11 at width 0.5, CIFAR-style ResNet-20, and timm's MobileNetV2 at width 0.5
(``mobilenetv2``: inverted residuals with depthwise 3x3 convolutions, ReLU6, no squeeze-excite;
built untrained with ``in_chans=1``; at 28 px its five stride-2 stages end at 1x1, 1.75 M MACs).
Its receding cells diverge under the grid's learned BN shift (``RECEDING_DEFAULT``: loss NaN at
step 12 of the first epoch, at lr 0.05 and at 0.02), so the INT8 grid runs it with ``--variant
'no BN shift'`` (recede's own default, ``train.bn_shift: false``); the other methods are as usual.

``--ablation`` runs the receding method's factors one at a time from its configuration
(``RECEDING_VARIANTS``); ``--starts`` runs the cliff check (the same cell from starting strengths
decades apart).

    python benchmarks/quality.py --quick                      # digits, a few minutes on 2 cores
    python benchmarks/quality.py --data fashion_mnist --image-size 28 --train-limit 10000 \\
        --epochs 3 --finetune-epochs 1                        # the grid in benchmarks/RESULTS.md
    python benchmarks/quality.py --device cuda --data fashion_mnist --image-size 28  # full set
    python benchmarks/quality.py --data fashion_mnist --image-size 28 --train-limit 10000 \\
        --epochs 3 --finetune-epochs 1 --models mobilenetv2 --seeds 1 --threads 1 \\
        --methods receding l1 polarization ista --variant 'no BN shift' \\
        --out benchmarks/results/fmnist/int8/int8_mobilenetv2.json   # the INT8 grid's MobileNetV2
    python benchmarks/quality_report.py RESULTS_JSON          # RESULTS.md and plots from the JSON

Every flag, dependency, the data set, the output path and a results file to extend are checked
before any training (exit 2 names the flag or what is missing, and how to fix it;
``benchmarks/quality_args.py``). Each cell logs its result and the grid's elapsed time and ETA. Results are
written atomically after every cell, so an interrupted grid keeps what it finished and
``--resume`` skips the cells already there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_args import SetupError, build_parser, check_out, check_results  # noqa: E402
from quality_data import load_tensor_data, training_view  # noqa: E402
from quality_int8 import Int8Bench  # noqa: E402
from quality_peers import (  # noqa: E402
    TorchPruningSparsity,
    fit_macs,
    tp_progressive,
    tp_pruner,
    ucs_prune,
)

from pipeline.config import (  # noqa: E402
    DataConfig,
    ModelConfig,
    PenaltyConfig,
    PruneConfig,
    RunConfig,
    TrainConfig,
)
from pipeline.core.atomic import write_json_atomic  # noqa: E402
from pipeline.core.environment import environment  # noqa: E402
from pipeline.data.datasets import DataBundle, DataError  # noqa: E402
from pipeline.graph.costs import count_macs, count_params  # noqa: E402
from pipeline.layers.bn import bn_modules, convert_to_plain_bn_  # noqa: E402
from pipeline.models.zoo import build_model  # noqa: E402
from pipeline.prune.stage import prune_model  # noqa: E402
from pipeline.prune.threshold import NotBimodalError  # noqa: E402
from pipeline.train.loop import evaluate, resolve_device, train_  # noqa: E402
from pipeline.train.stage import build_and_train, example_batch, finetune_, reseed_  # noqa: E402

logger = logging.getLogger("quality")

CONTROLLED = ("receding", "l1", "polarization", "ista")
BASELINES = ("ucs", "tp-mag", "tp-slim", "tp-group")
SPARSE_TP = ("tp-slim", "tp-group")
# A deliberately weak starting strength: the controller must find the right one itself.
START_STRENGTH = {"receding": 1e-4, "l1": 1e-5, "polarization": 1e-5, "ista": 1e-5}
MODELS = {
    "vgg": ModelConfig(name="vgg", depth=11, width=0.5),
    "resnet20": ModelConfig(name="resnet20", width=1.0),
    "mobilenetv2": ModelConfig(name="timm:mobilenetv2_050"),
}
# The receding method's factors, one at a time from ``default`` (what recede ships). Keys of each
# variant: TrainConfig fields, ``bias`` (the penalty's shift b), ``plain_finetune`` (survivors
# fine-tuned as plain BN, so their scale is no longer capped at 1).
RECEDING_DEFAULT: dict[str, Any] = {"bn_shift": True, "bias": 0.0}
RECEDING_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no BN shift": {"bn_shift": False},
    "all channels (paper form)": {"penalise": "all"},
    "all channels, b=3": {"penalise": "all", "bias": 3.0},
    "shift b=3": {"bias": 3.0},
    "ramp 0.3": {"target_ramp": 0.3},
    "ramp 0.9": {"target_ramp": 0.9},
    "lambda rate 1 decade": {"strength_rate": 1.0},
    "plain-BN survivors": {"plain_finetune": True},
    "delay 0.2": {"target_delay": 0.2},
    "N(0,1) logits (reference init)": {"bn_init": "normal"},
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """What to run: every (model, method, kept, seed) cell shares the rest."""

    data: DataConfig
    models: tuple[str, ...]
    methods: tuple[str, ...]
    kept: tuple[float, ...]  # share of the dense MACs each cell keeps
    seeds: tuple[int, ...]
    epochs: int
    finetune_epochs: int
    lr: float = 0.05
    finetune_lr: float = 0.01
    device: str = "cpu"
    min_channels: int = 2
    max_layer_ratio: float = 0.95
    receding: tuple[tuple[str, Any], ...] = ()  # overrides of RECEDING_DEFAULT (a variant)
    int8: bool = True  # quantize, verify and time every cell (benchmarks/quality_int8.py)


class Clock:
    """Progress over the grid in epoch units (a training or fine-tune epoch is one), with ETA."""

    def __init__(self, total_units: float) -> None:
        self.total, self.done, self.start = max(total_units, 1e-9), 0.0, time.perf_counter()

    def advance(self, units: float, what: str) -> None:
        self.done += units
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * max(0.0, self.total - self.done) if self.done else 0.0
        logger.info(
            "[%3.0f%%] %s | elapsed %s, ETA %s",
            100 * min(1.0, self.done / self.total),
            what,
            _hms(elapsed),
            _hms(eta),
        )


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60:d}:{m % 60:02d}:{s:02d}"


# ---------------------------------------------------------------------------------------------
# Training and measurement shared by every cell.


def _train_config(grid: Grid, method: str, kept: float | None, seed: int, start=None):
    """The RunConfig of one cell; ``method`` ``none`` trains without a penalty (plain BN)."""
    overrides = {**RECEDING_DEFAULT, **dict(grid.receding)} if method == "receding" else {}
    overrides.pop("plain_finetune", None)
    bias = overrides.pop("bias", 0.0)
    strength = START_STRENGTH.get(method, 0.0) if start is None else start
    train = TrainConfig(
        epochs=grid.epochs,
        lr=grid.lr,
        seed=seed,
        device=grid.device,
        penalty=PenaltyConfig(method=method, strength=strength, bias=bias),
        target=None if kept is None else 1.0 - kept,
        target_cost="macs",
        **overrides,
    )
    prune = PruneConfig(
        threshold="auto",
        round_to=1,  # every method is cut to the same MACs; Torch-Pruning does not round
        min_channels=grid.min_channels,
        max_layer_ratio=grid.max_layer_ratio,
        finetune_epochs=grid.finetune_epochs,
        finetune_lr=grid.finetune_lr,
    )
    return train, prune


def _seed_cell(data: DataBundle, seed: int) -> None:
    """Every training in a cell starts from ``seed``: the global RNGs and the training loader's
    own shuffling generator, so a cell's result does not depend on the cells run before it in
    the same process (before 2026-12-04 16:30 the loader's generator ran on across cells)."""
    reseed_(data, seed)


def _train_plain(
    grid: Grid, data: DataBundle, model_name: str, seed: int, regulariser=None
) -> nn.Module:
    """A plain-BN model (PyTorch's own init) trained ``grid.epochs``, with an optional
    Torch-Pruning regulariser standing in for the polariser (``TorchPruningSparsity``)."""
    _seed_cell(data, seed)
    model = build_model(
        MODELS[model_name], num_classes=data.num_classes, in_channels=data.in_channels
    )
    train, _ = _train_config(grid, "none", None, seed)
    sparsity = regulariser(model) if regulariser else None
    train_(model, training_view(data), train, epochs=grid.epochs, lr=grid.lr, polariser=sparsity)
    return model.cpu().eval(), sparsity


def _finetune(model: nn.Module, data: DataBundle, grid: Grid, seed: int) -> dict[str, float]:
    """Accuracy raw, after BN recalibration and after ``grid.finetune_epochs``; in place.

    The cell's RNGs restart at ``seed`` after the raw accuracy; the per-epoch log lines evaluate
    :func:`training_view`'s test subset, the accuracies returned the whole test set."""
    train, prune = _train_config(grid, "none", None, seed)
    device = resolve_device(grid.device)
    acc = finetune_(
        model, training_view(data), train, prune, device=device, test=data.test, seed=seed
    )
    return {
        "acc_raw": acc.before_finetune,
        "acc_recal": acc.recalibrated,
        "acc_ft": acc.after_finetune,
    }


def _measure(model: nn.Module, data: DataBundle, batch: torch.Tensor, dense: dict) -> dict:
    model = model.cpu().eval()
    channels = sum(m.weight.numel() for m in bn_modules(model).values())
    macs = count_macs(model, data.input_shape)
    return {
        "params": count_params(model),
        "macs": macs,
        "macs_kept": macs / dense["macs_dense"],
        "pruned_channels": 1 - channels / dense["channels_dense"],
        **_ort_p50(model, batch, data.input_shape),
    }


def _ort_p50(model: nn.Module, batch: torch.Tensor, input_shape) -> dict[str, float]:
    """ONNX Runtime CPU p50 (ms) of the folded model at batch 1 and 32, one thread (grids run
    two processes side by side on two cores; read these as rough, not as the latency bench)."""
    from pipeline.bench.backends import bench_onnxruntime
    from pipeline.export.onnx import export_onnx
    from pipeline.fold.batchnorm import fold_bn

    folded, _ = fold_bn(model.cpu().eval(), batch, rtol=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(folded, batch[:2], Path(tmp) / "m.onnx")
        return {
            f"ort_p50_b{b}": bench_onnxruntime(
                path, input_shape, batch=b, threads=1, runs=30, warmup=10
            ).p50_ms
            for b in (1, 32)
        }


def _dense_facts(model: nn.Module, data: DataBundle, grid: Grid, batch: torch.Tensor) -> dict:
    device = resolve_device(grid.device)
    return {
        "acc_dense": evaluate(model.to(device), data.test, device),
        "params_dense": count_params(model.cpu()),
        "macs_dense": count_macs(model.cpu(), data.input_shape),
        "channels_dense": sum(m.weight.numel() for m in bn_modules(model).values()),
        "importances": _group_importances(model.cpu().eval(), batch),
    }


def _group_importances(model: nn.Module, batch: torch.Tensor) -> list[float]:
    from pipeline.graph.channel_graph import build_channel_graph
    from pipeline.prune.stage import group_importance

    values = group_importance(model, build_channel_graph(model, batch), "max").values()
    return [float(f"{v:.4g}") for v in values]


# ---------------------------------------------------------------------------------------------
# recede's controlled methods.


def controlled_cell(
    grid: Grid,
    data: DataBundle,
    model_name: str,
    method: str,
    kept: float,
    seed: int,
    start=None,
    int8: Int8Bench | None = None,
) -> dict:
    """Train under the budget controller, prune at the valley (or to the MACs), fine-tune;
    with ``int8``, quantize, verify and time the result beside the dense model."""
    train, prune = _train_config(grid, method, kept, seed, start)
    cfg = RunConfig(data=grid.data, model=MODELS[model_name], train=train, prune=prune)
    _seed_cell(data, seed)
    model, logs = build_and_train(cfg, training_view(data), None)
    batch = example_batch(data)
    dense = _dense_facts(model, data, grid, batch)
    cell = {**dense, "strength": logs[-1].strength, "receded": logs[-1].receded}
    pruned, cell["cut"] = _prune_to_budget(
        model, batch, prune, kept, dense, data.input_shape, train.receded_below
    )
    if dict(grid.receding).get("plain_finetune") and method == "receding":
        convert_to_plain_bn_(pruned)
    cell.update(_finetune(pruned, data, grid, seed))
    cell.update(_measure(pruned, data, batch, dense))
    if int8 is not None:
        cell.update(int8.cell((model_name, seed, f"{method} {kept:.0%}"), model, pruned, batch))
    return cell


def _prune_to_budget(model, batch, prune: PruneConfig, kept: float, dense: dict, shape, level):
    """recede's cut when it fits the MACs budget (2% slack): the valley, else the receded level
    (what the budget counted); else the importance cut that fits."""
    budget = int(kept * dense["macs_dense"] * 1.02)
    try:
        pruned = prune_model(model, batch, prune).model
        if count_macs(pruned, shape) <= budget:
            return pruned, "auto"
    except NotBimodalError as err:
        logger.warning("auto threshold refused (%s); cutting at the receded level", err)
    pruned = prune_model(model, batch, dataclasses.replace(prune, threshold=level)).model
    if count_macs(pruned, shape) <= budget:
        return pruned, "receded"
    values = sorted(dense["importances"])

    def at(position: float) -> nn.Module:
        value = values[min(len(values) - 1, int(position * (len(values) - 1)))]
        cut = max(value * (1 + 1e-6), 1e-38)  # importances can underflow to exactly 0
        return prune_model(model, batch, dataclasses.replace(prune, threshold=cut)).model

    return fit_macs(at, 0.0, 1.0, int(kept * dense["macs_dense"]), shape), "macs"


# ---------------------------------------------------------------------------------------------
# Baselines: UCS and Torch-Pruning's recipes.


def baseline_cells(
    grid: Grid,
    data: DataBundle,
    model_name: str,
    seed: int,
    clock: Clock,
    int8: Int8Bench | None = None,
):
    """Train the plain and the sparse models once; prune each by its recipe at every budget
    (with ``int8``, each cell quantized, verified and timed beside the plain dense model)."""
    batch = example_batch(data)
    methods = [m for m in grid.methods if m in BASELINES]
    dense_model, _ = _train_plain(grid, data, model_name, seed)
    dense = _dense_facts(dense_model, data, grid, batch)
    reference = copy.deepcopy(dense_model)
    ref = _finetune(reference, data, grid, seed)  # dense, same total epochs as every cell
    dense["acc_dense_same_epochs"] = ref["acc_ft"]
    clock.advance(grid.epochs + grid.finetune_epochs, f"{model_name} seed {seed}: dense trained")
    cells = []
    for method in methods:
        trained = dense_model
        if method in SPARSE_TP:
            trained = _sparse_tp_model(grid, data, model_name, seed, method, batch)
            clock.advance(grid.epochs, f"{model_name} seed {seed}: {method} sparse training")
        facts = (
            {**dense, **_dense_facts(trained, data, grid, batch)}
            if trained is not dense_model
            else dense
        )
        facts["acc_dense_same_epochs"] = ref["acc_ft"]
        for kept in grid.kept:
            cell = {**_key(model_name, method, kept, seed), **facts, "cut": "macs"}
            pruned = _baseline_prune(trained, batch, method, kept, grid, data, facts)
            cell.update(_finetune(pruned, data, grid, seed))
            cell.update(_measure(pruned, data, batch, facts))
            if int8 is not None:
                key = (model_name, seed, "the plain-BN dense model")
                cell.update(int8.cell(key, dense_model, pruned, batch))
            cell["epochs"] = grid.epochs
            cells.append(cell)
            clock.advance(grid.finetune_epochs, _line(cell))
    return cells


def _sparse_tp_model(grid, data, model_name, seed, method, batch) -> nn.Module:
    """A model trained with the Torch-Pruning recipe's own sparsity regulariser."""

    def regulariser(model: nn.Module) -> TorchPruningSparsity:
        pruner = tp_pruner(model, batch, method, grid.max_layer_ratio)
        return TorchPruningSparsity(pruner, model, len(data.train))

    model, _ = _train_plain(grid, data, model_name, seed, regulariser)
    return model


def _baseline_prune(trained, batch, method, kept, grid, data, dense) -> nn.Module:
    shape, budget = data.input_shape, int(kept * dense["macs_dense"])
    if method == "ucs":
        return fit_macs(
            lambda f: ucs_prune(trained, batch, f, grid.min_channels, grid.max_layer_ratio),
            0.0,
            grid.max_layer_ratio,
            budget,
            shape,
        )
    model = copy.deepcopy(trained).cpu().eval()
    return tp_progressive(
        tp_pruner(model, batch, method, grid.max_layer_ratio), model, budget, shape
    )


def _key(model: str, method: str, kept: float, seed: int) -> dict:
    return {"model": model, "method": method, "kept": kept, "seed": seed}


def _line(c: dict) -> str:
    return (
        f"{c['model']} {c['method']} kept {c['kept']:.2f} seed {c['seed']}: "
        f"raw {c['acc_raw']:.4f} recal {c['acc_recal']:.4f} ft {c['acc_ft']:.4f} "
        f"MACs kept {c['macs_kept']:.3f} ({c['cut']})"
    )


# ---------------------------------------------------------------------------------------------
# Grid, ablation and cliff check.


def _units(grid: Grid, cells: list[tuple]) -> float:
    """Epoch units the listed (model, method, kept, seed) cells will cost."""
    e, f = grid.epochs, grid.finetune_epochs
    units = sum(e + f for c in cells if c[1] in CONTROLLED)
    base = {(c[0], c[3]) for c in cells if c[1] in BASELINES}
    units += len(base) * (e + f) + sum(f for c in cells if c[1] in BASELINES)
    units += e * len({(c[0], c[1], c[3]) for c in cells if c[1] in SPARSE_TP})
    return units


def _open_results(out: Path, resume: bool, grid: Grid) -> dict:
    results = json.loads(out.read_text()) if resume and out.exists() else {"cells": []}
    results.setdefault("grids", []).append(dataclasses.asdict(grid))
    results.update(
        environment=environment(),
        started=results.get("started", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
    )
    return results


def run_grid(
    grid: Grid, data: DataBundle, out: Path, resume: bool, int8: Int8Bench | None = None
) -> dict:
    """Run every cell not yet in ``out``; rewrite ``out`` after each one."""
    results = _open_results(out, resume, grid)
    done = {(c["model"], c["method"], c["kept"], c["seed"]) for c in results["cells"]}
    todo = [
        (model, m, k, s)
        for model in grid.models
        for s in grid.seeds
        for m in grid.methods
        for k in grid.kept
        if (model, m, k, s) not in done
    ]
    clock = Clock(_units(grid, todo))
    logger.info("%d cells to run (%d already in %s)", len(todo), len(done), out)
    for model_name in grid.models:
        for seed in grid.seeds:
            mine = [c for c in todo if c[0] == model_name and c[3] == seed]
            if any(c[1] in BASELINES for c in mine):
                results["cells"] = [
                    c
                    for c in results["cells"]
                    if not (
                        c["model"] == model_name and c["seed"] == seed and c["method"] in BASELINES
                    )
                ]
                results["cells"] += baseline_cells(grid, data, model_name, seed, clock, int8)
                write_json_atomic(out, results)
            for _, method, kept, _ in (c for c in mine if c[1] in CONTROLLED):
                start = time.perf_counter()
                cell = {
                    **_key(model_name, method, kept, seed),
                    **controlled_cell(grid, data, model_name, method, kept, seed, int8=int8),
                }
                cell.update(seconds=round(time.perf_counter() - start, 1), epochs=grid.epochs)
                if method == "receding":
                    cell["variant"] = dict(grid.receding)
                results["cells"].append(cell)
                write_json_atomic(out, results)
                clock.advance(grid.epochs + grid.finetune_epochs, _line(cell))
    return results


def run_ablation(
    grid: Grid, data: DataBundle, out: Path, variants: list[str], int8: Int8Bench | None = None
) -> dict:
    """The receding method's factors one at a time, for every model, kept share and seed."""
    results = _open_results(out, True, grid)
    ablation = results.setdefault("ablation", [])
    have = {(c["variant"], c["model"], c["kept"], c["seed"]) for c in ablation}
    cells = [
        (v, m, k, s)
        for v in variants
        for m in grid.models
        for k in grid.kept
        for s in grid.seeds
        if (v, m, k, s) not in have
    ]
    clock = Clock(len(cells) * (grid.epochs + grid.finetune_epochs))
    for variant, model_name, kept, seed in cells:
        varied = dataclasses.replace(grid, receding=tuple(RECEDING_VARIANTS[variant].items()))
        cell = controlled_cell(varied, data, model_name, "receding", kept, seed, int8=int8)
        ablation.append({"variant": variant, **_key(model_name, "receding", kept, seed), **cell})
        write_json_atomic(out, results)
        clock.advance(grid.epochs + grid.finetune_epochs, f"{variant!r}: {_line(ablation[-1])}")
    return results


def run_sweep(
    grid: Grid, data: DataBundle, starts: list[float], out: Path, int8: Int8Bench | None = None
) -> dict:
    """The cliff check: the same controlled cells from starting strengths decades apart."""
    results = _open_results(out, True, grid)
    sweep = results.setdefault("sweep", [])
    methods = [m for m in grid.methods if m in CONTROLLED]
    clock = Clock(
        len(methods) * len(grid.kept) * len(starts) * (grid.epochs + grid.finetune_epochs)
    )
    for model_name in grid.models:
        for method in methods:
            for kept in grid.kept:
                for start in starts:
                    cell = controlled_cell(
                        grid, data, model_name, method, kept, grid.seeds[0], start, int8
                    )
                    sweep.append(
                        {**_key(model_name, method, kept, grid.seeds[0]), "start": start, **cell}
                    )
                    write_json_atomic(out, results)
                    clock.advance(
                        grid.epochs + grid.finetune_epochs, f"start {start:.0e}: {_line(sweep[-1])}"
                    )
    return results


# ---------------------------------------------------------------------------------------------
# Command line.


def check_ready(grid: Grid, out: Path, extends: str | None = None) -> DataBundle:
    """Everything a grid needs, checked before the first epoch; returns the data.

    Args:
        grid: What will run.
        out: ``--out``.
        extends: The flag that makes the run read ``out`` first (``--resume``, ``--ablation``,
            ``--starts``), or None.
    """
    check_out(out)
    if extends is not None:
        check_results(out, extends)
    needs = {"onnxruntime": "pip install 'recede[onnx]'"}
    if grid.int8:
        needs["onnxruntime.quantization"] = "pip install 'recede[onnx]', or pass --no-int8"
        needs["onnx"] = "pip install 'recede[onnx]', or pass --no-int8"
    if any(m.startswith("tp-") for m in grid.methods):
        needs["torch_pruning"] = "pip install 'recede[bench]' (Torch-Pruning 1.6.1)"
    if any(MODELS[m].name.startswith("timm:") for m in grid.models):
        needs["timm"] = "pip install 'recede[timm]', or leave out --models " + " ".join(
            m for m in grid.models if MODELS[m].name.startswith("timm:")
        )
    for module, fix in needs.items():
        try:
            __import__(module)
        except ImportError:
            raise SetupError(f"{module} is not installed but the grid needs it; {fix}") from None
    if grid.device == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda but no CUDA GPU is visible; use --device cpu")
    try:
        data = load_tensor_data(grid.data)
    except DataError as err:
        raise SetupError(f"--data {grid.data.name}: {err}") from None
    _check_models_run(grid, data)
    return data


def _check_models_run(grid: Grid, data: DataBundle) -> None:
    """One forward pass of each model on one example batch: an input too small for a model
    fails here, not after the first epoch."""
    batch = example_batch(data)[:2]
    for name in grid.models:
        model = build_model(
            MODELS[name], num_classes=data.num_classes, in_channels=data.in_channels
        )
        try:
            with torch.no_grad():
                model.eval()(batch)
        except RuntimeError as err:
            raise SetupError(
                f"--models {name} --image-size {grid.data.image_size}: the model cannot run "
                f"on {tuple(batch.shape[1:])} inputs ({str(err)[:160]}); pass a larger "
                "--image-size"
            ) from None


def grid_from_args(args: argparse.Namespace) -> Grid:
    """The grid the flags ask for: ``--quick`` (digits, VGG, 1 seed, 30% kept, 6 + 2 epochs)
    or the full grid; a flag given explicitly overrides either mode's default."""
    quick = args.quick

    def given(value, quick_default, full_default):
        return value if value is not None else quick_default if quick else full_default

    data = DataConfig(
        name=given(args.data, "digits", "fashion_mnist"),
        image_size=given(args.image_size, 16, 28),
        batch_size=given(args.batch_size, 64, 128),
        train_limit=args.train_limit,
    )
    return Grid(
        data,
        tuple(given(args.models, ["vgg"], ["vgg", "resnet20"])),
        tuple(
            args.methods
            or (("receding", "l1", "ucs", "tp-mag") if quick else CONTROLLED + BASELINES)
        ),
        tuple(given(args.macs_kept, [0.3], [0.3, 0.1])),
        tuple(range(given(args.seeds, 1, 2))),
        given(args.epochs, 6, 3),
        given(args.finetune_epochs, 2, 1),
        device=args.device,
        receding=tuple(RECEDING_VARIANTS[args.variant].items()),
        int8=args.int8,
    )


def _extends(args: argparse.Namespace) -> str | None:
    """The flag that makes this run read ``--out`` before writing it, if any."""
    if args.starts:
        return "--starts"
    if args.ablation is not None:
        return "--ablation"
    return "--resume" if args.resume else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.split("\n")[0], MODELS, CONTROLLED + BASELINES, RECEDING_VARIANTS)
    try:
        args = parser.parse_args(argv)  # every flag typed and range-checked (exit 2)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    try:
        grid = grid_from_args(args)
        data = check_ready(grid, args.out, _extends(args))
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    with Int8Bench(data, grid.data.name) if grid.int8 else contextlib.nullcontext() as int8:
        if args.starts:
            results = run_sweep(grid, data, args.starts, args.out, int8)
            logger.info("%d sweep cells in %s", len(results["sweep"]), args.out)
        elif args.ablation is not None:
            variants = args.ablation or list(RECEDING_VARIANTS)
            results = run_ablation(grid, data, args.out, variants, int8)
            logger.info("%d ablation cells in %s", len(results["ablation"]), args.out)
        else:
            results = run_grid(grid, data, args.out, args.resume, int8)
            logger.info("%d cells in %s", len(results["cells"]), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
