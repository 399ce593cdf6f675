"""Accuracy against pruned fraction: recede's budget-driven methods beside their peers.

Every method gets the same data, model, training epochs, fine-tune epochs and learning rates:

- ``receding``, ``l1``, ``polarization``, ``ista``: trained with ``train.target`` set to the
  cell's target (the budget controller drives the strength from a deliberately weak start),
  then pruned at the automatic valley threshold (at the target ratio if the valley is refused,
  which the cell records);
- ``ucs``: trained without a penalty, pruned per layer by smallest scale at the target fraction
  (the seed paper's reference code);
- ``tp-bn`` and ``tp-mag``: the same unpenalised model, pruned by Torch-Pruning 1.6's public
  ``MetaPruner`` with its BN-scale and its magnitude importance, global ranking, at the target
  ratio (``pip install 'recede[bench]'``).

Per cell: accuracy before fine-tuning, after BN recalibration and after fine-tuning; params;
MACs; the achieved pruned fraction; ONNX Runtime CPU p50 at batch 1 and 32 of the folded model.

    python benchmarks/quality.py --quick                 # <= 10 min on 2 cores
    python benchmarks/quality.py                         # the grid in benchmarks/RESULTS.md
    python benchmarks/quality.py --device cuda           # the same grid on a GPU
    python benchmarks/quality_report.py RESULTS_JSON     # RESULTS.md and plots from the JSON

Results are appended cell by cell to the JSON (written atomically), so an interrupted grid keeps
what it finished and ``--resume`` skips the cells already there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.atomic import write_json_atomic  # noqa: E402
from pipeline.bench import count_macs, count_params, environment  # noqa: E402
from pipeline.bn import bn_modules, convert_to_plain_bn_  # noqa: E402
from pipeline.config import (  # noqa: E402
    DataConfig,
    ModelConfig,
    PenaltyConfig,
    PruneConfig,
    RunConfig,
    TrainConfig,
)
from pipeline.data import DataBundle, load_data  # noqa: E402
from pipeline.prune import prune_model  # noqa: E402
from pipeline.run import _fixed_batch, build_and_train  # noqa: E402
from pipeline.threshold import NotBimodalError  # noqa: E402
from pipeline.train import evaluate, recalibrate_bn_, resolve_device, seed_everything, train_  # noqa: E402

logger = logging.getLogger("quality")

CONTROLLED = ("receding", "l1", "polarization", "ista")
BASELINES = ("ucs", "tp-bn", "tp-mag")
# A deliberately weak starting strength: the controller must find the right one itself.
START_STRENGTH = {"receding": 1e-4, "l1": 1e-5, "polarization": 1e-5, "ista": 1e-5}
MODELS = {
    "vgg": ModelConfig(name="vgg", depth=11, width=0.5),
    "resnet20": ModelConfig(name="resnet20", width=1.0),
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """What to run: every (model, method, target, seed) cell shares the rest."""

    data: DataConfig
    models: tuple[str, ...]
    methods: tuple[str, ...]
    targets: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: int
    finetune_epochs: int
    lr: float = 0.05
    finetune_lr: float = 0.01
    device: str = "cpu"
    min_channels: int = 4
    max_layer_ratio: float = 0.95


def _train_config(
    grid: Grid, model: str, method: str, target: float | None, seed: int, start: float | None = None
) -> RunConfig:
    strength = START_STRENGTH.get(method, 0.0) if start is None else start
    penalty = PenaltyConfig(method=method, strength=strength, bias=0.0)
    train = TrainConfig(
        epochs=grid.epochs,
        lr=grid.lr,
        seed=seed,
        device=grid.device,
        penalty=penalty,
        target=target,
        bn_shift=method == "receding",
    )
    prune = PruneConfig(
        threshold="auto",
        min_channels=grid.min_channels,
        max_layer_ratio=grid.max_layer_ratio,
        finetune_epochs=grid.finetune_epochs,
        finetune_lr=grid.finetune_lr,
    )
    return RunConfig(data=grid.data, model=MODELS[model], train=train, prune=prune)


def _group_importances(model: nn.Module, batch: torch.Tensor) -> list[float]:
    from pipeline.channel_graph import build_channel_graph
    from pipeline.prune import group_importance

    values = group_importance(model, build_channel_graph(model, batch), "max").values()
    return [float(f"{v:.4g}") for v in values]


def _ort_p50(
    model: nn.Module, batch: torch.Tensor, input_shape: tuple[int, ...]
) -> dict[str, float]:
    """ONNX Runtime CPU p50 (ms) of the folded model at batch 1 and 32, two threads."""
    from pipeline.bench import bench_onnxruntime
    from pipeline.export.onnx import export_onnx
    from pipeline.fold import fold_bn

    folded, _ = fold_bn(model.cpu().eval(), batch, rtol=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(folded, batch[:2], Path(tmp) / "m.onnx")
        return {
            f"ort_p50_b{b}": bench_onnxruntime(
                path, input_shape, batch=b, threads=2, runs=50
            ).p50_ms
            for b in (1, 32)
        }


def _finish(
    cell: dict, pruned: nn.Module, data: DataBundle, cfg: RunConfig, batch: torch.Tensor
) -> dict:
    """Recalibrate, fine-tune and measure a pruned model; fills ``cell``."""
    device = resolve_device(cfg.train.device)
    cell["acc_raw"] = evaluate(pruned.to(device), data.test, device)
    recalibrate_bn_(pruned, data.train, device)
    cell["acc_recal"] = evaluate(pruned, data.test, device)
    train_(
        pruned,
        data,
        cfg.train,
        epochs=cfg.prune.finetune_epochs,
        lr=cfg.prune.finetune_lr,
        polariser=None,
        tag="finetune",
    )
    cell["acc_ft"] = evaluate(pruned, data.test, device)
    pruned = pruned.cpu().eval()
    channels = sum(m.weight.numel() for m in bn_modules(pruned).values())
    cell.update(
        params=count_params(pruned),
        macs=count_macs(pruned, data.input_shape),
        pruned_channels=1 - channels / cell["channels_dense"],
        **_ort_p50(pruned, batch, data.input_shape),
    )
    return cell


def _dense_facts(
    model: nn.Module, data: DataBundle, device: torch.device, batch: torch.Tensor
) -> dict:
    return {
        "acc_dense": evaluate(model.to(device), data.test, device),
        "params_dense": count_params(model.cpu()),
        "macs_dense": count_macs(model.cpu(), data.input_shape),
        "channels_dense": sum(m.weight.numel() for m in bn_modules(model).values()),
        "importances": _group_importances(model.cpu().eval(), batch),
    }


def _prune_at_target(
    model: nn.Module, batch: torch.Tensor, cfg: RunConfig, target: float
) -> tuple[Any, str]:
    try:
        return prune_model(model, batch, cfg.prune), "auto"
    except NotBimodalError as err:
        logger.warning("auto threshold refused (%s); pruning at ratio %.2f", err, target)
        ratio = dataclasses.replace(cfg.prune, threshold="ratio", ratio=target)
        return prune_model(model, batch, ratio), "ratio"


def controlled_cell(
    grid: Grid,
    data: DataBundle,
    model_name: str,
    method: str,
    target: float,
    seed: int,
    start: float | None = None,
) -> dict:
    """Train with the budget controller at ``target``, prune at the valley, fine-tune, measure."""
    cfg = _train_config(grid, model_name, method, target, seed, start)
    seed_everything(seed)
    model, logs = build_and_train(cfg, data, None)
    batch = _fixed_batch(data)
    cell = _dense_facts(model, data, resolve_device(grid.device), batch)
    last = logs[-1]
    cell.update(strength=last.strength, receded=last.receded)
    pruned, cell["threshold_mode"] = _prune_at_target(model.cpu().eval(), batch, cfg, target)
    cell["threshold"] = pruned.plan.threshold_value
    cell["pruned_groups"] = len(pruned.plan.dropped_groups) / len(pruned.importances)
    return _finish(cell, pruned.model, data, cfg, batch)


def _ucs(model: nn.Module, batch: torch.Tensor, target: float) -> nn.Module:
    """Per-layer uniform pruning by smallest scale: each BN layer loses ``target`` of its groups."""
    from pipeline.channel_graph import build_channel_graph
    from pipeline.prune import group_importance, make_plan, remove_groups

    graph = build_channel_graph(model, batch)
    importance = group_importance(model, graph, "max")
    home: dict[int, str] = {}
    for name, layer in graph.layers.items():
        for g in layer.out_groups:
            if layer.kind == "bn" and g in importance:
                home.setdefault(g, name)
    dropped: set[int] = set()
    for name in dict.fromkeys(home.values()):
        mine = sorted((g for g, h in home.items() if h == name), key=lambda g: importance[g])
        dropped |= set(mine[: math.floor(target * len(mine))])
    return remove_groups(model, graph, make_plan(graph, dropped), batch)[0]


def _torch_pruning(
    model: nn.Module, batch: torch.Tensor, target: float, kind: str, grid: Grid
) -> nn.Module:
    """Torch-Pruning 1.6 ``MetaPruner`` with BN-scale or magnitude importance, global ranking."""
    import torch_pruning as tp

    model = copy.deepcopy(model).cpu().eval()
    convert_to_plain_bn_(model)  # Torch-Pruning knows nn.BatchNorm2d, not recede's bounded BN
    importance = (
        tp.importance.BNScaleImportance()
        if kind == "tp-bn"
        else tp.importance.MagnitudeImportance(p=2)
    )
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(
        model,
        batch[:1],
        importance=importance,
        pruning_ratio=target,
        global_pruning=True,
        max_pruning_ratio=grid.max_layer_ratio,
        ignored_layers=head,
    )
    pruner.step()
    return model


def baseline_cells(grid: Grid, data: DataBundle, model_name: str, seed: int) -> list[dict]:
    """Train once without a penalty; prune it by every baseline at every target."""
    cfg = _train_config(grid, model_name, "none", None, seed)
    seed_everything(seed)
    model, _ = build_and_train(cfg, data, None)
    batch = _fixed_batch(data)
    dense = _dense_facts(model, data, resolve_device(grid.device), batch)
    cells = []
    for method in (m for m in grid.methods if m in BASELINES):
        for target in grid.targets:
            base = copy.deepcopy(model).cpu().eval()
            pruned = (
                _ucs(base, batch, target)
                if method == "ucs"
                else _torch_pruning(base, batch, target, method, grid)
            )
            cell = {
                **_key(model_name, method, target, seed),
                **dense,
                "threshold_mode": "ratio",
                "epochs": grid.epochs,
            }
            cell["pruned_groups"] = None
            cells.append(_finish(cell, pruned, data, cfg, batch))
            logger.info("%s", _line(cells[-1]))
    return cells


def _key(model: str, method: str, target: float, seed: int) -> dict:
    return {"model": model, "method": method, "target": target, "seed": seed}


def _line(c: dict) -> str:
    return (
        f"{c['model']} {c['method']} target {c['target']:.2f} seed {c['seed']}: dense {c['acc_dense']:.4f} "
        f"raw {c['acc_raw']:.4f} recal {c['acc_recal']:.4f} ft {c['acc_ft']:.4f} "
        f"pruned channels {c['pruned_channels']:.3f}"
    )


def run_grid(grid: Grid, out: Path, resume: bool) -> dict:
    """Run every cell not yet in ``out``; rewrite ``out`` after each one."""
    results = json.loads(out.read_text()) if resume and out.exists() else {"cells": []}
    results.setdefault("grids", []).append(dataclasses.asdict(grid))  # one per invocation
    results.update(
        environment=environment(),
        started=results.get("started", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
    )
    done = {(c["model"], c["method"], c["target"], c["seed"]) for c in results["cells"]}
    data = load_data(grid.data, seed=0)
    for model_name in grid.models:
        for seed in grid.seeds:
            todo = [
                (m, t)
                for m in grid.methods
                for t in grid.targets
                if (model_name, m, t, seed) not in done
            ]
            if any(m in BASELINES for m, _ in todo):
                results["cells"] = [
                    c
                    for c in results["cells"]
                    if not (
                        c["model"] == model_name and c["seed"] == seed and c["method"] in BASELINES
                    )
                ]
                results["cells"] += baseline_cells(grid, data, model_name, seed)
                write_json_atomic(out, results)
            for method, target in ((m, t) for m, t in todo if m in CONTROLLED):
                start = time.perf_counter()
                cell = {
                    **_key(model_name, method, target, seed),
                    **controlled_cell(grid, data, model_name, method, target, seed),
                }
                cell.update(seconds=round(time.perf_counter() - start, 1), epochs=grid.epochs)
                results["cells"].append(cell)
                logger.info("%s", _line(cell))
                write_json_atomic(out, results)
    return results


def run_sweep(grid: Grid, starts: list[float], out: Path) -> dict:
    """The cliff check: the same controlled cells from starting strengths decades apart."""
    results = json.loads(out.read_text()) if out.exists() else {"cells": [], "grids": []}
    data = load_data(grid.data, seed=0)
    sweep = results.setdefault("sweep", [])
    for model_name in grid.models:
        for method in (m for m in grid.methods if m in CONTROLLED):
            for target in grid.targets:
                for start in starts:
                    cell = controlled_cell(
                        grid, data, model_name, method, target, grid.seeds[0], start
                    )
                    sweep.append(
                        {**_key(model_name, method, target, grid.seeds[0]), "start": start, **cell}
                    )
                    logger.info("start %.0e: %s", start, _line(sweep[-1]))
                    write_json_atomic(out, results)
    return results


def grid_from_args(args: argparse.Namespace) -> Grid:
    if args.quick:
        data = DataConfig(name="digits", image_size=16, batch_size=64)
        return Grid(
            data,
            ("vgg",),
            args.methods or ("receding", "l1", "ucs", "tp-bn"),
            tuple(args.targets or (0.5, 0.9)),
            tuple(range(args.seeds or 1)),
            args.epochs or 8,
            args.finetune_epochs if args.finetune_epochs is not None else 2,
            device=args.device,
        )
    data = DataConfig(
        name=args.data,
        image_size=args.image_size,
        batch_size=args.batch_size,
        train_limit=args.train_limit,
    )
    return Grid(
        data,
        tuple(args.models),
        args.methods or CONTROLLED + BASELINES,
        tuple(args.targets or (0.5, 0.7, 0.9)),
        tuple(range(args.seeds or 2)),
        args.epochs or 15,
        args.finetune_epochs if args.finetune_epochs is not None else 3,
        device=args.device,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="digits, VGG, 1 seed, targets 0.5/0.9: <= 10 min on 2 cores",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--data", default="digits", choices=("digits", "fashion_mnist", "cifar10"))
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=None, help="first N training images")
    p.add_argument("--models", nargs="+", default=["vgg", "resnet20"], choices=sorted(MODELS))
    p.add_argument("--methods", nargs="+", choices=CONTROLLED + BASELINES)
    p.add_argument("--targets", nargs="+", type=float)
    p.add_argument("--seeds", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    p.add_argument("--resume", action="store_true", help="skip cells already in --out")
    p.add_argument(
        "--starts",
        nargs="+",
        type=float,
        help="instead of the grid: the cliff check, each controlled cell from these strengths",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid = grid_from_args(args)
    if args.starts:
        results = run_sweep(grid, args.starts, args.out)
        logger.info("%d sweep cells in %s", len(results["sweep"]), args.out)
        return 0
    results = run_grid(grid, args.out, args.resume)
    logger.info("%d cells in %s", len(results["cells"]), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
