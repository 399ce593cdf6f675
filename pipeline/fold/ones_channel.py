"""Border corrections as a kept all-ones channel, so an exported graph needs no constant ``Add``.

A removed channel whose BN scale is zero still emits ``act(beta)``; a padded reader conv sees that
constant everywhere except where its own zero padding replaces it, so its contribution (the
``kernel`` correction of ``pipeline.layers.corrected_conv``) differs at the borders. The static export
form used to add it as a constant ``[C, H, W]`` map after the conv. In ONNX that is a ``Conv``
then an ``Add`` of a constant, which keeps ONNX Runtime from fusing the conv with its activation
and adds layout reorders (measured 15-20% of the pruned demo's latency).

Here the reader instead gets **one extra input channel that holds a constant c** and the extra
filter slice ``kernel / c``. Its own zero padding then produces exactly the border correction:
``conv2d(c * ones, kernel / c) == conv2d(ones, kernel)``, at every position and any input
size. The constant channel comes from the conv that feeds the reader: it gains one output
channel with zero filters and bias 1, so after the activation (and any max-pool) in between, it
is ``act(1)`` everywhere (1 after ReLU).

Exact or refused, per reader:

- the reader is a plain (ungrouped) conv with a ``kernel`` correction that is position-dependent
  at this size (a uniform one becomes a plain bias and needs nothing);
- between the producer conv and the reader sit only single-user element-wise activations,
  max-pools, dropouts and identities, so the new channel reaches the reader alone and reaches
  nothing else;
- the producer is an ungrouped conv;
- the channel measured at the reader's input on the example is one constant, the same at every
  position and sample (an average pool that counts padding would fail this and is refused);
- the reader's input width is not already a multiple of :data:`CHANNEL_ALIGN` (8). ONNX Runtime's
  CPU convolutions run in a blocked ``NCHWc`` layout only when the input channels are a multiple
  of the block (8 with AVX2, 16 with AVX-512); one extra channel on an aligned reader sends it to
  the slow unblocked path. Measured on the pruned demo (readers 16..128 wide, 2026-12-06, this
  project's 2-core CPU, ORT 1.32): with every reader given the channel the pruned graph ran
  1.05x faster than the dense one at batch 32, with the constant maps 3.25-3.59x, with (wrong)
  plain biases 3.96-4.03x. So an aligned reader keeps its map; an unaligned one gains the channel.

Readers that fail a rule keep the constant map (``pipeline.fold.batchnorm.fold_corrections_``). The cost
is one output channel of the producer and one input channel of the reader per converted reader
(counted in :class:`OnesReport`); the result is checked against the kernel form on the example.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from pipeline.core.numerics import rel_err
from pipeline.fold.batchnorm import input_sizes
from pipeline.layers.corrected_conv import CorrectedConv2d, drop_kernel_, kernel_corrected

logger = logging.getLogger(__name__)

PASS_THROUGH = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid,
    nn.Tanh, nn.ELU, nn.MaxPool2d, nn.Dropout, nn.Identity,
)  # fmt: skip
"""Modules a constant channel passes through as a constant (checked on the example anyway)."""

CHANNEL_ALIGN = 8
"""A reader whose input width is a multiple of this keeps its map (see the module docstring)."""

_PASS_FUNCTIONS = (torch.relu, nn.functional.relu, torch.nn.functional.max_pool2d)


class OnesChannelError(RuntimeError):
    """Converting to ones channels changed the outputs: a bug (the kernel form is kept)."""


@dataclass(frozen=True)
class OnesReport:
    """Readers given a constant channel (reader, producer), readers left as maps, and why."""

    converted: tuple[tuple[str, str], ...]
    kept: tuple[tuple[str, str], ...]  # (reader, reason)
    max_rel_err: float


def _passes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], PASS_THROUGH)
    return node.op == "call_function" and node.target in _PASS_FUNCTIONS


def _producer(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str | None, str]:
    """The conv whose output reaches ``node``'s input alone, through pass-through ops only."""
    source = node.args[0] if node.args else None
    while isinstance(source, fx.Node):
        if len(source.users) != 1:
            return None, f"{source.name} has {len(source.users)} users"
        if source.op == "call_module" and isinstance(modules[source.target], nn.Conv2d):
            conv = modules[source.target]
            return (source.target, "") if conv.groups == 1 else (None, "grouped producer")
        if not _passes(source, modules):
            return None, f"{source.name} ({source.op} {source.target}) is not element-wise"
        source = source.args[0] if source.args else None
    return None, "no producing conv"


def _position_dependent(conv: CorrectedConv2d, size: tuple[int, int]) -> bool:
    value = conv.kernel_correction(conv.const_kernel.new_empty(1, 1, *size))
    return not bool((value == value[..., :1, :1]).all())


