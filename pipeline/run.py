"""The whole pipeline: train -> prune -> fine-tune -> fold -> export -> verify -> bench -> report.

Each step is a call into its stage module; this file only wires them and writes the run folder:
``config.yaml``, ``report.json``, ``report.md``, ``plan.json``, ``trained/`` and ``pruned/``
(state dict + ``shapes.json``), ``checkpoints/``, ``dense.onnx``/``pruned.onnx``, PNG plots and
the release ``manifest.json``, built in a staging folder and moved into place as a unit.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import distributed
from pipeline.atomic import (
    check_out_folder,
    partial_folder,
    staged_folder,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.channel_graph import build_channel_graph
from pipeline.checkpoint import SHAPES, save_pruned
from pipeline.config import RunConfig, dump_config, to_dict
from pipeline.data import DataBundle, load_data
from pipeline.models import build_model
from pipeline.plan import layer_widths
from pipeline.polarise import Polariser
from pipeline.prune import Pruned, prune_model
from pipeline.resume import check_resume_config
from pipeline.threshold import NotBimodalError
from pipeline.train import evaluate, recalibrate_bn_, resolve_device, seed_everything, train_

logger = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    """An exported artefact disagrees with PyTorch beyond tolerance (CLI exit code 1)."""


def model_spec(cfg: RunConfig, data: DataBundle) -> dict[str, Any]:
    """Everything needed to rebuild the model from its constructor."""
    return {
        "model": to_dict(cfg.model),
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "bounded_bn": cfg.train.penalty.bounded,
        "bn_shift": cfg.train.bn_shift,
        "input_shape": list(data.input_shape),
    }


def build_and_train(
    cfg: RunConfig, data: DataBundle, checkpoint_dir: Path | None, *, resume: bool = False
) -> tuple[nn.Module, list]:
    """Build the model, ready it for the penalty (``Polariser.prepare``) and train it.

    ``resume`` continues from ``checkpoint_dir/train_last.pt`` when it exists. Under
    ``torchrun`` the training is one rank of a DDP job (see ``pipeline.distributed``).

    For ISTA with ``rescale != 1`` the gamma/W rescaling is applied before training and undone
    after, so the saved model has the original parameterisation.
    """
    device = resolve_device(cfg.train.device)
    with distributed.process_group(device, cfg.data.batch_size):  # only under torchrun
        return _build_and_train(cfg, data, checkpoint_dir, resume)


def _build_and_train(
    cfg: RunConfig, data: DataBundle, checkpoint_dir: Path | None, resume: bool
) -> tuple[nn.Module, list]:
    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
    pen_cfg = cfg.train.penalty
    example = _fixed_batch(data, 2)
    steps = cfg.train.epochs * len(distributed.shard_loader(data.train, cfg.train.seed))
    polariser = Polariser.prepare(
        model, example, cfg.train, total_steps=max(1, steps), prune=cfg.prune
    )
    rescaled: list[str] = []
    if pen_cfg.method == "ista" and pen_cfg.rescale != 1.0:
        from pipeline.ista import rescale_gamma_

        graph = build_channel_graph(model, example)
        rescaled = rescale_gamma_(model, graph, example, pen_cfg.rescale)
    logs = train_(
        model,
        data,
        cfg.train,
        epochs=cfg.train.epochs,
        lr=cfg.train.lr,
        polariser=polariser,
        checkpoint_dir=checkpoint_dir,
        tag="train",
        resume=resume,
    )
    if rescaled:
        rescale_gamma_(model.cpu(), graph, example, 1.0 / pen_cfg.rescale, only=rescaled)
    return model.cpu().eval(), logs


def _fixed_batch(data: DataBundle, n: int = 32) -> torch.Tensor:
    return next(iter(data.test))[0][:n].cpu()


def _export_and_verify(
    models: dict[str, nn.Module], batch: torch.Tensor, out: Path, cfg: RunConfig
) -> dict[str, Any]:
    from pipeline.export.onnx import export_onnx, verify_onnx
    from pipeline.fold import fold_bn

    folded, paths, checks = {}, {}, {}
    for label, model in models.items():
        folded[label], fold = fold_bn(model.cpu().eval(), batch)
        paths[label] = export_onnx(
            folded[label], batch[:2], out / f"{label}.onnx", opset=cfg.export.opset
        )
        checks[label] = verify_onnx(paths[label], model, batch, atol=cfg.export.atol)
        logger.info(
            "%s: folded %d BNs (err %.2e); ONNX max abs err %.2e",
            label,
            len(fold.folded),
            fold.max_abs_err,
            checks[label].max_abs_err,
        )
    return {"folded": folded, "paths": paths, "checks": checks}


def _plots(
    out: Path, importances: np.ndarray, threshold: float | None, widths: dict, rows: list
) -> dict[str, Path]:
    from pipeline.report import plot_importance_histogram, plot_kept_channels, plot_latency

    plots = {
        "importance_hist": plot_importance_histogram(
            importances,
            out / "importance_hist.png",
            threshold=threshold,
            title="Channel-group importance before pruning",
        ),
        "kept_channels": plot_kept_channels(widths, out / "kept_channels.png"),
    }
    if rows:
        plots["latency"] = plot_latency(rows, out / "latency.png")
    return plots


def _prune_and_finetune(
    model: nn.Module, data: DataBundle, batch: torch.Tensor, cfg: RunConfig, out: Path
) -> tuple[Pruned, dict[str, float | None]]:
    """Prune, recalibrate BN, fine-tune; returns the result and the pruned model's accuracies."""
    cpu = torch.device("cpu")
    pruned = prune_model(model, batch, cfg.prune)
    write_text_atomic(out / "plan.json", pruned.plan.to_json())
    acc = {
        "accuracy_before_finetune": evaluate(pruned.model, data.test, cpu),
        "accuracy_recalibrated": None,
    }
    if cfg.prune.recalibrate:  # downstream BN statistics still describe the unpruned network
        recalibrate_bn_(pruned.model, data.train, cpu)
        acc["accuracy_recalibrated"] = evaluate(pruned.model, data.test, cpu)
    train_(
        pruned.model,
        data,
        cfg.train,
        epochs=cfg.prune.finetune_epochs,
        lr=cfg.prune.finetune_lr,
        polariser=None,
        tag="finetune",
    )
    acc["accuracy"] = evaluate(pruned.model.cpu().eval(), data.test, cpu)
    save_pruned(pruned.model, out / "pruned", spec=model_spec(cfg, data))
    return pruned, acc


