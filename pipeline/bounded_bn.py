"""Bounded BatchNorm: the scale is sigmoid(w), so channel importances live in (0, 1).

``BoundedBatchNorm2d`` normalises like ``nn.BatchNorm2d`` and multiplies by ``sigmoid(weight)``;
``weight`` holds the logit. The shift (``bias``) is off by default, as in the receding-importance
paper's reference code, so a channel's whole contribution is scaled by its importance.

``convert_to_bounded_bn_`` swaps every ``nn.BatchNorm2d`` for a freshly initialised bounded one.
It is meant for models trained from scratch: it does NOT preserve a trained model's function (the
learned gamma is discarded). Function-preserving conversion of trained models is a separate step.

``fuse_bn_relu_`` moves an ``nn.ReLU`` that only a bounded BN feeds into the BN (its ``relu``
flag; the ReLU becomes a ``ReLUFusedIntoBN`` identity), so training runs the fused BN+ReLU
kernel; ``unfuse_bn_relu_`` puts the ReLUs back, for pruning, folding and export.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kernels import bounded_bn as bn_kernel

logger = logging.getLogger(__name__)


class BoundedBatchNorm2d(nn.Module):
    """BatchNorm2d whose per-channel scale is ``sigmoid(weight)``.

    Buffers carry the same names as ``nn.BatchNorm2d`` (``running_mean``, ``running_var``,
    ``num_batches_tracked``) so state dicts line up. ``weight`` is the logit; ``bias`` is the
    optional shift beta (``None`` when ``shift=False``).

    Args:
        num_features: channels C of an (N, C, H, W) input.
        eps: added to the variance.
        momentum: running-stat momentum; ``None`` means a cumulative average.
        shift: learn a per-channel shift beta.
        init_logit: initial logit; 0 gives importance 0.5.
        backend: kernel backend for training mode ("auto", "torch", "triton").
        relu: apply a ReLU to the output (set by ``fuse_bn_relu_``); the output equals BN then
            ``F.relu`` exactly, in eval mode by computing just that.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        shift: bool = False,
        init_logit: float = 0.0,
        backend: str = "auto",
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.relu = relu
        self.eps = eps
        self.momentum = momentum
        self.backend = backend
        self.weight = nn.Parameter(torch.full((num_features,), float(init_logit)))
        self.bias = nn.Parameter(torch.zeros(num_features)) if shift else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @property
    def importance(self) -> torch.Tensor:
        """Per-channel importance sigmoid(w), detached."""
        return torch.sigmoid(self.weight.detach())

    def _momentum(self) -> float:
        if not self.training:
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"BoundedBatchNorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}"
            )
        return bn_kernel.bounded_batch_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            training=self.training,
            momentum=self._momentum(),
            eps=self.eps,
            relu=self.relu,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        fused = ", relu=True" if self.relu else ""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"shift={self.bias is not None}{fused}"
        )


def convert_to_bounded_bn_(
    model: nn.Module, *, shift: bool = False, init_logit: float = 0.0
) -> int:
    """Replace every ``nn.BatchNorm2d`` in ``model`` with a fresh ``BoundedBatchNorm2d``, in place.

    Returns:
        The number of layers replaced.
    """
    replaced = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            bounded = BoundedBatchNorm2d(
                child.num_features, child.eps, child.momentum, shift=shift, init_logit=init_logit
            )
            setattr(
                model, name, bounded.to(child.weight.device if child.weight is not None else "cpu")
            )
            replaced += 1
        else:
            replaced += convert_to_bounded_bn_(child, shift=shift, init_logit=init_logit)
    return replaced


def bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> BN module (plain or bounded) with a per-channel scale."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, BoundedBatchNorm2d)
        or (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine)
    }


def channel_importance(bn: nn.Module) -> torch.Tensor:
    """Importance of each channel of a BN: sigmoid(w) for bounded BN, |gamma| for plain BN."""
    if isinstance(bn, BoundedBatchNorm2d):
        return bn.importance
    return bn.weight.detach().abs()


@torch.no_grad()
def convert_to_plain_bn_(model: nn.Module) -> int:
    """Replace every ``BoundedBatchNorm2d`` by the ``nn.BatchNorm2d`` it equals, in place.

    gamma = sigmoid(w), beta = the shift (0 without one); running statistics are copied, so the
    function is unchanged in eval and train mode. For tools that know only ``nn.BatchNorm2d``.

    Returns:
        The number of layers replaced.
    """
    fused = [n for n, m in model.named_modules() if isinstance(m, BoundedBatchNorm2d) and m.relu]
    if fused:
        raise ValueError(
            f"convert_to_plain_bn_: {fused[0]!r} (BoundedBatchNorm2d) has a ReLU fused in, which "
            "nn.BatchNorm2d cannot carry; call pipeline.bounded_bn.unfuse_bn_relu_(model) first"
        )
    replaced = 0
    for name, child in list(model.named_children()):
        if isinstance(child, BoundedBatchNorm2d):
            plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum)
            plain.weight.copy_(child.importance)
            plain.bias.copy_(child.bias if child.bias is not None else torch.zeros(1))
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(plain, buffer).copy_(getattr(child, buffer))
            setattr(model, name, plain.to(child.weight.device).train(child.training))
            replaced += 1
        else:
            replaced += convert_to_plain_bn_(child)
    return replaced


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
    from pipeline.channel_graph import trace  # lazy: channel_graph imports this module

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
        ValueError: torch.fx cannot trace the model (message from ``channel_graph.trace``).
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
