"""INT8 and measured latency for the quality grid: each fine-tuned model quantized, verified and
timed beside the dense model it came from.

For every cell (``benchmarks/quality.py``, unless ``--no-int8``), after fine-tuning: the pruned
model is folded and exported to fp32 ONNX, then quantized by recede's own INT8 export
(:func:`pipeline.export.int8_export.export_int8`, its defaults: QDQ, minmax calibration, signed
INT8, per-channel weights, the sensitive-layer fallback, a 0.5-point bound) with

- 512 calibration and 256 validation samples drawn from the cell's training images (the first
  ``--train-limit`` images), seeded by the cell's seed (:func:`pipeline.data.calibration.from_datasets`);
- the **whole test set** held out: the verdict's fp32 and INT8 accuracies are over every test
  image, as ``acc_ft`` is.

Then four graphs are timed **interleaved** (:func:`pipeline.bench.sweep.measure_interleaved`) on
ONNX Runtime's CPU provider, one thread, on the thread's CPU clock, at batch 1 and 32: the dense
fp32 graph of the (model, seed), the pruned fp32 graph, the pruned INT8 graph and the dense INT8
graph. They share their timing blocks, so the dense fp32 -> pruned INT8 speed-up is the median
of per-block ratios, with the quartiles of those ratios as its spread.

The dense graphs of a (model, seed) are made once, from the trained (penalised, unpruned) model
of its first cell, and kept in a temporary folder for the grid's lifetime (not in the results):
latency depends on the layer shapes, which every cell of that model shares. The dense INT8
graph goes through the same export and check; its record says which cell it came from.

Keys a cell gains (all optional: results written before them still load and render):
``acc_fp32_onnx``, ``acc_int8`` (fractions, as ``acc_ft``), ``int8_drop`` (accuracy points, the
unit of the bound), ``int8_agreement`` (fraction of test images on which INT8 and fp32 decide
alike), ``int8_verdict`` (``ok``, ``failed`` or ``insensitive``), ``int8_excluded`` (nodes kept in
float), ``int8`` (the export's full record: calibration, fallback trail and ranking, the check),
``dense_int8`` (the dense INT8 graph's verdict and source) and ``latency`` (per batch and graph:
p50 in ms and the speed-up over dense fp32 with its spread).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.data.datasets import DataBundle

logger = logging.getLogger("quality.int8")

CALIBRATION = 512
VALIDATION = 256
BATCHES = (1, 32)
RUNS = 50  # pipeline.bench.timing.MIN_RUNS: figures to report, not a quick look
WARMUP = 10
GRAPHS = ("dense_fp32", "pruned_fp32", "pruned_int8", "dense_int8")


@dataclass(frozen=True)
class DenseGraphs:
    """A (model, seed)'s dense fp32 and INT8 graphs, and the dense INT8 verdict."""

    fp32: Path
    int8: Path
    record: dict[str, Any]


