"""Convert a trained model's BatchNorm to bounded BN while keeping its function.

Bounded BN's scale is sigmoid(w), in (0, 1), so a trained gamma outside that range must go
somewhere else. Per BN channel c with gamma_c:

1. Sign: a negative gamma is made positive by negating the channel in the conv that feeds only
   this BN (its weights, bias, the constant corrections a prune left on it, and the BN's running
   mean), since gamma * x_hat = (-gamma) * (-x_hat).
2. Magnitude: a scale above ``max_scale`` keeps ``max_scale`` and the factor
   ``alpha_c = |gamma_c| / max_scale`` moves out of the BN, in the spirit of the gamma/W rescaling
   trick, by one of two routes:
   - ``readers``: the shift becomes beta/alpha and every reader's weights for that channel are
     multiplied by alpha. Exact on every input when each path from the BN to its readers is
     positively homogeneous (ReLU, max/avg pooling, reshapes: f(a x) = a f(x) for a > 0), which
     ``positively_homogeneous_bns`` decides from the graph's op types. A clipping activation
     (ReLU6, Hardtanh) is homogeneous only below its clip, so it takes the variance route: a
     numeric check on one example would pass whenever the example stays below the clip.
   - ``producer``: where a conv feeds only this BN, its weights, bias and constant corrections
     and the BN's running mean are multiplied by alpha, so the normalised input carries it.
   - ``variance``: otherwise running_var' = (var + eps) / alpha^2 - eps, so the normalisation
     itself carries alpha; refused where that would be negative (var < eps (alpha^2 - 1)).
   Both are exact in eval mode on every input (and are used under residual adds and clipping
   activations), but in training mode batch statistics replace the running ones, so the first
   fine-tuning steps see the bounded scale.
A gamma of exactly 0 becomes the finite logit ``ZERO_SCALE_LOGIT`` (scale exactly 0, no NaN in
the receding penalty, which a logit of -inf would give).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.fold.batchnorm import conv_bn_pairs
from pipeline.graph.channel_graph import build_channel_graph, positively_homogeneous_bns
from pipeline.graph.rescale import outputs_changed_by, probe_inputs, reader_factors, scale_readers_
from pipeline.layers.bn import ZERO_SCALE_LOGIT
from pipeline.layers.bn_act import bn_tail, with_tail
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.layers.corrected_conv import scale_corrections_

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
    producer: tuple[str, ...] = ()


def _bounded_from(
    bn: nn.BatchNorm2d, scale: torch.Tensor, shift: torch.Tensor, var: torch.Tensor
) -> BoundedBatchNorm2d:
    out = BoundedBatchNorm2d(bn.num_features, bn.eps, bn.momentum, shift=True)
    out = out.to(
        device=bn.running_mean.device, dtype=bn.running_mean.dtype
    )  # a float64 model stays so
    with torch.no_grad():
        logit = torch.logit(scale.clamp(0, 1))
        out.weight.copy_(torch.where(scale > 0, logit, ZERO_SCALE_LOGIT))  # finite: no NaN penalty
        out.bias.copy_(shift)
        out.running_mean.copy_(bn.running_mean)
        out.running_var.copy_(var)
        out.num_batches_tracked.copy_(bn.num_batches_tracked)
    out.weight.requires_grad_(bn.weight.requires_grad)  # a frozen BN stays frozen
    out.bias.requires_grad_(bn.bias.requires_grad)
    return with_tail(out.train(bn.training), bn)  # a norm-activation layer keeps its act


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
        # a pruned conv also adds its removed inputs' constants: they are outputs too
        scale_corrections_(conv, torch.where(neg, -1.0, 1.0).to(bn.weight.dtype))
        bn.running_mean[neg] *= -1
        bn.weight[neg] *= -1
    return int(neg.sum())


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _verify(model: nn.Module, original: nn.Module, example: torch.Tensor, rtol: float) -> float:
    """Largest relative error on ``example`` and on 3x it (past the clip of ReLU6-like ops).

    Compared in float64 on copies: a network that responds to its input also amplifies fp32
    rounding (1e-5 of the output on a calibrated mobilenet_v2), which would fake or hide errors.
    """
    model64, original64 = copy.deepcopy(model).double(), copy.deepcopy(original).double()
    inputs = probe_inputs(example.double())
    err = outputs_changed_by(model64, inputs, [original64(x) for x in inputs], floor=1e-300)
    if err > rtol:
        raise ConversionError(
            f"converted model differs by {err:.2e} of the output scale in float64 (expected <= "
            f"{rtol:.0e}); this is a bug in BN conversion, please report it with the model"
        )
    return err


@torch.no_grad()
def _move_into_readers_(model, graph, name, bn, alpha, scale) -> None:
    """The readers route for one BN whose paths to its readers are positively homogeneous."""
    readers = reader_factors(graph, name, alpha)
    _set(model, name, _bounded_from(bn, scale, bn.bias.detach() / alpha, bn.running_var.detach()))
    scale_readers_(model, readers)


@torch.no_grad()
def _move_into_producer_(model, conv_name, name, bn, alpha, scale) -> None:
    """The producer route: the conv feeding only this BN outputs alpha times more, as does its mean."""
    conv = model.get_submodule(conv_name)
    conv.weight *= alpha.view(-1, *[1] * (conv.weight.dim() - 1))
    if conv.bias is not None:  # with the corrections: everything the conv adds to its output
        conv.bias.mul_(alpha)
    scale_corrections_(conv, alpha)
    bounded = _bounded_from(bn, scale, bn.bias.detach(), bn.running_var.detach())
    bounded.running_mean.mul_(alpha)
    _set(model, name, bounded)


def _move_into_variance_(model, name, bn, alpha, scale) -> None:
    """The variance route: running_var' = (var + eps) / alpha^2 - eps."""
    new_var = (bn.running_var.detach() + bn.eps) / alpha**2 - bn.eps
    if bool((new_var < 0).any()):
        c = int((new_var < 0).nonzero()[0])
        raise ConversionError(
            f"{name}: channel {c} has gamma {float(bn.weight[c]):.3g} but running_var "
            f"{float(bn.running_var[c]):.3g}, too small to carry the factor "
            f"{float(alpha[c]):.3g} (needs var >= eps * (alpha^2 - 1), eps={bn.eps}), and no conv "
            "feeds only this BN to carry it instead; raise max_scale or retrain with smaller gamma"
        )
    _set(model, name, _bounded_from(bn, scale, bn.bias.detach(), new_var))


