"""Fold (bounded) BatchNorm into the preceding conv's weights and bias.

Modelled on ``torch.nn.utils.fusion``: a module-level wrapper that copies the model, refuses
training mode, finds conv -> BN pairs in the fx graph (the conv's output must feed only that BN),
and calls a pure-tensor core. Every fold is checked against the unfolded model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from pipeline.core.checks import Check, VerificationError, insensitivity_hint, on_twin
from pipeline.core.numerics import float_dtype, rel_err
from pipeline.core.output_checks import judge_trees
from pipeline.core.tolerance import Tolerance
from pipeline.graph.tracing import trace
from pipeline.layers.bn import bn_scale, is_bn
from pipeline.layers.bn_act import bn_tail, tail_module
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.layers.corrected_conv import (
    drop_kernel_,
    kernel_corrected,
    replace_corrections_,
    set_map_,
)

logger = logging.getLogger(__name__)


class FoldError(VerificationError):
    """Folding changed the model's outputs beyond tolerance (a failed verification: exit 1)."""


@dataclass(frozen=True)
class FoldReport:
    """Which BNs were folded into which convs, which stayed, and the verified error."""

    folded: tuple[tuple[str, str], ...]  # (conv, bn)
    kept: tuple[str, ...]
    max_abs_err: float
    max_rel_err: float
    check: Check | None = None  # the float64 folded-vs-unfolded check (None: not verified)


def fold_conv_bn_weights(
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure core: W' = W * k, b' = (b - mean) * k + shift with k = scale / sqrt(var + eps)."""
    k = scale / torch.sqrt(var + eps)  # (C_out,)
    w = conv_w * k.view(-1, *([1] * (conv_w.dim() - 1)))
    b = conv_b if conv_b is not None else torch.zeros_like(mean)
    b = (b - mean) * k
    return w, (b + shift) if shift is not None else b


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) qualified names where the conv's only consumer is that BN.

    A BN subclass counts only when ``pipeline.layers.bn_act`` knows its forward; its activation stays.
    """
    gm = trace(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(
            modules.get(node.target), (nn.BatchNorm2d, BoundedBatchNorm2d)
        ):
            continue
        src = node.args[0]
        if (
            getattr(src, "op", None) == "call_module"
            and isinstance(modules.get(src.target), nn.Conv2d)
            and len(src.users) == 1
            and len(node.args) == 1
            and bn_tail(modules[node.target]) is not None
        ):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_bn_(model: nn.Module) -> FoldReport:
    """Fold every foldable BN into its conv in place; a BN becomes ``nn.Identity``, or the
    activation it carried (``pipeline.layers.bn_act.tail_module``)."""
    if model.training:
        raise FoldError(
            "fold_bn_ needs an eval-mode model (batch statistics cannot be folded); call model.eval()"
        )
    fused = [n for n, m in model.named_modules() if getattr(m, "relu", False) is True]
    if fused:
        raise FoldError(
            f"fold_bn_: {fused[:3]} carry a fused ReLU (BoundedBatchNorm2d(relu=True)), which a "
            "folded conv cannot; call pipeline.train.fuse_relu.unfuse_bn_relu_(model) first"
        )
    modules = dict(model.named_modules())
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        w, b = fold_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn_scale(bn), bn.bias
        )
        conv.weight = nn.Parameter(w)
        conv.bias = nn.Parameter(b)
        k = bn_scale(bn) / torch.sqrt(bn.running_var + bn.eps)
        # constant-channel corrections scale like outputs
        replace_corrections_(conv, lambda t, k=k: t * k.view(-1, *([1] * (t.dim() - 1))))
        parent, _, leaf = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, tail_module(bn))
    folded_bns = {bn for _, bn in pairs}
    kept = tuple(n for n, m in modules.items() if is_bn(m) and n not in folded_bns)
    return FoldReport(tuple(pairs), kept, 0.0, 0.0)


# One fold tolerance for run, export and bench: polarised nets carry tiny BN scales into large
# weights, which amplifies fp32 rounding to ~1e-5 of the output scale (1e-5 failed run folders).
FOLD_RTOL = 1e-4


