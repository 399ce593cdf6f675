"""The whole pipeline: train -> prune -> fine-tune -> fold -> export -> verify -> bench -> report.

Each step is a call into its stage module (training and fine-tuning ``pipeline.train.stage``,
pruning, folding, export and verification ``pipeline.export.verify``, timing ``pipeline.bench.sweep``,
plots and Markdown ``pipeline.run.report``); this file only wires them, collects a typed
:class:`~pipeline.run.run_report.RunReport` and writes the run folder:
``config.yaml``, ``report.json``, ``report.md``, ``plan.json``, ``trained/`` and ``pruned/``
(state dict + ``shapes.json``), ``checkpoints/``, ``dense.onnx``/``pruned.onnx``, their INT8
graphs ``dense.int8.onnx``/``pruned.int8.onnx`` (``export.int8.enabled``), PNG plots and the
release ``manifest.json``, built in a staging folder and moved into place as a unit.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.config import RunConfig, to_dict
from pipeline.core import distributed
from pipeline.core.atomic import write_json_atomic, write_text_atomic
from pipeline.core.checks import Check, raise_unless_verified
from pipeline.core.output_folders import staged_folder
from pipeline.data.datasets import DataBundle
from pipeline.graph.latency_cost import LatencyModel
from pipeline.models.checkpoint import SHAPES, WEIGHTS, save_pruned
from pipeline.prune.latency_cut import LatencyFit
from pipeline.prune.plan import layer_widths
from pipeline.prune.stage import Pruned, prune_model
from pipeline.prune.threshold import NotBimodalError
from pipeline.run.latency_budget import (
    check_latency_deployment,
    latency_model_for_run,
    latency_summary,
    measure_final,
    prune_to_latency,
    training_budget,
)
from pipeline.run.latency_report import LatencyBudgetSummary
from pipeline.run.run_report import (
    DenseSummary,
    ExportSummary,
    GroupSummary,
    PrunedSummary,
    RunReport,
    ThresholdSummary,
)
from pipeline.train.loop import evaluate, resolve_device
from pipeline.train.stage import (
    PrunedAccuracy,
    budget_summary,
    example_batch,
    finetune_,
    model_spec,
    open_training,
    train_as_worker,
    train_into,
)

if TYPE_CHECKING:
    from pipeline.export.int8_export import Int8Export

logger = logging.getLogger(__name__)


def _prune_and_finetune(
    model: nn.Module,
    data: DataBundle,
    batch: torch.Tensor,
    cfg: RunConfig,
    out: Path,
    pruned: Pruned | None = None,
) -> tuple[Pruned, PrunedAccuracy]:
    """Prune (unless ``pruned`` is the cut already made), recalibrate BN, fine-tune; returns
    the result and the pruned model's accuracies."""
    if pruned is None:
        pruned = prune_model(model, batch, cfg.prune, receded_below=cfg.train.receded_below)
    write_text_atomic(out / "plan.json", pruned.plan.to_json())
    accuracy = finetune_(pruned.model, data, cfg.train, cfg.prune)
    save_pruned(pruned.model, out / "pruned", spec=model_spec(cfg, data))
    return pruned, accuracy


def _groups(pruned: Pruned) -> GroupSummary:
    removal, counts = pruned.removal, pruned.report()
    return GroupSummary(
        total=counts.total,
        prunable=counts.prunable,
        dropped=counts.dropped,
        absorbed_exactly=removal.absorbed_groups,
        approximate=removal.approximate_groups,
        corrections=[list(c) for c in removal.corrections],
        removal_rel_err=removal.max_rel_err,
        zeroing_rel_err=removal.zeroing_err,
        scale_bound=removal.scale_bound,
        barriers=counts.barriers,
        approximate_rel_err=removal.approximate_err,
        held_back=counts.held_back,
    )


def _summaries(
    model: nn.Module, dense_acc: float, pruned: Pruned, acc: PrunedAccuracy, shape: tuple
) -> tuple[DenseSummary, PrunedSummary]:
    from pipeline.graph.costs import count_macs, count_params

    dense = DenseSummary(count_params(model), count_macs(model, shape), dense_acc)
    after = PrunedSummary(
        params=count_params(pruned.model),
        macs=count_macs(pruned.model, shape),
        accuracy_before_finetune=acc.before_finetune,
        accuracy_recalibrated=acc.recalibrated,
        accuracy=acc.after_finetune,
        channels_kept=pruned.plan.channels_kept,
        channels_total=pruned.plan.channels_total,
    )
    return dense, after


def _environment(cfg: RunConfig) -> dict[str, Any]:
    from pipeline.core.environment import environment

    return {
        **environment(),
        "python": platform.python_version(),
        "device": str(resolve_device(cfg.train.device)),
    }


def _trained_hint(trained: Path) -> str:
    return (
        f"the trained model is kept in {trained}: prune it with `recede prune --from {trained} "
        f"--threshold ratio --out DIR`, or rerun with --resume (no retraining)"
    )


