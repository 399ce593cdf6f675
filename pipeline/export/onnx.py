"""Export a PyTorch model to ONNX with a dynamic batch axis, and verify it against PyTorch.

Exporter choice (torch 2.14): the TorchScript exporter (``torch.onnx.export(dynamo=False)``).
Both exporters were tried on a small CNN with a residual add, a concat, a depthwise conv, a
linear head and a constant ``[C, H, W]`` buffer added to an activation. Both produced graphs that
match PyTorch to ~6e-8 at batch 1 and 5, but:

- the TorchScript exporter took ~0.03-0.1 s and honours ``opset_version=17`` exactly;
- the dynamo exporter took 1.7-4.6 s, cannot emit opset 17 at all (its lowest implemented opset
  is 18 and its down-conversion fails on ``ReduceMean``, silently keeping 18), and logs several
  lines per call.

Convolutional classifiers trace to a static graph, which is exactly what the TorchScript
exporter handles well, and the parity check in :func:`verify_onnx` catches any tracing mistake.
The deprecation warning the TorchScript exporter emits is silenced; pass ``dynamo=True`` to use
the other exporter (opset 18 or later) should a model need it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.atomic import atomic_path
from pipeline.core.tolerance import Tolerance, tolerance_for

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.core.checks import Check

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"
MIN_OPSET = 17
_DYNAMO_MIN_OPSET = 18
_INSTALL_HINT = "pip install 'recede[onnx]'"


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs the 'onnx' package ({err}); run {_INSTALL_HINT}"
        ) from err
    return onnx


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            f"ONNX verification needs the 'onnxruntime' package ({err}); run {_INSTALL_HINT}"
        ) from err
    return onnxruntime


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def _trace_to_proto(
    model: nn.Module,
    example: torch.Tensor,
    *,
    opset: int,
    dynamic_batch: bool,
    dynamo: bool,
    half: bool = False,
    ones_channels: bool = True,
) -> Any:
    """Run the chosen torch exporter on a CPU copy of ``model`` and return the ModelProto."""
    import torch

    from pipeline.export.static_resize import constant_scales
    from pipeline.fold.batchnorm import fold_corrections_
    from pipeline.fold.ones_channel import ones_channels_

    onnx = _import_onnx()
    clone = copy.deepcopy(model).cpu().eval()
    example = example.detach().cpu()
    if ones_channels:  # border corrections as a constant input channel: no Add, fusable
        ones_channels_(clone, example)
    fold_corrections_(clone, example)  # one Conv per conv: no correction subgraphs to trace
    if half:  # CPU half kernels only have to run once, for the trace
        clone, example = clone.half(), example.half()
    names, batched = output_names(clone, example)
    clone = _with_traceable_outputs(clone, example)
    kwargs: dict[str, Any] = {}
    if dynamo:
        kwargs["verbose"] = False  # otherwise it prints its progress to stdout
    if dynamic_batch and dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}} | {n: {0: "batch"} for n in batched}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy-exporter notice
        torch.onnx.export(
            clone,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=names,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=dynamo,
            **kwargs,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    constant_scales(proto)  # exact: pipeline.export.static_resize
    return proto


def output_names(model: nn.Module, example: torch.Tensor) -> tuple[list[str], list[str]]:
    """The graph's output names (one per output leaf, ``pipeline.core.outputs``) and those whose
    first axis is the batch, from one run of ``model`` on ``example``.

    Raises:
        OutputError: the model returns something other than a tree of tensors (bad input).
    """
    import torch

    from pipeline.core.outputs import batch_axes

    with torch.no_grad():
        axes = batch_axes(model(example), int(example.shape[0]))
    return list(axes), [n for n, batched in axes.items() if batched]


def _with_traceable_outputs(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model``, or, when its output holds a dict key that is not a string (``{0: a, 1: b}``),
    a wrapper returning its leaves as a flat tuple in :func:`output_names` order: torch's tracer
    turns such keys into outputs of their own ('did not have observable data dependence')."""
    import torch
    from torch import nn

    from pipeline.core.outputs import flatten

    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return all(map(plain, value)) if isinstance(value, (tuple, list)) else True

    with torch.no_grad():
        if plain(model(example)):
            return model

    class Leaves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(flatten(self.model(x)).values())

    return Leaves()


def _io_signature(proto: Any) -> list[tuple[str, tuple[str, ...]]]:
    """Names and dims (value or symbolic name) of graph inputs and outputs, for comparison."""
    signature = []
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = tuple(d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim)
        signature.append((value.name, dims))
    return signature