@torch.no_grad()
def fold_bn(
    model: nn.Module, example: torch.Tensor, *, rtol: float = FOLD_RTOL
) -> tuple[nn.Module, FoldReport]:
    """Folded copy of ``model``, verified on ``example`` to ``rtol`` of the output scale.

    The fold is computed and checked in float64, then cast to ``model``'s dtype: the check then
    measures the fold itself, not float32 rounding of a deep net's intermediate activations
    (which reached 3e-4 of the output scale on timm's untrained ``mobileone_s0``). Rounding of
    the deployed float32 graph is what the ONNX Runtime check measures. An untrained model whose
    check could not see a wrong model is folded and checked again on its calibrated twin
    (``pipeline.core.checks.on_twin``), as its export is.

    Raises:
        FoldError: the folded model (or its twin's) disagrees with the original beyond tolerance.
    """
    dtype = float_dtype(model)
    folded, report, check = _folded_and_checked(model, example, rtol)
    check = on_twin(check, model, example, lambda twin: _folded_and_checked(twin, example, rtol)[2])
    if check.verdict == "failed":
        raise FoldError(
            f"the folded model differs from the original, computed in float64 "
            f"(> {rtol:.0e} of the output scale): {check.cause}"
        )
    folded = folded.to(dtype)
    logger.info(
        "folded %d BN layers into convs, %d kept; %s", len(report.folded), len(report.kept),
        check.line(),
    )  # fmt: skip
    return folded, replace(report, check=check)


@torch.no_grad()
def _folded_and_checked(
    model: nn.Module, example: torch.Tensor, rtol: float
) -> tuple[nn.Module, FoldReport, Check]:
    """The float64 folded copy, its report and its check against the float64 original."""
    unfolded = copy.deepcopy(model.eval()).double()  # float64: numerics.float_dtype says why
    folded = copy.deepcopy(unfolded)
    report = fold_bn_(folded)
    ref, out = unfolded(example.double()), folded(example.double())
    check = judge_trees(
        "fold", [(ref, out)], Tolerance(rtol, 0.0, "fp64"), hint=insensitivity_hint(model)
    )  # a model with several outputs: each alone, the worst deciding
    errors = {"max_abs_err": check.max_abs_err, "max_rel_err": rel_err(out, ref)}
    return folded, replace(report, **errors), check


@dataclass(frozen=True)
class StaticReport:
    """What :func:`fold_corrections_` made of each kernel correction, and its verified error."""

    biases: tuple[str, ...]  # uniform at this size: added to the conv's bias
    maps: tuple[str, ...]  # position-dependent: a constant [C, H, W] added to the output
    max_rel_err: float  # static model vs the kernel form on the example


def input_sizes(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple]:
    """Spatial size of the input each named module sees on ``example``."""
    modules, sizes = dict(model.named_modules()), {}

    def record(name: str, args: tuple) -> None:  # a pre-hook returning a value replaces the input
        sizes.setdefault(name, tuple(args[0].shape[-2:]))

    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: record(n, a)) for n in names]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _to_constant_(conv: nn.Module, value: torch.Tensor) -> str:
    """Put a (1, C, H', W') correction into ``conv``'s bias when uniform, else its map."""
    if bool((value == value[..., :1, :1]).all()):  # exactly uniform: a plain bias is exact
        bias = value[0, :, 0, 0] if conv.bias is None else conv.bias.detach() + value[0, :, 0, 0]
        conv.bias = nn.Parameter(bias.clone())
        drop_kernel_(conv)  # a plain conv again unless it also holds a map
        return "bias"
    set_map_(conv, value[0])
    return "map"


@torch.no_grad()
def fold_corrections_(
    model: nn.Module, example: torch.Tensor, *, rtol: float = FOLD_RTOL
) -> StaticReport:
    """Replace every ``kernel`` correction by its value at ``example``'s size, in place.

    The kernel form (``pipeline.layers.corrected_conv``) is exact at any input size but runs a conv of a ones
    map per forward; an export at a fixed spatial size needs only its value there: a bias where
    that value is uniform over positions (no border reaches the output), else a constant map,
    which refuses other sizes. The graph then holds exactly one Conv per conv layer, without
    any simplifier. Checked against the kernel form on ``example``.

    Raises:
        FoldError: the static model differs from the kernel form beyond ``rtol``.
    """
    names = kernel_corrected(model)
    if not names:
        return StaticReport((), (), 0.0)
    model.eval()
    ref = model(example)
    sizes, modules = input_sizes(model, names, example), dict(model.named_modules())
    forms: dict[str, list[str]] = {"bias": [], "map": []}
    for name in names:
        conv = modules[name]
        probe = example.new_empty(1, conv.in_channels, *sizes[name])
        forms[_to_constant_(conv, conv.kernel_correction(probe))].append(name)
    out = model(example)
    rel = rel_err(out, ref)
    if rel > rtol:
        raise FoldError(
            f"static corrections differ from the kernel form by {rel:.2e} of the output scale "
            f"(> {rtol:.0e}); this is a bug, please report it"
        )
    logger.info(
        "static corrections: %d biases, %d maps; rel err %.2e",
        len(forms["bias"]),
        len(forms["map"]),
        rel,
    )
    return StaticReport(tuple(forms["bias"]), tuple(forms["map"]), rel)