def run_pipeline(
    cfg: RunConfig, out: str | Path, *, resume: bool = False, force: bool = False
) -> RunReport | None:
    """Run every stage and write the run folder as a unit; returns the report.

    Under ``torchrun`` every rank trains (``pipeline.core.distributed``); ranks other than 0 then
    return None, and rank 0 alone prunes, fine-tunes, exports and writes the folder.

    The folder is built in ``.<out>.partial`` beside ``out`` and moved into place at the end
    (see ``pipeline.core.output_folders.staged_folder``); after a failure the partial folder stays, and
    ``resume`` continues its training from the last checkpoint.

    Raises:
        OutputError: ``out`` is a file, not writable, in use, or another command's folder
            (unless ``force``).
        VerificationError: a fold, removal or ONNX check failed, or could not have seen a wrong
            model and ``export.accept_insensitive`` is off (``pipeline.core.checks``).
    """
    check_latency_deployment(cfg)  # a latency budget's deployment, before any work
    final, data = open_training(cfg, out, kind="run", resume=resume, force=force)
    if not distributed.is_main():
        train_as_worker(cfg, data, final, resume=resume)
        return None
    latency = latency_model_for_run(cfg, data)  # measured or cached before anything is staged
    start = "resume" if resume else "empty"
    with staged_folder(final, kind="run", start=start, keep_on_error=True) as partial:
        report = _run_into(cfg, data, partial, final, resume, latency)
    raise_unless_verified(  # after the move: the folder in place is the evidence
        [*(Check.from_dict(c) for c in report.export.checks), *report.int8_checks()],
        accept_insensitive=cfg.export.accept_insensitive,
        where=f"export.atol {cfg.export.atol:.0e}; see {final / 'report.json'}",
    )
    _refuse_slower(report, cfg, final)
    return report


def _refuse_slower(report: RunReport, cfg: RunConfig, final: Path) -> None:
    """Exit 1 (``SlowerError``) when the run's own table shows the pruned model slower than
    the dense one beyond noise, unless ``export.allow_slower``; warn when allowed."""
    from pipeline.bench.speed_gate import refuse_slower

    where = f"the rows are flagged `slower` in {final / 'report.md'}"
    flagged = refuse_slower(report.latency, allow=cfg.export.allow_slower, where=where)
    if flagged:
        logger.warning("the pruned model is slower than the dense one on %s (allowed by "
                       "export.allow_slower)", "; ".join(flagged))  # fmt: skip


def _removal_check(pruned: Pruned) -> list[Check]:
    """The removal's own float64 check, where exactness was required."""
    return [pruned.removal.check] if pruned.removal.check else []


def _run_into(
    cfg: RunConfig,
    data: DataBundle,
    out: Path,
    final: Path,
    resume: bool,
    latency: tuple[LatencyModel, bool] | None = None,
) -> RunReport:
    """Every stage, writing into the staging folder ``out`` that becomes ``final``."""
    from pipeline.bench.sweep import latency_table
    from pipeline.export.verify import export_and_verify
    from pipeline.run.plots import plot_run
    from pipeline.run.report import render_markdown

    start = time.perf_counter()
    lm = latency[0] if latency else None
    model, logs = train_into(cfg, data, out, "trained", resume=resume, latency=lm)
    dense_acc, batch = evaluate(model, data.test, torch.device("cpu")), example_batch(data)
    fit = _latency_cut(model, batch, cfg, lm)  # None without a latency budget
    try:
        pruned, acc = _prune_and_finetune(model, data, batch, cfg, out, fit[0] if fit else None)
    except NotBimodalError as err:
        raise NotBimodalError(f"{err}; {_trained_hint(out / 'trained')}") from None
    exported = export_and_verify(
        {"dense": model, "pruned": pruned.model},
        batch,
        out,
        opset=cfg.export.opset,
        atol=cfg.export.atol,
    )
    int8 = _int8_exports(cfg, data, exported.paths, out) if cfg.export.int8.enabled else {}
    rows = latency_table(
        exported.folded,
        exported.paths,
        data.input_shape,
        batches=cfg.bench.batches,
        threads=cfg.bench.threads,
        runs=cfg.bench.runs,
        warmup=cfg.bench.warmup,
        clock=cfg.bench.clock,
        int8_paths={label: done.path for label, done in int8.items()},
    )
    check = exported.checks["pruned"]
    dense, after = _summaries(model, dense_acc, pruned, acc, data.input_shape)
    report = RunReport(
        dense=dense,
        pruned=after,
        threshold=ThresholdSummary(pruned.plan.threshold_mode, pruned.plan.threshold_value),
        export=ExportSummary.from_checks(
            check,
            exported.checks["dense"],
            Path(check.path).name,  # relative to the run folder
            [*_removal_check(pruned), *exported.all_checks()],
        ),
        latency=tuple(rows),
        groups=_groups(pruned),
        environment=_environment(cfg),
        seconds=time.perf_counter() - start,
        budget=budget_summary(cfg, logs) if lm is None else training_budget(cfg, lm, logs),
        latency_budget=_latency_outcome(cfg, out, exported.paths["pruned"], latency, fit),
        int8=_int8_record(int8),
    )
    cut = pruned.plan.threshold_value if pruned.plan.threshold_mode != "ratio" else None
    widths = layer_widths(pruned.graph, pruned.plan)
    bn_gated = {g.id for g in pruned.graph.removable_groups}  # not filter norms (scope=layer)
    scales = [v for g, v in pruned.importances.items() if g in bn_gated]
    plots = plot_run(out, np.array(scales), cut, widths, rows)
    write_json_atomic(out / "report.json", report.to_dict())
    links = {name: path.relative_to(out).as_posix() for name, path in plots.items()}
    write_text_atomic(out / "report.md", render_markdown(report.to_dict(), links))
    int8_paths = {f"{label}_int8_onnx": done.path for label, done in int8.items()}
    _write_release_manifest(cfg, out, {**exported.paths, **int8_paths}, plots, report)
    return report


