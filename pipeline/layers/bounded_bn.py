"""Bounded BatchNorm: the scale is sigmoid(w), so channel importances live in (0, 1).

``BoundedBatchNorm2d`` normalises like ``nn.BatchNorm2d`` and multiplies by ``sigmoid(weight)``;
``weight`` holds the logit. The shift (``bias``) is off by default, as in the receding-importance
paper's reference code, so a channel's whole contribution is scaled by its importance.

This module holds the module class only; ``pipeline.layers.bn`` holds the BN helpers and conversions
(``convert_to_bounded_bn_``, ``convert_to_plain_bn_``), ``pipeline.layers.bn_act`` the activation tails.

``pipeline.train.fuse_relu`` sets the ``relu`` flag, so training runs the fused BN+ReLU kernel.
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
