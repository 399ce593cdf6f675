"""Everything recede knows about a BatchNorm: its type, its scale, zeroing a channel, conversions.

A BN here is an affine ``torch.nn`` batch norm (any ``_BatchNorm``, including subclasses such as
timm's ``BatchNormAct2d``) or a ``BoundedBatchNorm2d``. Its per-channel *scale* is gamma for a
plain BN and ``sigmoid(w)`` for a bounded one; a channel's *importance* is the scale's magnitude.

``convert_to_bounded_bn_`` swaps every ``nn.BatchNorm2d`` for a freshly initialised bounded one.
It is meant for models trained from scratch: it does NOT preserve a trained model's function (the
learned gamma is discarded); ``pipeline.train.convert`` converts trained models exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.layers.bn_act import with_tail
from pipeline.layers.bounded_bn import BoundedBatchNorm2d

BN_TYPES = (nn.modules.batchnorm._BatchNorm, BoundedBatchNorm2d)
"""The module types that are a BN to recede (plain, subclassed or bounded)."""

ZERO_SCALE_LOGIT = -1000.0
"""Bounded-BN logit of a channel whose scale must be exactly zero.

``sigmoid(-1000)`` is exactly 0 in fp16, bf16, fp32 and fp64 (``exp(1000)`` overflows all of
them), so a zeroed channel emits exactly its shift and removing it stays exact. Unlike ``-inf``
the logit is finite: the receding penalty ``s(1 - log s)`` uses ``log s = -softplus(-w)``, which
is -1000 here, so its value and gradient are 0 instead of ``0 * inf = NaN``.
"""


def is_bn(m: nn.Module) -> bool:
    """Whether ``m`` is a BN (plain, subclassed or bounded), affine or not."""
    return isinstance(m, BN_TYPES)


def is_frozen(bn: nn.Module) -> bool:
    """Whether ``bn``'s scale is frozen (``requires_grad=False``): nothing recede does may move,
    replace or re-initialise it. A BN without a scale (``affine=False``) is not frozen."""
    return getattr(bn, "weight", None) is not None and not bn.weight.requires_grad


def bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> BN module (plain or bounded) with a per-channel scale."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, BoundedBatchNorm2d) or (is_bn(m) and m.affine)
    }


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """The per-channel scale a BN multiplies by: sigmoid(w) bounded, gamma (1 without affine) plain.

    Not detached: folding uses it inside ``no_grad``; importances use :func:`channel_importance`.
    """
    if isinstance(bn, BoundedBatchNorm2d):
        return torch.sigmoid(bn.weight)
    return bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)


def channel_importance(bn: nn.Module) -> torch.Tensor:
    """Importance of each channel of a BN: sigmoid(w) for bounded BN, |gamma| for plain BN."""
    return bn_scale(bn).detach().abs()


def zero_scale_(bn: nn.Module, channel: int) -> None:
    """Make the scale of one BN channel exactly zero (a finite logit for bounded BN)."""
    bn.weight[channel] = ZERO_SCALE_LOGIT if isinstance(bn, BoundedBatchNorm2d) else 0.0


def convert_to_bounded_bn_(
    model: nn.Module, *, shift: bool = False, init_logit: float = 0.0
) -> int:
    """Replace every ``nn.BatchNorm2d`` in ``model`` with a fresh ``BoundedBatchNorm2d``, in place.

    A norm-activation BN (timm's ``BatchNormAct2d``) keeps its activation. A BN whose scale is
    frozen (``requires_grad=False``) is kept as it is: a fresh trainable BN in its place would
    discard what the user froze. (A model factory that freezes it does so again when
    ``pipeline.models.checkpoint.load_pruned`` rebuilds the model, so the two agree.)

    Returns:
        The number of layers replaced.
    """
    replaced = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not is_frozen(child):
            bounded = with_tail(
                BoundedBatchNorm2d(
                    child.num_features,
                    child.eps,
                    child.momentum,
                    shift=shift,
                    init_logit=init_logit,
                ),
                child,
            )
            setattr(
                model, name, bounded.to(child.weight.device if child.weight is not None else "cpu")
            )
            replaced += 1
        else:
            replaced += convert_to_bounded_bn_(child, shift=shift, init_logit=init_logit)
    return replaced


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
            "nn.BatchNorm2d cannot carry; call pipeline.train.fuse_relu.unfuse_bn_relu_(model) first"
        )
    replaced = 0
    for name, child in list(model.named_children()):
        if isinstance(child, BoundedBatchNorm2d):
            plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum)
            plain.weight.copy_(child.importance)
            plain.bias.copy_(child.bias if child.bias is not None else torch.zeros(1))
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(plain, buffer).copy_(getattr(child, buffer))
            plain = plain.to(child.weight.device).train(child.training)
            if hasattr(child, "act"):  # BoundedBatchNormAct2d: keep its activation after the BN
                plain = nn.Sequential(plain, child.drop, child.act)
            setattr(model, name, plain)
            replaced += 1
        else:
            replaced += convert_to_plain_bn_(child)
    return replaced
