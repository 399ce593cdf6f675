"""Time each conv and linear layer of a model alone, at a grid of widths, on the deployment
backend: the layer tables of a :class:`pipeline.graph.latency_cost.LatencyModel`.

A *piece* is one layer as a one-node ONNX graph (``Conv`` with its kernel, stride, padding,
dilation and groups at the input size it sees in the model, or ``Gemm``), built directly with
``onnx.helper`` (a millisecond, where a torch export takes 0.1 s) with random weights, and timed
in its own ONNX Runtime session with the deployment's threads, batch and clock. The backend's
per-call overhead (a one-``Relu`` graph) is subtracted from every piece, since the whole model
pays it once (the calibration's offset holds it).

Why pieces and not whole models alone: a layer's table needs a few dozen widths, and a piece
session costs 5-20 ms to build and time here, so the demo's 9 layers take a few seconds where
as many whole-model exports would take a minute; whole models at a few width profiles calibrate
the sum instead (``pipeline.bench.latency_profiles``).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.bench.timed_runs import host_samples_ms
from pipeline.config import ConfigError, LatencyConfig
from pipeline.graph.channel_graph import ChannelGraph
from pipeline.graph.latency_cost import Blocking, LayerTable, axis_points

logger = logging.getLogger(__name__)

PIECE_WARMUP = 3
PIECE_RUNS = 11
"""A piece's latency is the fastest of its runs: load only ever adds time, so the minimum is
its own cost; the whole-model calibration then scales the sum to the median a run measures
(under a load of 7 agents on 2 cores, medians of 9 runs of one piece moved by 2x)."""
OPSET, IR_VERSION = 17, 8


@dataclass(frozen=True)
class LayerGeometry:
    """Everything a layer's latency depends on besides its widths."""

    name: str
    kind: str  # conv | depthwise | linear
    cin: int
    cout: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)  # a linear layer: (rows per sample, 1)
    prunable_in: bool = True
    prunable_out: bool = True


