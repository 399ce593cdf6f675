"""Build a :class:`pipeline.graph.latency_cost.LatencyModel`: layer tables, calibrated and tested
on the whole model at a few width profiles.

The layer tables (``pipeline.bench.latency_pieces``) time each layer alone, so they miss what
only the whole graph has: pools, residual adds, activations left unfused, the one per-call
overhead. The whole model, exported as ``recede run`` exports it, is therefore timed at a few
*width profiles* (a set of channel groups removed), all in alternating blocks so a load change
hits every profile alike, each taken as its quietest block's median (:func:`quietest_ms`):

- **fit**: the dense model and a uniform cut of 20%, 40%, 60% and 80% of every layer (widths
  rounded up to the backend's block) calibrate ``measured = offset + scale * table sum`` by
  least squares on relative errors;
- **held-out**: four random profiles (per-layer shares drawn at random; two rounded to the block,
  two not) the fit never saw: the largest relative error of the prediction on them is the
  model's ``table_error``.

On this machine (2026-12-07, 7 agents on 2 cores) the tables' sum alone (no calibration)
matched the whole model's fastest run within 5% on every aligned profile of VGG-11 w0.5; the
calibrated prediction matched the medians within 2% on aligned held-out profiles and within
14% on unaligned ones, whose slow path depends on the layers around each conv.

Profiles use fixed selection rules, not the run's prune settings, so one model per
deployment and architecture serves every run (``pipeline.bench.latency_cache``).
"""

from __future__ import annotations

import copy
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from pipeline.bench.interleave import interleave
from pipeline.bench.latency_pieces import (
    Timer,
    blocking,
    layer_geometries,
    measure_tables,
    session,
)
from pipeline.bench.timed_runs import host_samples_ms
from pipeline.config import LatencyConfig
from pipeline.graph.channel_graph import ChannelGraph, build_channel_graph
from pipeline.graph.latency_cost import LatencyModel, Profile, layer_widths
from pipeline.prune.plan import SelectionRules, make_plan, select_groups
from pipeline.prune.remove import apply_plan_

logger = logging.getLogger(__name__)

MODEL_WARMUP, MODEL_RUNS = 20, 100
FIT_SHARES = (0.2, 0.4, 0.6, 0.8)
HELD_OUT = 4
PROFILE_RULES = SelectionRules(min_channels=1, max_layer_ratio=0.9)

ModelsTimer = Callable[[list[nn.Module], torch.Tensor], list[float]]  # models -> median ms each


def export_for_timing(
    model: nn.Module, example: torch.Tensor, path: Path, *, fold: bool = True
) -> Path:
    """``model`` exported as ``recede run`` exports it (BN folded, fp32 ONNX). ``fold=False``
    leaves the BN to ONNX Runtime, which fuses it into the conv itself (the same graph at run
    time): 10x faster for a model without constant-channel corrections, as profiles are."""
    from pipeline.export.onnx import export_onnx
    from pipeline.fold.batchnorm import fold_bn

    if example.shape[0] < 2:  # trace a batch of 2: no size-1 broadcast baked into the graph
        example = example.expand(2, *example.shape[1:])
    net = copy.deepcopy(model).cpu().eval()
    if fold:
        net, _ = fold_bn(net, example)
    return export_onnx(net, example[:2], path, simplify=False)


def quietest_ms(blocks: list[list[float]]) -> float:
    """The median of the quietest block: load only adds time, and the blocks of one model are
    spread over the measurement, so the lowest block median is its cost with the least of the
    load (on 7 agents' 2 cores the median of all runs of one model moved by 50% between two
    measurements minutes apart)."""
    return min(statistics.median(b) for b in blocks)


def median_ms(blocks: list[list[float]]) -> float:
    """The p50 of every run: the latency a user waits, load included."""
    return statistics.median(v for b in blocks for v in b)


