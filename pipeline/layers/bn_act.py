"""BatchNorm subclasses: which ones recede understands, and what they apply after normalising.

Libraries subclass ``nn.BatchNorm2d`` to fuse an activation into the norm: timm's
``BatchNormAct2d`` computes ``act(drop(batch_norm(x)))`` inside its own ``forward``. recede keeps
such a layer whole (an fx leaf) and treats it as a BN followed by its *tail* (``drop``, ``act``):
the channel graph propagates the tail's effect on zero channels (a channel whose scale and
shift are zero emits ``act(0)``, a channel whose scale is zero emits ``act(beta)``), folding
keeps the tail as a module after the conv, and bounded conversion keeps it in a
``BoundedBatchNormAct2d``.

A subclass is understood only when its ``forward`` is one recede has read: the base class's
(a renamed BN), or one of ``NORM_ACT_FORWARDS`` (normalise, then ``self.drop``, then
``self.act``). Any other override may compute anything, so :func:`bn_tail` returns ``None``
and the graph pins it as a barrier. Exact or refuse.
"""

from __future__ import annotations

from torch import nn

from pipeline.layers.bounded_bn import BoundedBatchNorm2d

_PLAIN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, BoundedBatchNorm2d.forward)
# forward methods that compute exactly act(drop(batch_norm(x))), named module.qualname
NORM_ACT_FORWARDS = frozenset(
    {
        "timm.layers.norm_act.BatchNormAct2d.forward",
        "timm.layers.norm_act.SyncBatchNormAct.forward",
        "pipeline.layers.bn_act.BoundedBatchNormAct2d.forward",
    }
)


def _qualname(fn: object) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"


def bn_tail(bn: nn.Module) -> tuple[nn.Module, ...] | None:
    """The modules ``bn`` applies after normalising: () for a plain BN, (drop, act) for a
    norm-activation layer, ``None`` for a subclass whose ``forward`` recede does not know."""
    forward = type(bn).forward
    if forward in _PLAIN_FORWARDS:
        # a bounded BN built with a fused ReLU (relu=True, the kernels' fused op) applies it
        return (nn.ReLU(),) if getattr(bn, "relu", False) is True else ()
    if _qualname(forward) in NORM_ACT_FORWARDS:
        return tuple(
            m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None
        )
    return None


def tail_module(bn: nn.Module) -> nn.Module:
    """What replaces ``bn`` once its affine is folded into a conv: its tail, or ``nn.Identity``."""
    tail = bn_tail(bn)
    if tail is None:
        raise ValueError(
            f"{type(bn).__qualname__} overrides BatchNorm's forward in a way recede does not "
            "know; it cannot be folded"
        )
    return nn.Sequential(*tail) if tail else nn.Identity()


class BoundedBatchNormAct2d(BoundedBatchNorm2d):
    """Bounded BN followed by the ``drop`` and ``act`` of the norm-activation layer it replaced.

    State-dict keys match timm's ``BatchNormAct2d`` (``weight``, ``bias``, running statistics,
    ``drop.*``, ``act.*``), so a converted model reloads into a freshly converted copy.
    """

    def __init__(self, num_features: int, *, drop: nn.Module, act: nn.Module, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.drop = drop
        self.act = act

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def with_tail(bounded: BoundedBatchNorm2d, source: nn.Module) -> BoundedBatchNorm2d:
    """``bounded``, carrying ``source``'s drop and act when ``source`` is a norm-activation layer.

    Raises:
        ValueError: ``source`` is a BN subclass whose forward recede does not know.
    """
    tail = bn_tail(source)
    if tail is None:
        raise ValueError(
            f"{type(source).__qualname__} overrides BatchNorm's forward in a way recede does not "
            "know, so a bounded BN cannot stand in for it; use nn.BatchNorm2d or timm's "
            "BatchNormAct2d"
        )
    if not tail:
        return bounded
    out = BoundedBatchNormAct2d(
        bounded.num_features,
        drop=getattr(source, "drop", nn.Identity()),
        act=getattr(source, "act", nn.Identity()),
        eps=bounded.eps,
        momentum=bounded.momentum,
        shift=bounded.bias is not None,
    )
    out.load_state_dict(bounded.state_dict(), strict=False)  # drop/act keep their own state
    for name, param in bounded.named_parameters(recurse=False):  # a frozen one stays frozen
        getattr(out, name).requires_grad_(param.requires_grad)
    return out.to(bounded.weight.device).train(bounded.training)