def input_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The input shape of every conv and linear layer in one eval forward of ``example[:1]``."""
    from pipeline.graph.costs import one_sample_with_hooks

    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, _m: nn.Module, args: tuple, _out: object) -> None:  # returns None
        shapes.setdefault(name, tuple(args[0].shape))

    def layer(_name: str, m: nn.Module) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear))

    one_sample_with_hooks(model, example, layer, record)
    return shapes


def _padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding == "valid":
        return 0, 0
    if m.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True))
    return tuple(m.padding)


def layer_geometries(
    model: nn.Module, graph: ChannelGraph, example: torch.Tensor
) -> list[LayerGeometry]:
    """The geometry of every conv and linear layer of ``graph``, in graph order."""
    modules, shapes = dict(model.named_modules()), input_shapes(model, example)
    removable = {g.id for g in graph.removable_groups}
    out = []
    for name, layer in graph.layers.items():
        if layer.kind == "bn" or name not in shapes:
            continue
        m, shape = modules[name], shapes[name]
        prunable = {
            "prunable_in": any(g in removable for g in layer.in_groups),
            "prunable_out": any(g in removable for g in layer.out_groups),
        }
        if isinstance(m, nn.Linear):
            rows = int(torch.Size(shape[1:-1]).numel()) if len(shape) > 2 else 1
            out.append(
                LayerGeometry(
                    name, "linear", m.in_features, m.out_features, in_hw=(rows, 1), **prunable
                )
            )
            continue
        kind = "depthwise" if layer.depthwise else "conv"
        out.append(
            LayerGeometry(
                name, kind, m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                _padding(m), tuple(m.dilation), m.groups, tuple(shape[-2:]), **prunable,
            )
        )  # fmt: skip
    return out


def blocking(cfg: LatencyConfig) -> Blocking:
    """How the deployment computes channels (:class:`~pipeline.graph.latency_cost.Blocking`):
    ONNX Runtime's CPU convolutions run blocked (``NCHWc``, MLAS) in blocks of 16 channels with
    AVX-512F and 8 with AVX/AVX2, for widths that are multiples of 4 (measured, see
    ``pipeline.graph.latency_cost``); on CUDA, blocks of 8 (tensor-core tiles), any width."""
    if cfg.device != "cpu":
        return Blocking(8, 1)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return Blocking(16 if " avx512f" in flags else 8, 4)


INT8_HINT = "the latency model times fp32 graphs only"
INT8_WHY = (
    "its layer pieces, its calibration profiles, the re-measure loop after the cut and the "
    "final measurement are all exported and timed as fp32 ONNX, so a budget in INT8 would be "
    "met in fp32 and reported as INT8. The INT8 export itself exists (recede export --format "
    "onnx-int8; recede run writes pruned.int8.onnx): budget in fp32 and ship the INT8 graph, "
    "whose speed-up recede run reports, or use train.latency.precision=fp32"
)


def int8_supported() -> bool:
    """Whether latency budgets can be measured in INT8: not yet. The INT8 export exists
    (``pipeline.export.int8``), but every graph the latency model and the cut time is fp32;
    turning this on needs each of them timed as its calibrated QDQ graph (a one-node QDQ piece
    also carries the Q/DQ pair at its borders that a whole graph fuses away)."""
    return False


def check_deployment(cfg: LatencyConfig) -> None:
    """Refuse, before any work, a ``train.latency`` deployment that cannot be measured here.

    Raises:
        ConfigError: naming the key: TensorRT (not installed, or not supported by the latency
            model), CUDA without a GPU or without ONNX Runtime's CUDA provider, INT8.
    """
    from pipeline.bench.backends import ort_cuda_available

    if cfg.precision == "int8" and not int8_supported():
        raise ConfigError(f"train.latency.precision int8: {INT8_HINT}: {INT8_WHY}")
    if cfg.backend == "tensorrt":
        from pipeline.export.tensorrt import tensorrt_available

        why = (
            "the latency model would need one engine build per table piece, which it does not do"
            if tensorrt_available()
            else "the tensorrt package and a CUDA GPU are not available (pip install "
            "'recede[tensorrt]')"
        )
        raise ConfigError(
            f"train.latency.backend tensorrt is not supported here: {why}; use "
            "train.latency.backend=onnxruntime"
        )
    if cfg.device == "cuda" and not (torch.cuda.is_available() and ort_cuda_available()):
        raise ConfigError(
            "train.latency.device cuda needs a CUDA GPU and onnxruntime-gpu's "
            f"CUDAExecutionProvider; this machine has {'no GPU' if not torch.cuda.is_available() else 'no CUDA provider'}; "
            "use train.latency.device=cpu"
        )


def piece_proto(geom: LayerGeometry, cin: int, cout: int, batch: int) -> bytes:
    """One layer at ``cin`` -> ``cout`` channels as a serialised ONNX model (random weights)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    groups = cin if geom.kind == "depthwise" else geom.groups
    if geom.kind == "linear":
        shape = [batch * geom.in_hw[0], cin]
        weight = rng.standard_normal((cout, cin), dtype=np.float32) * 0.1
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    else:
        shape = [batch, cin, *geom.in_hw]
        weight = rng.standard_normal((cout, cin // groups, *geom.kernel), dtype=np.float32) * 0.1
        node = helper.make_node(
            "Conv", ["x", "w", "b"], ["y"], kernel_shape=list(geom.kernel), group=groups,
            strides=list(geom.stride), dilations=list(geom.dilation), pads=list(geom.padding) * 2,
        )  # fmt: skip
    bias = rng.standard_normal(cout, dtype=np.float32)
    graph = helper.make_graph(
        [node], geom.name or "piece",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def _overhead_proto(batch: int) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "overhead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def session(model: bytes | str, cfg: LatencyConfig) -> Any:
    """An ONNX Runtime session as ``recede bench`` opens one (all graph optimisations,
    sequential, ``cfg.threads`` intra-op threads) on ``cfg.device``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cfg.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if cfg.device == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(model, sess_options=options, providers=providers)


def time_session(
    sess: Any,
    cfg: LatencyConfig,
    *,
    warmup: int,
    runs: int,
    statistic: Callable = statistics.median,
) -> float:
    """``statistic`` (median) of ``runs`` calls of ``sess`` in ms on a fixed random input,
    after ``warmup``."""
    import numpy as np

    inp = sess.get_inputs()[0]
    shape = [cfg.batch if not isinstance(d, int) else d for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    feed = {inp.name: x}
    samples = host_samples_ms(
        lambda: sess.run(None, feed), warmup=warmup, runs=runs, clock=cfg.clock
    )
    return float(statistic(samples))


Timer = Callable[[bytes], float]  # a serialised ONNX model -> its ms


def piece_timer(cfg: LatencyConfig, warmup: int = PIECE_WARMUP, runs: int = PIECE_RUNS) -> Timer:
    """Times one piece in a fresh session (tests pass a fake one)."""
    return lambda proto: time_session(
        session(proto, cfg), cfg, warmup=warmup, runs=runs, statistic=min
    )


def measure_table(
    geom: LayerGeometry, batch: int, blocks: Blocking, timer: Timer, overhead_ms: float
) -> LayerTable:
    """The layer's table: every width of :func:`axis_points` on each axis (the output axis at
    aligned widths and its own), timed by ``timer``."""
    multiple = 1 if geom.kind == "depthwise" else geom.groups
    ins = axis_points(geom.cin, blocks.align, blocks.quantum, geom.prunable_in, multiple)

    def ms(cin: int, cout: int) -> float:
        return max(0.0, timer(piece_proto(geom, cin, cout, batch)) - overhead_ms)

    if geom.kind == "depthwise":
        return LayerTable(
            geom.name, geom.kind, geom.cin, geom.cout, ins, (), tuple((ms(c, c),) for c in ins)
        )
    outs = axis_points(geom.cout, blocks.align, blocks.quantum, geom.prunable_out, multiple)
    outs = tuple(p for p in outs if p % blocks.align == 0 or p == geom.cout)
    grid = tuple(tuple(ms(ci, co) for co in outs) for ci in ins)
    return LayerTable(geom.name, geom.kind, geom.cin, geom.cout, ins, outs, grid)


def measure_tables(
    geoms: Sequence[LayerGeometry], cfg: LatencyConfig, blocks: Blocking, timer: Timer | None = None
) -> tuple[tuple[LayerTable, ...], float]:
    """Every layer's table and the per-call overhead subtracted from them."""
    timer = timer or piece_timer(cfg)
    overhead = timer(_overhead_proto(cfg.batch))
    tables = tuple(measure_table(g, cfg.batch, blocks, timer, overhead) for g in geoms)
    pieces = sum(len(t.ms) * len(t.ms[0]) for t in tables)
    logger.info("latency tables: %d layers, %d pieces timed", len(tables), pieces)
    return tables, overhead