def _latency_cut(
    model: nn.Module, batch: torch.Tensor, cfg: RunConfig, lm: LatencyModel | None
) -> tuple[Pruned, LatencyFit] | None:
    """Under a latency budget, the cut measured to the target (None otherwise)."""
    if lm is None:
        return None
    logger.info("latency budget: the cut is chosen by the latency model, not prune.threshold")
    return prune_to_latency(
        model, batch, cfg.prune, lm, cfg.train.target_latency_ms,
        receded_below=cfg.train.receded_below,
    )  # fmt: skip


def _latency_outcome(
    cfg: RunConfig,
    out: Path,
    onnx: Path,
    latency: tuple[LatencyModel, bool] | None,
    fit: tuple[Pruned, LatencyFit] | None,
) -> LatencyBudgetSummary | None:
    """The final pruned ONNX timed on the deployment, and the latency model copied into the
    run folder (``latency_model.json``, what ``recede inspect --latency-table`` shows)."""
    if latency is None or fit is None:
        return None
    write_json_atomic(out / "latency_model.json", latency[0].to_dict())
    measured = measure_final((onnx.with_name("dense.onnx"), onnx), cfg.train.latency)
    summary = latency_summary(latency[0], fit[1], measured, latency[1])
    (logger.info if summary.reached else logger.warning)("%s", summary.line())
    return summary


def _int8_exports(
    cfg: RunConfig, data: DataBundle, paths: dict[str, Path], out: Path
) -> dict[str, Int8Export]:
    """The dense and pruned INT8 graphs, each verified on the test split (its failure is
    reported, and raised after the folder is in place, like the fp32 checks)."""
    from pipeline.bench.int8_cost import fallback_latency
    from pipeline.data.calibration import from_datasets
    from pipeline.export.int8_export import export_int8, settings_from_config

    section = cfg.export.int8
    samples = from_datasets(
        data.train.dataset, data.test.dataset, calibration=section.calibration_samples,
        validation=section.validation_samples, heldout=section.verify_samples,
        seed=cfg.train.seed, name=cfg.data.name,
    )  # fmt: skip
    settings = settings_from_config(section)
    return {
        label: export_int8(
            paths[label],
            out / f"{label}.int8.onnx",
            samples,
            settings,
            what=f"{label}-int8",
            latency_cost=fallback_latency,
        )  # fmt: skip
        for label in ("dense", "pruned")
    }


def _int8_record(int8: dict[str, Int8Export]) -> dict[str, Any] | None:
    """report.json's ``int8``: the pruned graph's record, and the dense one's under ``dense``."""
    if not int8:
        return None
    records = {}
    for label, done in int8.items():
        record = done.record()
        record["check"] = {**record["check"], "path": done.path.name}  # relative to the run
        records[label] = record
    return {**records["pruned"], "dense": records["dense"]}


def _write_release_manifest(
    cfg: RunConfig, out: Path, onnx: dict[str, Path], plots: dict[str, Path], report: RunReport
) -> None:
    """The release ``manifest.json``: every artefact of the run folder, hashed."""
    from pipeline.export.manifest import write_manifest

    extra = {name: path for name, path in onnx.items() if name.endswith("_int8_onnx")}
    artefacts = {
        "config": out / "config.yaml",
        "dense_onnx": onnx["dense"],
        "pruned_onnx": onnx["pruned"],
        **extra,
        "pruned_weights": out / "pruned" / WEIGHTS,
        "pruned_shapes": out / "pruned" / SHAPES,
        "trained_weights": out / "trained" / WEIGHTS,
        "trained_shapes": out / "trained" / SHAPES,
        "plan": out / "plan.json",
        "report": out / "report.json",
        **plots,
    }
    from pipeline.data.datasets import preprocessing

    write_manifest(
        out, artefacts, config=to_dict(cfg), metrics=report.metrics(),
        preprocessing=preprocessing(cfg.data),
    )  # fmt: skip