def time_onnx_ms(
    paths: list[Path],
    cfg: LatencyConfig,
    *,
    warmup: int = MODEL_WARMUP,
    runs: int = MODEL_RUNS,
    statistic: Callable[[list[list[float]]], float] = quietest_ms,
) -> list[float]:
    """``statistic`` (:func:`quietest_ms`) of each ONNX file's runs at ``cfg``'s batch,
    threads, clock and device, timed in alternating blocks (``pipeline.bench.interleave``) so a
    load change hits every file."""
    import numpy as np

    timers = []
    for path in paths:
        sess = session(str(path), cfg)
        inp = sess.get_inputs()[0]
        shape = [cfg.batch if not isinstance(d, int) else d for d in inp.shape]
        feed = {inp.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        run = lambda s=sess, f=feed: s.run(None, f)  # noqa: E731
        timers.append(lambda n, r=run: host_samples_ms(r, warmup=0, runs=n, clock=cfg.clock))
    return [statistic(blocks) for blocks in interleave(timers, runs=runs, warmup=warmup)]


def time_models_ms(
    models: list[nn.Module],
    example: torch.Tensor,
    cfg: LatencyConfig,
    *,
    fold: bool = True,
    statistic: Callable[[list[list[float]]], float] = quietest_ms,
) -> list[float]:
    """:func:`time_onnx_ms` of the models, exported as ``recede run`` exports them."""
    with tempfile.TemporaryDirectory(prefix="recede-latency-") as tmp:
        paths = [
            export_for_timing(m, example, Path(tmp, f"model{i}.onnx"), fold=fold)
            for i, m in enumerate(models)
        ]
        return time_onnx_ms(paths, cfg, statistic=statistic)


def models_timer(cfg: LatencyConfig) -> ModelsTimer:
    return lambda models, example: time_models_ms(models, example, cfg, fold=False)


def profile_model(model: nn.Module, graph: ChannelGraph, dropped: set[int]) -> nn.Module:
    """A copy of ``model`` with ``dropped`` sliced away (random weights are fine for timing)."""
    return apply_plan_(copy.deepcopy(model).cpu().eval(), make_plan(graph, dropped))


def uniform_dropped(graph: ChannelGraph, share: float, round_to: int) -> set[int]:
    """``share`` of every layer's prunable groups (widths rounded up to ``round_to``)."""
    rng = random.Random(0)
    importance = {g.id: rng.random() for g in graph.removable_groups}
    rules = SelectionRules(PROFILE_RULES.min_channels, PROFILE_RULES.max_layer_ratio, round_to)
    return select_groups(importance, graph, ratio=share, rules=rules, scope="layer")


def random_dropped(graph: ChannelGraph, seed: int, round_to: int) -> set[int]:
    """A random profile: each layer set loses its own random share (global cut of importances
    scaled per layer set)."""
    rng = random.Random(seed)
    factor: dict[frozenset, float] = {}
    member: dict[int, set[str]] = {}
    for name, layer in graph.layers.items():
        for g in layer.out_groups:
            member.setdefault(g, set()).add(name)
    importance = {}
    for g in graph.removable_groups:
        key = frozenset(member.get(g.id, ()))
        importance[g.id] = rng.random() * factor.setdefault(key, rng.uniform(0.1, 1.0))
    rules = SelectionRules(PROFILE_RULES.min_channels, PROFILE_RULES.max_layer_ratio, round_to)
    return select_groups(importance, graph, ratio=rng.uniform(0.3, 0.8), rules=rules)


def fit_calibration(table_ms: list[float], measured_ms: list[float]) -> tuple[float, float]:
    """``(offset, scale)`` minimising the squared relative error of ``offset + scale * table``
    against ``measured``; a scale of 1 (offset only) when the tables cannot separate the two."""
    w = [1.0 / m**2 for m in measured_ms]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, table_ms, strict=True)) / sw
    my = sum(wi * y for wi, y in zip(w, measured_ms, strict=True)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, table_ms, strict=True))
    sxy = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, table_ms, measured_ms, strict=True))
    scale = sxy / sxx if sxx > 1e-18 * max(1.0, mx * mx) else 1.0
    if not scale > 0:
        scale = 1.0
    return my - scale * mx, scale