class Int8Bench:
    """What every cell of a grid shares for INT8: a temporary folder (removed by :meth:`close`)
    holding each (model, seed)'s dense graphs, and each seed's calibration samples."""

    def __init__(self, data: DataBundle, data_name: str) -> None:
        self.data, self.data_name = data, data_name
        self._tmp = tempfile.TemporaryDirectory(prefix="quality-int8-")
        self.root = Path(self._tmp.name)
        self._samples: dict[int, Any] = {}
        self._dense: dict[tuple[str, int], DenseGraphs] = {}
        self._cells = 0

    def __enter__(self) -> Int8Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    def samples(self, seed: int):
        """Calibration and validation from the training images, the whole test set held out."""
        from pipeline.data.calibration import from_datasets

        if seed not in self._samples:
            test = self.data.test.dataset
            self._samples[seed] = from_datasets(
                self.data.train.dataset, test, calibration=CALIBRATION, validation=VALIDATION,
                heldout=len(test), seed=seed, name=self.data_name,
            )  # fmt: skip
        return self._samples[seed]

    def dense(
        self, model_name: str, seed: int, model: nn.Module, example: torch.Tensor, source: str
    ) -> DenseGraphs:
        """The (model, seed)'s dense graphs, made from ``model`` the first time they are asked."""
        key = (model_name, seed)
        if key not in self._dense:
            folder = self.root / f"dense-{model_name}-seed{seed}"
            folder.mkdir()
            fp32 = _export_fp32(model, example, folder / "dense.onnx")
            done = _quantize(fp32, folder / "dense.int8.onnx", self.samples(seed), "dense-int8")
            record = {**_summary(done), "from": source}
            self._dense[key] = DenseGraphs(fp32, done.path, record)
        return self._dense[key]

    def cell(
        self,
        key: tuple[str, int, str],
        dense_model: nn.Module,
        pruned: nn.Module,
        example: torch.Tensor,
    ) -> dict[str, Any]:
        """The INT8 keys of one cell (module docstring); ``key`` is (model, seed, cell name)."""
        model_name, seed, name = key
        dense = self.dense(model_name, seed, dense_model, example, name)
        self._cells += 1
        folder = self.root / f"cell{self._cells}"
        folder.mkdir()
        try:
            fp32 = _export_fp32(pruned, example, folder / "pruned.onnx")
            done = _quantize(fp32, folder / "pruned.int8.onnx", self.samples(seed), "pruned-int8")
            graphs = {
                "dense_fp32": (dense.fp32, "fp32"),
                "pruned_fp32": (fp32, "fp32"),
                "pruned_int8": (done.path, "int8"),
                "dense_int8": (dense.int8, "int8"),
            }
            latency = time_graphs(graphs, tuple(example.shape[1:]))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        m, record = done.check.measured, done.record()
        record["check"] = {**record["check"], "path": done.path.name}  # not the temporary folder
        return {
            "acc_fp32_onnx": m.fp32_accuracy / 100,
            "acc_int8": m.int8_accuracy / 100,
            "int8_drop": m.drop,
            "int8_agreement": m.agreement / 100,
            "int8_verdict": done.check.verdict,
            "int8_excluded": list(done.quantized.excluded),
            "int8": record,
            "dense_int8": dense.record,
            "latency": latency,
        }


def _export_fp32(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The BN-folded model as fp32 ONNX (as ``recede export`` writes it)."""
    from pipeline.export.onnx import export_onnx
    from pipeline.fold.batchnorm import fold_bn

    folded, _ = fold_bn(model.cpu().eval(), example, rtol=1e-3)
    return export_onnx(folded, example[:2], path)


def _quantize(fp32: Path, out: Path, samples, what: str):
    """recede's INT8 export with its defaults (``Int8Settings()``), the fallback timed."""
    from pipeline.bench.int8_cost import fallback_latency
    from pipeline.export.int8_export import Int8Settings, export_int8

    done = export_int8(fp32, out, samples, Int8Settings(), what=what, latency_cost=fallback_latency)
    logger.info("%s: %s", what, done.check.line())
    return done


def _summary(done) -> dict[str, Any]:
    m = done.check.measured
    return {
        "acc_fp32_onnx": m.fp32_accuracy / 100,
        "acc_int8": m.int8_accuracy / 100,
        "int8_drop": m.drop,
        "int8_verdict": done.check.verdict,
        "int8_excluded": list(done.quantized.excluded),
    }


def time_graphs(graphs: dict[str, tuple[Path, str]], shape: tuple[int, ...]) -> dict[str, Any]:
    """Every graph timed in the same blocks per batch; speed-ups over the first (dense fp32).

    Returns:
        ``{"setting": ..., "b1": {label: {"p50_ms", "speedup", "speedup_range"}}, "b32": ...}``
    """
    from pipeline.bench.artefacts import Artefact
    from pipeline.bench.sweep import SweepConfig, measure_interleaved
    from pipeline.bench.timing import Setting, speedup_ratio

    cfg = SweepConfig(BATCHES, threads=1, runs=RUNS, warmup=WARMUP, clock="cpu")
    setting = Setting("onnxruntime", "cpu", "session")
    artefacts = [
        Artefact(label, str(path), shape, None, path, precision=precision)
        for label, (path, precision) in graphs.items()
    ]
    out: dict[str, Any] = {
        "setting": "onnxruntime cpu session, 1 thread, CPU clock, interleaved",
        "runs": RUNS,
        "warmup": WARMUP,
    }
    for batch in BATCHES:
        rows = measure_interleaved(artefacts, setting, cfg, batch)
        reference = {(rows[0].setting, batch, 1): rows[0]}
        out[f"b{batch}"] = {}
        for label, row in zip(graphs, rows, strict=True):
            ratio = speedup_ratio(row, reference)
            out[f"b{batch}"][label] = {
                "p50_ms": row.p50_ms,
                "speedup": None if ratio is None else ratio.median,
                "speedup_range": None if ratio is None else [ratio.low, ratio.high],
            }
    return out