def _groups_section(pruned: Pruned) -> dict[str, Any]:
    removal = pruned.removal
    return {
        "total": len(pruned.graph.groups),
        "prunable": len(pruned.importances),
        "dropped": len(pruned.plan.dropped_groups),
        "absorbed_exactly": removal.absorbed_groups,
        "approximate": removal.approximate_groups,
        "corrections": [list(c) for c in removal.corrections],
        "removal_rel_err": removal.max_rel_err,
        "zeroing_rel_err": removal.zeroing_err,
        "scale_bound": removal.scale_bound,
        "barriers": [b.__dict__ for b in pruned.graph.barriers],
    }


def _report(
    model: nn.Module,
    pruned: Pruned,
    acc: dict,
    check: Any,
    rows: list,
    data: DataBundle,
    cfg: RunConfig,
    seconds: float,
) -> dict[str, Any]:
    """The report.json content (keys documented in the README)."""
    from pipeline.bench import count_macs, count_params
    from pipeline.environment import environment

    shape = data.input_shape
    return {
        "dense": {
            "params": count_params(model),
            "macs": count_macs(model, shape),
            "accuracy": acc["dense"],
        },
        "pruned": {
            "params": count_params(pruned.model),
            "macs": count_macs(pruned.model, shape),
            "accuracy_before_finetune": acc["accuracy_before_finetune"],
            "accuracy_recalibrated": acc["accuracy_recalibrated"],
            "accuracy": acc["accuracy"],
            "channels_kept": pruned.plan.channels_kept,
            "channels_total": pruned.plan.channels_total,
        },
        "threshold": {"mode": pruned.plan.threshold_mode, "value": pruned.plan.threshold_value},
        "export": {
            "onnx_path": str(check.path),
            "max_abs_err": check.max_abs_err,
            "max_rel_err": check.max_rel_err,
            "opset": check.opset,
            "passed": check.passed,
            "bound": check.bound,
            "tolerance": check.tolerance,
        },
        "latency": [r.to_dict() for r in rows],
        "groups": _groups_section(pruned),
        "environment": {
            **environment(),
            "python": platform.python_version(),
            "device": str(resolve_device(cfg.train.device)),
        },
        "seconds": round(seconds, 1),
    }


def _trained_hint(trained: Path) -> str:
    return (
        f"the trained model is kept in {trained}: prune it with `recede prune --from {trained} "
        f"--threshold ratio --out DIR`, or rerun with --resume (no retraining)"
    )


def train_as_worker(cfg: RunConfig, data: DataBundle, final: Path, *, resume: bool) -> None:
    """A torchrun rank other than 0: train in step with rank 0 and write nothing.

    Resuming, it reads rank 0's checkpoint in ``final``'s partial folder.
    """
    seed_everything(cfg.train.seed)
    build_and_train(cfg, data, partial_folder(final) / "checkpoints", resume=resume)


