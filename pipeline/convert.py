"""Convert a trained model's BatchNorm to bounded BN while keeping its function.

Bounded BN's scale is sigmoid(w), in (0, 1), so a trained gamma outside that range must go
somewhere else. Per BN channel c with gamma_c:

1. Sign: a negative gamma is made positive by negating the channel in the conv that feeds only
   this BN (its weights, bias and the BN's running mean), since gamma * x_hat = (-gamma) * (-x_hat).
2. Magnitude: a scale above ``max_scale`` keeps ``max_scale`` and the factor
   ``alpha_c = |gamma_c| / max_scale`` moves out of the BN, in the spirit of the gamma/W rescaling
   trick, by one of two routes:
   - ``readers``: the shift becomes beta/alpha and every reader's weights for that channel are
     multiplied by alpha. Exact through positively homogeneous ops (ReLU, pooling); tried first
     and verified numerically, and undone if the outputs move.
   - ``variance``: running_var' = (var + eps) / alpha^2 - eps, so the normalisation itself
     carries alpha. Always exact in eval mode (and used under residual adds), but in training
     mode batch statistics replace it, so the first fine-tuning steps see the bounded scale.
A gamma of exactly 0 becomes the finite logit ``ZERO_SCALE_LOGIT`` (scale exactly 0, no NaN in
the receding penalty, which a logit of -inf would give).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.bounded_bn import BoundedBatchNorm2d
from pipeline.channel_graph import build_channel_graph
from pipeline.fold import conv_bn_pairs
from pipeline.prune import ZERO_SCALE_LOGIT

logger = logging.getLogger(__name__)


class ConversionError(ValueError):
    """A BN cannot be converted exactly; the message names the layer and why."""


@dataclass(frozen=True)
class ConversionReport:
    """How each BN was converted and how exact the result is."""

    readers: tuple[str, ...]
    variance: tuple[str, ...]
    flipped_channels: int
    max_rel_err: float


def _bounded_from(
    bn: nn.BatchNorm2d, scale: torch.Tensor, shift: torch.Tensor, var: torch.Tensor
) -> BoundedBatchNorm2d:
    out = BoundedBatchNorm2d(bn.num_features, bn.eps, bn.momentum, shift=True)
    with torch.no_grad():
        logit = torch.logit(scale.clamp(0, 1))
        out.weight.copy_(torch.where(scale > 0, logit, ZERO_SCALE_LOGIT))  # finite: no NaN penalty
        out.bias.copy_(shift)
        out.running_mean.copy_(bn.running_mean)
        out.running_var.copy_(var)
        out.num_batches_tracked.copy_(bn.num_batches_tracked)
    return out.train(bn.training)


def _flip_negative_(
    model: nn.Module, conv_of: dict[str, str], name: str, bn: nn.BatchNorm2d
) -> int:
    neg = bn.weight < 0
    if not bool(neg.any()):
        return 0
    if name not in conv_of:
        raise ConversionError(
            f"{name}: {int(neg.sum())} negative gammas, and no conv feeds only this BN to take "
            "the sign; bounded BN cannot represent a negative scale here"
        )
    conv = model.get_submodule(conv_of[name])
    with torch.no_grad():
        conv.weight[neg] *= -1
        if conv.bias is not None:
            conv.bias[neg] *= -1
        bn.running_mean[neg] *= -1
        bn.weight[neg] *= -1
    return int(neg.sum())


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return float((a - b).abs().max()) <= rtol * max(float(b.abs().max()), 1e-12)


def _reader_factors(
    graph, name: str, alpha: torch.Tensor
) -> list[tuple[str, list[int], torch.Tensor]]:
    """(reader, input positions, alpha of the BN channel at each position) for a BN's readers."""
    channel_of = {g: c for c, g in enumerate(graph.layers[name].out_groups)}
    out = []
    for r, pos in graph.readers(set(channel_of)).items():
        out.append((r, pos, alpha[[channel_of[graph.layers[r].in_groups[p]] for p in pos]]))
    return out


@torch.no_grad()
def _move_into_readers_(model, graph, name, bn, alpha, scale, reference, example, rtol) -> bool:
    """Try the readers route for one BN; keep it only if the model output is unchanged."""
    if name not in graph.layers:
        return False
    readers = _reader_factors(graph, name, alpha)
    layers = [model.get_submodule(r) for r, _, _ in readers]
    if not readers or any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in layers):
        return False
    _set(model, name, _bounded_from(bn, scale, bn.bias.detach() / alpha, bn.running_var.detach()))
    for m, (_, pos, f) in zip(layers, readers, strict=True):
        m.weight[:, pos] *= f.view(-1, *[1] * (m.weight.dim() - 2))
    if _close(model(example), reference, rtol):
        return True
    for m, (_, pos, f) in zip(layers, readers, strict=True):  # not homogeneous on the way: undo
        m.weight[:, pos] /= f.view(-1, *[1] * (m.weight.dim() - 2))
    _set(model, name, bn)
    return False


@torch.no_grad()
def convert_trained_to_bounded_(
    model: nn.Module, example: torch.Tensor, *, max_scale: float = 0.99, rtol: float = 1e-5
) -> ConversionReport:
    """Replace every affine ``nn.BatchNorm2d`` of an eval-mode ``model`` by an equivalent bounded BN.

    Raises:
        ConversionError: a BN cannot be converted exactly, or the result disagrees beyond ``rtol``.
    """
    model.eval()
    reference = copy.deepcopy(model)(example)
    graph = build_channel_graph(model, example)
    conv_of = {bn: conv for conv, bn in conv_bn_pairs(model)}
    by_readers, by_variance, flipped = [], [], 0
    for name, bn in [
        (n, m) for n, m in model.named_modules() if type(m) is nn.BatchNorm2d and m.affine
    ]:
        flipped += _flip_negative_(model, conv_of, name, bn)
        gamma, beta, var = bn.weight.detach(), bn.bias.detach(), bn.running_var.detach()
        alpha = torch.where(gamma > max_scale, gamma / max_scale, torch.ones_like(gamma))
        scale = gamma / alpha
        if _move_into_readers_(model, graph, name, bn, alpha, scale, reference, example, rtol):
            by_readers.append(name)
            continue
        new_var = (var + bn.eps) / alpha**2 - bn.eps
        if bool((new_var < 0).any()):
            raise ConversionError(
                f"{name}: gamma up to {float(gamma.max()):.3g} is too large to move into the "
                f"variance (eps={bn.eps}); lower max_scale or retrain with smaller gamma"
            )
        _set(model, name, _bounded_from(bn, scale, beta, new_var))
        by_variance.append(name)
    err = float((model(example) - reference).abs().max()) / max(float(reference.abs().max()), 1e-12)
    if err > rtol:
        raise ConversionError(
            f"converted model differs by {err:.2e} of the output scale (> {rtol:.0e})"
        )
    logger.info(
        "converted %d BNs to bounded BN (%d via readers, %d via variance, %d channels sign-flipped); "
        "rel err %.2e",
        len(by_readers) + len(by_variance),
        len(by_readers),
        len(by_variance),
        flipped,
        err,
    )
    return ConversionReport(tuple(by_readers), tuple(by_variance), flipped, err)