@torch.no_grad()
def convert_trained_to_bounded_(
    model: nn.Module, example: torch.Tensor, *, max_scale: float = 0.99, rtol: float = 1e-5
) -> ConversionReport:
    """Replace every affine ``nn.BatchNorm2d`` of an eval-mode ``model`` by an equivalent bounded BN.

    Norm-activation subclasses (timm's ``BatchNormAct2d``) become ``BoundedBatchNormAct2d`` with
    the same activation; a subclass whose forward recede does not know is left as it is.

    Raises:
        ConversionError: a BN cannot be converted exactly, or the result disagrees beyond ``rtol``.
    """
    model.eval()
    original = copy.deepcopy(model)
    graph = build_channel_graph(model, example)
    homogeneous = positively_homogeneous_bns(model) & set(graph.layers)
    conv_of = {bn: conv for conv, bn in conv_bn_pairs(model)}
    by_readers, by_producer, by_variance, flipped = [], [], [], 0
    for name, bn in [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.affine and bn_tail(m) is not None
    ]:
        flipped += _flip_negative_(model, conv_of, name, bn)
        gamma = bn.weight.detach()
        alpha = torch.where(gamma > max_scale, gamma / max_scale, torch.ones_like(gamma))
        scale = gamma / alpha
        if name in homogeneous:
            _move_into_readers_(model, graph, name, bn, alpha, scale)
            by_readers.append(name)
        elif name in conv_of:
            _move_into_producer_(model, conv_of[name], name, bn, alpha, scale)
            by_producer.append(name)
        else:
            _move_into_variance_(model, name, bn, alpha, scale)
            by_variance.append(name)
    err = _verify(model, original, example, rtol)
    logger.info(
        "converted %d BNs to bounded BN (%d via readers, %d via producer, %d via variance, "
        "%d channels sign-flipped); rel err %.2e",
        len(by_readers) + len(by_producer) + len(by_variance),
        len(by_readers),
        len(by_producer),
        len(by_variance),
        flipped,
        err,
    )
    return ConversionReport(tuple(by_readers), tuple(by_variance), flipped, err, tuple(by_producer))