def _profiles(graph: ChannelGraph, align: int) -> list[tuple[str, str, set[int]]]:
    """(role, label, dropped groups) of every profile the build measures."""
    out = [("fit", "dense", set())]
    out += [
        ("fit", f"uniform {s:.0%}, aligned", uniform_dropped(graph, s, align)) for s in FIT_SHARES
    ]
    for i in range(HELD_OUT):
        round_to = align if i % 2 == 0 else 1
        label = f"random {i + 1}, {'aligned' if round_to > 1 else 'unaligned'}"
        out.append(("held-out", label, random_dropped(graph, 100 + i, round_to)))
    return out


def calibrate(
    model: nn.Module,
    example: torch.Tensor,
    graph: ChannelGraph,
    draft: LatencyModel,
    timer: ModelsTimer,
) -> LatencyModel:
    """``draft`` (tables, offset 0, scale 1) calibrated on the fit profiles and tested on the
    held-out ones (see the module docstring); all profiles are timed together, interleaved."""
    profiles = _profiles(graph, draft.align)
    pruned = [profile_model(model, graph, dropped) for _, _, dropped in profiles]
    tables = [draft.table_ms(layer_widths(p)) for p in pruned]
    measured = timer(pruned, example[:2])
    fit = [
        (t, m)
        for (role, _, _), t, m in zip(profiles, tables, measured, strict=True)
        if role == "fit"
    ]
    offset, scale = fit_calibration([t for t, _ in fit], [m for _, m in fit])
    done = tuple(
        Profile(role, label, t, offset + scale * t, m)
        for (role, label, _), t, m in zip(profiles, tables, measured, strict=True)
    )
    held = [abs(p.error) for p in done if p.role == "held-out"]
    return LatencyModel(
        draft.layers, draft.align, draft.quantum, offset, scale, draft.deployment, draft.key, done,
        max(held) if held else None, overhead_ms=draft.overhead_ms,
    )  # fmt: skip


def build_latency_model(
    model: nn.Module,
    example: torch.Tensor,
    cfg: LatencyConfig,
    *,
    piece_timer: Timer | None = None,
    whole_timer: ModelsTimer | None = None,
) -> LatencyModel:
    """Measure ``model``'s latency model on the deployment ``cfg`` (see the module docstring).

    Args:
        model: The dense model (its weights do not matter; only its shapes are timed).
        example: An input batch of the deployed shape (any batch size).
        cfg: Backend, device, precision, batch, threads and clock.
        piece_timer: Times one serialised layer piece (None: ONNX Runtime; tests fake it).
        whole_timer: Times whole models together (None: export and ONNX Runtime).
    """
    start = time.perf_counter()
    net = copy.deepcopy(model).cpu().eval()
    example = example.cpu()
    graph = build_channel_graph(net, example[:1])
    blocks = blocking(cfg)
    logger.info("latency model of %s (%s) started", type(model).__name__, _describe(cfg))
    tables, overhead = measure_tables(
        layer_geometries(net, graph, example), cfg, blocks, piece_timer
    )
    draft = LatencyModel(
        tables, blocks.align, blocks.quantum, 0.0, 1.0, asdict(cfg), overhead_ms=overhead
    )
    built = calibrate(net, example, graph, draft, whole_timer or models_timer(cfg))
    seconds = time.perf_counter() - start
    error = "n/a" if built.table_error is None else f"{built.table_error:.1%}"
    logger.info(
        "latency model finished in %.1f s: dense %.4g ms predicted, held-out error %s",
        seconds, built.dense_ms, error,
    )  # fmt: skip
    return _with_seconds(built, seconds)


def _with_seconds(model: LatencyModel, seconds: float) -> LatencyModel:
    from dataclasses import replace

    return replace(model, build_seconds=round(seconds, 2))


def _describe(cfg: LatencyConfig) -> str:
    threads = f"{cfg.threads} thread{'s' if cfg.threads != 1 else ''}"
    return f"{cfg.backend} {cfg.device} {cfg.precision}, batch {cfg.batch}, {threads}, {cfg.clock} clock"
