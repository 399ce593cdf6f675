"""Fuse ``BoundedBatchNorm2d -> nn.ReLU`` pairs for training, and undo it before pruning.

``fuse_bn_relu_`` moves an ``nn.ReLU`` that only a bounded BN feeds into the BN (its ``relu``
flag; the ReLU becomes a ``ReLUFusedIntoBN`` identity), so training runs the fused BN+ReLU
kernel; ``unfuse_bn_relu_`` puts the ReLUs back, for pruning, folding and export (``fold_bn_``
and ``convert_to_plain_bn_`` refuse a fused BN). It lives apart from ``bounded_bn`` because it
needs the fx tracer of ``channel_graph``, which itself knows bounded BN.

``fused_for_training`` is what recede's trainer uses: it fuses for the length of training on
CUDA, where the bounded BN runs the Triton kernel (on the CPU the reference applies the ReLU
separately anyway, so fusing buys nothing there), and always unfuses afterwards, so every
stage after training sees plain ``nn.ReLU`` modules.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from pipeline.graph.tracing import GraphError, trace
from pipeline.layers.bounded_bn import BoundedBatchNorm2d

logger = logging.getLogger(__name__)


class ReLUFusedIntoBN(nn.Identity):
    """Stands where an ``nn.ReLU`` was while the bounded BN ``bn_name`` applies it."""

    def __init__(self, bn_name: str, inplace: bool) -> None:
        super().__init__()
        self.bn_name, self.inplace = bn_name, inplace

    def extra_repr(self) -> str:
        return f"bn_name={self.bn_name!r}"


def _fusable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(bn, relu)`` module names where an ``nn.ReLU`` module, called once, is the only user
    of a ``BoundedBatchNorm2d``'s output (a ReLU module shared by several call sites, such as
    torchvision's ``BasicBlock.relu``, stays)."""
    graph = trace(model).graph
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BoundedBatchNorm2d):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        relu = users[0].target
        if type(modules[relu]) is nn.ReLU and calls[relu] == 1 and calls[node.target] == 1:
            pairs.append((node.target, relu))
    return pairs


@torch.no_grad()
def fuse_bn_relu_(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Fuse each ``BoundedBatchNorm2d -> nn.ReLU`` pair found by torch.fx, in place.

    The BN gets ``relu=True`` and the ReLU module is replaced by a ``ReLUFusedIntoBN``
    identity; state dict keys do not change. The result is checked on ``example`` in eval
    mode: outputs must be bitwise equal, else the fusion is undone and an error raised.

    Returns:
        The ``(bn, relu)`` qualified names fused.

    Raises:
        ValueError: torch.fx cannot trace the model (message from ``tracing.trace``).
        RuntimeError: the fused model's output differs from the unfused one on ``example``.
    """
    pairs = _fusable_pairs(model)
    was = model.training
    model.eval()
    before = model(example)
    for bn, relu in pairs:
        model.get_submodule(bn).relu = True
        model.set_submodule(relu, ReLUFusedIntoBN(bn, model.get_submodule(relu).inplace))
    after = model(example)
    model.train(was)
    if not torch.equal(before, after):
        unfuse_bn_relu_(model)
        raise RuntimeError(
            f"fuse_bn_relu_: fusing {len(pairs)} BN+ReLU pairs changed {type(model).__name__}'s "
            f"output (max difference {float((before - after).abs().max()):.3g}); expected "
            "bitwise equality, so nothing was fused. Report this model."
        )
    return pairs


def unfuse_bn_relu_(model: nn.Module) -> int:
    """Undo ``fuse_bn_relu_``: put each ``nn.ReLU`` back and clear the BN's flag, in place.

    Returns:
        The number of ReLUs restored.
    """
    markers = [(n, m) for n, m in model.named_modules() if isinstance(m, ReLUFusedIntoBN)]
    for name, marker in markers:
        model.get_submodule(marker.bn_name).relu = False
        model.set_submodule(name, nn.ReLU(inplace=marker.inplace))
    return len(markers)


@contextlib.contextmanager
def fused_for_training(
    model: nn.Module, input_shape: Sequence[int], *, enabled: bool
) -> Iterator[list[tuple[str, str]]]:
    """Fuse ``model``'s BN+ReLU pairs inside the ``with`` block, unfuse on leaving it (errors too).

    The check example is a seeded random batch of ``input_shape``, drawn from its own generator
    so training's random state is untouched. A model fx cannot trace trains unfused.
    """
    pairs: list[tuple[str, str]] = []
    if enabled and any(isinstance(m, BoundedBatchNorm2d) for m in model.modules()):
        device = next(model.parameters()).device
        example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        try:
            pairs = fuse_bn_relu_(model, example.to(device))
        except GraphError as err:
            logger.info("training without BN+ReLU fusion: %s", err)
        logger.debug("fused %d BN+ReLU pairs for training", len(pairs))
    try:
        yield pairs
    finally:
        if pairs:
            unfuse_bn_relu_(model)