def run_pipeline(
    cfg: RunConfig, out: str | Path, *, resume: bool = False, force: bool = False
) -> dict[str, Any] | None:
    """Run every stage and write the run folder as a unit; returns the report dict.

    Under ``torchrun`` every rank trains (``pipeline.distributed``); ranks other than 0 then
    return None, and rank 0 alone prunes, fine-tunes, exports and writes the folder.

    The folder is built in ``.<out>.partial`` beside ``out`` and moved into place at the end
    (see ``pipeline.atomic.staged_folder``); after a failure the partial folder stays, and
    ``resume`` continues its training from the last checkpoint.

    Raises:
        OutputError: ``out`` is a file, not writable, in use, or another command's folder
            (unless ``force``).
        VerificationError: the pruned ONNX model disagrees with PyTorch beyond ``export.atol``.
    """
    final = check_out_folder(out, kind="run", force=force, flag="--out")
    if resume:
        check_resume_config(cfg, final)
    data = load_data(cfg.data, seed=cfg.train.seed)
    if not distributed.is_main():
        train_as_worker(cfg, data, final, resume=resume)
        return None
    start = "resume" if resume else "empty"
    with staged_folder(final, kind="run", start=start, keep_on_error=True) as partial:
        report = _run_into(cfg, data, partial, final, resume)
    export = report["export"]
    for label, passed, err, bound in (
        ("pruned", export["passed"], export["max_abs_err"], export["bound"]),
        ("dense", export["dense_passed"], export["dense_max_abs_err"], export["dense_bound"]),
    ):
        if not passed:  # the folder is in place: it is the evidence
            raise VerificationError(
                f"{label} ONNX differs from PyTorch by {err:.2e} > {bound:.2e} allowed "
                f"({export['tolerance']}, export.atol {cfg.export.atol:.0e}); "
                f"see {final / 'report.json'}"
            )
    return report


def _run_into(
    cfg: RunConfig, data: DataBundle, out: Path, final: Path, resume: bool
) -> dict[str, Any]:
    """Every stage, writing into the staging folder ``out`` that becomes ``final``."""
    from pipeline.bench import latency_table
    from pipeline.export.manifest import write_manifest
    from pipeline.report import render_markdown

    start = time.perf_counter()
    write_text_atomic(out / "config.yaml", dump_config(cfg))
    seed_everything(cfg.train.seed)
    model, _ = build_and_train(cfg, data, out / "checkpoints", resume=resume)
    save_pruned(model, out / "trained", spec=model_spec(cfg, data))
    dense_acc, batch = evaluate(model, data.test, torch.device("cpu")), _fixed_batch(data)
    try:
        pruned, acc = _prune_and_finetune(model, data, batch, cfg, out)
    except NotBimodalError as err:
        raise NotBimodalError(f"{err}; {_trained_hint(out / 'trained')}") from None
    exported = _export_and_verify({"dense": model, "pruned": pruned.model}, batch, out, cfg)
    rows = latency_table(
        exported["folded"],
        exported["paths"],
        data.input_shape,
        batches=cfg.bench.batches,
        threads=cfg.bench.threads,
        runs=cfg.bench.runs,
        warmup=cfg.bench.warmup,
    )
    check = exported["checks"]["pruned"]
    report = _report(
        model,
        pruned,
        {**acc, "dense": dense_acc},
        check,
        rows,
        data,
        cfg,
        time.perf_counter() - start,
    )
    report["export"]["onnx_path"] = str(final / Path(check.path).name)
    dense_check = exported["checks"]["dense"]
    report["export"].update(
        dense_max_abs_err=dense_check.max_abs_err,
        dense_passed=dense_check.passed,
        dense_bound=dense_check.bound,
    )
    cut = pruned.plan.threshold_value if pruned.plan.threshold_mode != "ratio" else None
    plots = _plots(
        out,
        np.array(list(pruned.importances.values())),
        cut,
        layer_widths(pruned.graph, pruned.plan),
        rows,
    )
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_markdown(report))
    artefacts = {
        "config": out / "config.yaml",
        "dense_onnx": exported["paths"]["dense"],
        "pruned_onnx": exported["paths"]["pruned"],
        "pruned_weights": out / "pruned" / "model.pt",
        "pruned_shapes": out / "pruned" / SHAPES,
        "trained_weights": out / "trained" / "model.pt",
        "trained_shapes": out / "trained" / SHAPES,
        "plan": out / "plan.json",
        "report": out / "report.json",
        **plots,
    }
    write_manifest(
        out,
        artefacts,
        config=to_dict(cfg),
        metrics={k: report[k] for k in ("dense", "pruned", "export")},
    )
    return report