def candidates(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, str], dict[str, str]]:
    """Readers that qualify (reader -> producer) and those that do not (reader -> why)."""
    from pipeline.graph.tracing import trace

    names = kernel_corrected(model)
    if not names:
        return {}, {}
    modules, sizes = dict(model.named_modules()), input_sizes(model, names, example)
    nodes = {n.target: n for n in trace(model).graph.nodes if n.op == "call_module"}
    good, refused = {}, {}
    for name in names:
        reader = modules[name]
        if not _position_dependent(reader, sizes[name]):
            continue  # uniform: a plain bias, nothing to do
        if reader.in_channels % CHANNEL_ALIGN == 0:
            refused[name] = (
                f"its {reader.in_channels} input channels are a multiple of {CHANNEL_ALIGN}: one "
                "more would leave ONNX Runtime's blocked convolution"
            )
            continue
        if reader.groups != 1 or reader.const_map is not None or name not in nodes:
            refused[name] = "grouped, already a map, or called more than once"
            continue
        producer, why = _producer(nodes[name], modules)
        if producer is None or producer in good.values():
            refused[name] = why or f"producer {producer} already feeds another reader"
        else:
            good[name] = producer
    return good, refused


def _grow_output_(conv: nn.Conv2d) -> None:
    """One more output channel: zero filters, bias 1, zero correction rows."""
    w = conv.weight.detach()
    conv.weight = nn.Parameter(torch.cat([w, w.new_zeros(1, *w.shape[1:])]))
    bias = conv.bias.detach() if conv.bias is not None else w.new_zeros(w.shape[0])
    conv.bias = nn.Parameter(torch.cat([bias, bias.new_ones(1)]))
    conv.out_channels += 1
    if isinstance(conv, CorrectedConv2d):
        for name in ("const_kernel", "const_map"):
            value = getattr(conv, name)
            if value is not None:
                setattr(conv, name, torch.cat([value, value.new_zeros(1, *value.shape[1:])]))


def _reader_input_constant(model: nn.Module, reader: nn.Module, example: torch.Tensor) -> float:
    """The value of the reader's last input channel if it is one constant, else NaN."""
    seen: list[torch.Tensor] = []
    hook = reader.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, -1].detach()))
    try:
        model(example)
    finally:
        hook.remove()
    channel = seen[0]
    value = channel.flatten()[0]
    return float(value) if bool((channel == value).all()) else float("nan")


@torch.no_grad()
def ones_channels_(model: nn.Module, example: torch.Tensor, *, rtol: float = 1e-4) -> OnesReport:
    """Turn every qualifying position-dependent ``kernel`` correction into a constant channel.

    In place; readers that do not qualify keep their ``kernel`` correction (for
    ``pipeline.fold.batchnorm.fold_corrections_`` to make a map of).

    Raises:
        OnesChannelError: the converted model differs from the kernel form beyond ``rtol`` of the
            output scale on ``example`` (a bug; please report it).
    """
    model.eval()
    good, refused = candidates(model, example)
    if not good:
        return OnesReport((), tuple(refused.items()), 0.0)
    ref = model(example)
    modules, converted = dict(model.named_modules()), []
    for reader_name, producer_name in good.items():
        reader, producer = modules[reader_name], modules[producer_name]
        _grow_output_(producer)
        reader.in_channels += 1  # the forward reads the weight; keep the attribute honest
        kernel = reader.const_kernel
        reader.weight = nn.Parameter(
            torch.cat([reader.weight.detach(), torch.zeros_like(kernel)], dim=1)
        )
        c = _reader_input_constant(model, reader, example)
        if c != c or c == 0.0:  # NaN: not one constant; 0: nothing to scale
            refused[reader_name] = f"the new channel reaches it as {c}, not one non-zero constant"
            _undo_(producer, reader, kernel)
            continue
        reader.weight.data[:, -1:] = kernel / c
        drop_kernel_(reader)
        converted.append((reader_name, producer_name))
    err = rel_err(model(example), ref)
    if err > rtol:
        raise OnesChannelError(
            f"ones channels changed the outputs by {err:.2e} of the output scale (> {rtol:.0e}); "
            "this is a bug, please report it"
        )
    logger.info(
        "ones channels: %d readers converted, %d kept as maps; rel err %.2e",
        len(converted), len(refused), err,
    )  # fmt: skip
    return OnesReport(tuple(converted), tuple(refused.items()), err)


def _undo_(producer: nn.Conv2d, reader: nn.Conv2d, kernel: torch.Tensor) -> None:
    """Take the extra channel back out of ``producer`` and ``reader``."""
    producer.weight = nn.Parameter(producer.weight.detach()[:-1])
    producer.bias = nn.Parameter(producer.bias.detach()[:-1])
    producer.out_channels -= 1
    if isinstance(producer, CorrectedConv2d):
        for name in ("const_kernel", "const_map"):
            value = getattr(producer, name)
            if value is not None:
                setattr(producer, name, value[:-1])
    reader.weight = nn.Parameter(reader.weight.detach()[:, :-1])
    reader.in_channels -= 1
    reader.const_kernel = kernel