def _same_outputs(original: Any, candidate: Any, example: torch.Tensor) -> bool:
    """Whether two ModelProtos give the same output on ``example`` under ONNX Runtime.

    Raises:
        ImportError: onnxruntime is missing; sameness that was not checked is never claimed.
    """
    import numpy as np

    ort = _import_onnxruntime()
    outputs, precision = [], "fp32"
    for proto in (original, candidate):
        session = ort.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        feed = {INPUT_NAME: _as_input(session, example)}
        names = [o.name for o in session.get_outputs()]
        outputs.append(dict(zip(names, session.run(None, feed), strict=True)))
        precision = onnx_precision(session)
    ref, got = outputs
    if list(ref) != list(got):
        return False
    for name, want in ref.items():  # every output, each against its own scale
        want, have = want.astype(np.float64), got[name].astype(np.float64)
        err = float(np.abs(want - have).max(initial=0.0)) if want.shape == have.shape else math.inf
        if not tolerance_for(precision).allows(err, float(np.abs(want).max(initial=0.0))):
            return False
    return True


def _slimmed_or_original(proto: Any, example: torch.Tensor) -> Any:
    """Return the onnxslim-simplified graph if it is valid and equivalent, else ``proto``."""
    onnx = _import_onnx()
    try:
        import onnxslim
    except ImportError:
        logger.info("onnxslim is not installed; keeping the graph unsimplified")
        return proto
    try:
        _import_onnxruntime()
    except ImportError as err:
        logger.warning("%s; without it onnxslim's graph cannot be checked, so it is not used", err)
        return proto
    original = onnx.ModelProto()
    original.CopyFrom(proto)  # onnxslim may modify its argument
    try:
        slim = onnxslim.slim(proto)
        onnx.checker.check_model(slim)
        unchanged_io = _io_signature(slim) == _io_signature(original) and (
            _default_opset(slim) == _default_opset(original)
        )
        equivalent = unchanged_io and _same_outputs(original, slim, example)
    except Exception as err:  # onnxslim can fail in many ways; simplification is optional
        logger.warning(
            "onnxslim failed (%s: %s); keeping the unsimplified graph", type(err).__name__, err
        )
        return original
    if not equivalent:
        logger.warning("onnxslim changed the graph's interface or outputs; keeping the original")
        return original
    logger.info("onnxslim: %d -> %d nodes", len(original.graph.node), len(slim.graph.node))
    return slim


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    opset: int = MIN_OPSET,
    dynamic_batch: bool = True,
    simplify: bool = True,
    dynamo: bool = False,
    half: bool = False,
    ones_channels: bool = True,
) -> Path:
    """Export ``model`` to an ONNX file with input ``"input"`` and one output per output leaf.

    A model returning one tensor has one output, ``"output"``; one returning tuples, lists or
    dicts of tensors has one named output per tensor (``pipeline.core.outputs``: ``out``,
    ``aux``, ``output.0``), each with a symbolic batch axis where its first axis is the batch.

    A deep copy of the model is exported in eval mode on the CPU, so the caller's model keeps its
    mode and device. See the module docstring for why the TorchScript exporter is the default.
    The batch axis is symbolic (``"batch"``) when ``dynamic_batch``; trace with an example batch
    of 2 or more so no size-1 broadcasting is baked into the graph.

    Args:
        model: The network to export.
        example: An example input batch ``[N, C, H, W]``.
        path: Destination ``.onnx`` file, written atomically.
        opset: Default-domain opset, at least 17 (18 with ``dynamo``).
        dynamic_batch: Make the batch axis of the input and of every output that has one
            symbolic.
        simplify: Simplify with onnxslim when installed, keeping the result only if it passes
            the checker, keeps the I/O signature and gives the same outputs under ONNX Runtime.
        dynamo: Use the ``torch.export``-based exporter instead of the TorchScript one.
        half: Export in float16 (weights, activations, input and output): the model is cast
            to half on the CPU and traced there.
        ones_channels: Carry position-dependent border corrections as a constant input channel
            (``pipeline.fold.ones_channel``) where that is exact, instead of a constant ``Add``
            after the conv; the rest become constant maps.

    Returns:
        The path of the written file.

    Raises:
        ImportError: If onnx is not installed.
        ValueError: If ``opset`` is too low.
        OutputError: The model returns something other than a tree of tensors.
        onnx.checker.ValidationError: If the final graph is invalid.
    """
    onnx = _import_onnx()
    floor = _DYNAMO_MIN_OPSET if dynamo else MIN_OPSET
    if opset < floor:
        raise ValueError(
            f"opset must be >= {floor}{' with dynamo' if dynamo else ''}; "
            f"got {opset}; pass opset={floor}"
        )
    path = Path(path)
    start = time.perf_counter()
    logger.info("ONNX export of %s to %s (opset %d) started", type(model).__name__, path, opset)
    proto = _trace_to_proto(
        model, example, opset=opset, dynamic_batch=dynamic_batch, dynamo=dynamo, half=half,
        ones_channels=ones_channels,
    )  # fmt: skip
    if simplify:
        proto = _slimmed_or_original(proto, example)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    logger.info(
        "ONNX export finished in %.2f s: %s (%d nodes)",
        time.perf_counter() - start,
        path,
        len(proto.graph.node),
    )
    return path


def _default_opset(proto: Any) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def _batch_is_dynamic(session: Any) -> bool:
    first_dim = session.get_inputs()[0].shape[0]
    return not isinstance(first_dim, int) or first_dim <= 0


def _batches(inputs: torch.Tensor, dynamic: bool) -> list[torch.Tensor]:
    """The given batch, plus one of size ``N + 1`` when the batch axis is dynamic."""
    import torch

    if not dynamic:
        return [inputs]
    return [inputs, torch.cat([inputs, inputs[:1].flip(-1)])]


def _reference(model: nn.Module, batch: torch.Tensor) -> dict[str, Any]:
    """The model's outputs on ``batch`` as float64 arrays, by output name."""
    import torch

    from pipeline.core.outputs import as_arrays

    param = next(model.parameters(), None)
    device = param.device if param is not None else batch.device
    with _evaluating(model), torch.inference_mode():
        return as_arrays(model(batch.to(device)))


def _as_input(session: Any, batch: torch.Tensor) -> Any:
    """``batch`` as a numpy array of the session's input type (float16 for an FP16 graph)."""
    array = batch.detach().cpu().float().numpy()
    return array.astype("float16") if session.get_inputs()[0].type == "tensor(float16)" else array


def onnx_precision(session: Any) -> str:
    """``fp16`` when the graph takes float16 input, else ``fp32``."""
    return "fp16" if session.get_inputs()[0].type == "tensor(float16)" else "fp32"


def session_outputs(session: Any, feed: Any) -> dict[str, Any]:
    """Every output of an ONNX Runtime ``session`` on the input array ``feed``, by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: feed}), strict=True))


def _outputs(session: Any, model: nn.Module, batches: list[torch.Tensor]) -> list[tuple]:
    """(PyTorch, ONNX Runtime) outputs per batch, by output name, as float64 and float32 arrays.

    A graph written before outputs had names of their own (one output, ``output``) compares
    with a one-output model whatever its name.
    """
    pairs = []
    for batch in batches:
        want, got = _reference(model, batch), session_outputs(session, _as_input(session, batch))
        if len(want) == len(got) == 1:
            got = {next(iter(want)): next(iter(got.values()))}
        pairs.append((want, got))
    return pairs


def verify_onnx(
    path: str | Path,
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    atol: float | None = None,
    tolerance: Tolerance | None = None,
    what: str | None = None,
) -> Check:
    """Check an ONNX file and compare ONNX Runtime (CPU) with PyTorch on the same inputs.

    Runs ``onnx.checker.check_model`` first, then both runtimes on ``inputs`` and, if the batch
    axis is dynamic, on a batch one larger, to prove the axis really is dynamic.

    Args:
        path: ONNX file written by :func:`export_onnx`.
        model: The PyTorch model it came from; run in eval mode, its mode is restored.
        inputs: A batch ``[N, C, H, W]``.
        atol: Absolute floor of the tolerance (None: the policy's default).
        tolerance: The policy to apply; None: ``tolerance_for`` the graph's input precision
            (fp32 or fp16) with ``atol``.
        what: Name of the check (None: ``onnx`` or ``onnx-fp16`` by the graph's precision).

    Returns:
        The check (``pipeline.core.checks``): errors, bound, sensitivity, verdict, opset.

    Raises:
        ImportError: If onnx or onnxruntime is not installed.
        onnx.checker.ValidationError: If the graph is invalid.
    """
    from pipeline.core.checks import insensitivity_hint
    from pipeline.core.output_checks import judge_outputs

    onnx, ort = _import_onnx(), _import_onnxruntime()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = _batches(inputs.detach().cpu().float(), _batch_is_dynamic(session))
    tolerance = tolerance or tolerance_for(onnx_precision(session), atol=atol)
    result = judge_outputs(
        what or ("onnx-fp16" if onnx_precision(session) == "fp16" else "onnx"),
        _outputs(session, model, batches),
        tolerance,
        path=str(path),
        hint=insensitivity_hint(model),
        opset=_default_opset(proto),
    )
    log = logger.info if result.passed else logger.warning
    log("ONNX verification of %s: %s", path, result.line())
    return result
