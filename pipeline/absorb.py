"""Remove channel groups exactly, absorbing the constant that a zero-scale channel still emits.

A BN channel whose scale is zero (ISTA drives gamma to exact zeros) outputs the constant beta,
so after its activation the channel carries ``act(beta)``, not zero. Dropping it naively
changes every consumer. Here every consumer conv/linear gets that contribution back exactly:

- ``kernel`` form (conv, constant uniform over positions): the correction is
  ``conv2d(ones(1, 1, H, W), W_eff)`` with ``W_eff = sum_d c_d W[:, d]``. Zero padding makes it
  smaller at the borders, and this reproduces that exactly at ANY input size.
- ``map`` form (conv, input-independent but position-dependent, e.g. after a zero-padded average
  pool): a per-position ``[C_out, H', W']`` buffer computed at the example's size; it becomes a
  constant Add in ONNX. Running another spatial size raises instead of silently drifting.
- ``bias`` form (linear heads, unpadded convs, and ``exact_borders=False``): added to the bias.
  With ``exact_borders=False`` the interior value is used (the ISTA paper's behaviour) and the
  largest border error it leaves is reported.

Groups whose readers see input-dependent values under a zero scale (an SE gate multiplies the
channel by a data-dependent gate) cannot be absorbed; they are removed under the zero mask
(scale and shift zeroed) and counted as ``approximate``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.bounded_bn import BoundedBatchNorm2d
from pipeline.channel_graph import ChannelGraph
from pipeline.prune import PruneError, PrunePlan, apply_plan_, make_plan, zero_scale_

logger = logging.getLogger(__name__)


class CorrectedConv2d(nn.Conv2d):
    """A Conv2d plus the exact contribution of removed constant input channels."""

    const_kernel: torch.Tensor | None
    const_map: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.const_kernel is not None:
            ones = torch.ones_like(x[:1, :1])  # (1, 1, H, W): zero padding shapes the borders
            y = y + F.conv2d(
                ones, self.const_kernel, None, self.stride, self.padding, self.dilation
            )
        if self.const_map is not None:
            if y.shape[-2:] != self.const_map.shape[-2:]:
                raise RuntimeError(
                    f"constant-channel correction was computed for a {tuple(self.const_map.shape[-2:])} output, got "
                    f"{tuple(y.shape[-2:])}; prune again with an example of the deployment input size"
                )
            y = y + self.const_map
        return y


def make_corrected_(
    conv: nn.Conv2d, *, kernel: torch.Tensor | None = None, map_: torch.Tensor | None = None
) -> None:
    """Turn ``conv`` into a ``CorrectedConv2d`` in place (parameters and name are kept)."""
    conv.__class__ = CorrectedConv2d
    for name, value in (("const_kernel", kernel), ("const_map", map_)):
        old = getattr(conv, name, None) if name in conv._buffers else None
        total = value if old is None else (old + value if value is not None else old)
        conv.register_buffer(name, total)


@dataclass(frozen=True)
class RemovalReport:
    """What an exact removal did and how exact it was."""

    absorbed_groups: int
    approximate_groups: int
    corrections: tuple[tuple[str, str], ...]  # (layer, "kernel" | "map" | "bias")
    max_border_err: float  # left by exact_borders=False
    zeroing_err: float  # output change from zeroing the scales (and approximate shifts)
    max_rel_err: float  # pruned vs the zeroed reference
    scale_bound: float  # max |scale * x_hat| of removed channels: per-channel change bound


def zero_scales_(
    model: nn.Module, graph: ChannelGraph, groups: set[int], *, shifts: set[int] = frozenset()
) -> None:
    """Set the BN scale of every channel in ``groups`` to exactly zero (and shift, for ``shifts``)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for g in graph.groups:
            if g.id not in groups:
                continue
            for name, c in g.bn_channels:
                bn = modules[name]
                zero_scale_(bn, c)
                if g.id in shifts and bn.bias is not None:
                    bn.bias[c] = 0.0


def _capture_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    modules, seen = dict(model.named_modules()), {}

    def record(
        name: str, args: tuple
    ) -> None:  # a pre-hook must return None or it replaces the input
        seen.setdefault(name, args[0].detach())

    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: record(n, a)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _correction(
    layer: nn.Module, xin: torch.Tensor, idx: list[int], exact: bool
) -> tuple[str, torch.Tensor, float]:
    """(form, tensor, border error) for the removed input channels ``idx`` of ``layer``."""
    masked = torch.zeros_like(xin)
    masked[:, idx] = xin[:, idx]
    if isinstance(layer, nn.Linear):
        return "bias", F.linear(masked, layer.weight)[0], 0.0
    full = F.conv2d(
        masked, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups
    )[0]
    centre = full[:, full.shape[1] // 2, full.shape[2] // 2]
    border = float((full - centre[:, None, None]).abs().max())
    if border == 0.0 or not exact:
        return "bias", centre, border
    uniform = bool((xin[0, idx] == xin[0, idx, :1, :1]).all())
    if uniform and layer.padding_mode == "zeros":
        cvec = masked[0, :, 0, 0].view(layer.groups, -1)  # (groups, in per group)
        group_of_out = torch.arange(layer.out_channels) // (layer.out_channels // layer.groups)
        w_eff = (layer.weight * cvec[group_of_out][:, :, None, None]).sum(1, keepdim=True)
        return "kernel", w_eff, 0.0
    return "map", full, 0.0


def _attach(layer: nn.Module, form: str, value: torch.Tensor, keep_out: list[int] | None) -> None:
    if keep_out is not None:
        value = value[keep_out]
    if form == "bias":
        bias = value if layer.bias is None else layer.bias.detach() + value.view(-1)
        layer.bias = nn.Parameter(bias.view(-1).clone())
    elif form == "kernel":
        make_corrected_(layer, kernel=value.clone())
    else:
        make_corrected_(layer, map_=value.clone())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def _scale_bound(
    model: nn.Module, graph: ChannelGraph, dropped: set[int], example: torch.Tensor
) -> float:
    """Largest |scale_c * x_hat_c| of the removed channels on ``example``.

    Zeroing a scale changes that BN channel by exactly this much, and by no more after any
    1-Lipschitz activation (ReLU, SiLU, GELU, sigmoid...): the bound for the epsilon case of
    bounded BN, where a scale below epsilon is treated as zero.
    """
    channels = [(n, c) for g in graph.groups if g.id in dropped for n, c in g.bn_channels]
    inputs = _capture_inputs(model, sorted({n for n, _ in channels}), example)
    modules, bound = dict(model.named_modules()), 0.0
    for name, c in channels:
        bn = modules[name]
        scale = (
            torch.sigmoid(bn.weight[c])
            if isinstance(bn, BoundedBatchNorm2d)
            else bn.weight[c].abs()
        )
        x_hat = (inputs[name][:, c] - bn.running_mean[c]) / torch.sqrt(bn.running_var[c] + bn.eps)
        bound = max(bound, float(scale * x_hat.abs().max()))
    return bound


def _absorb_(
    reference: nn.Module,
    pruned: nn.Module,
    readers: dict[str, list[int]],
    plan: PrunePlan,
    example: torch.Tensor,
    exact: bool,
) -> tuple[list[tuple[str, str]], float]:
    """Attach each reader's correction to ``pruned``; returns (corrections, border error)."""
    a, b = example[:1], torch.flip(example[:1], dims=(-1,)) * 0.5 + 0.3
    inputs, other = (
        _capture_inputs(reference, list(readers), a),
        _capture_inputs(reference, list(readers), b),
    )
    keep_out = {l.name: list(l.keep_out) for l in plan.layers}
    originals, modules = dict(reference.named_modules()), dict(pruned.named_modules())
    corrections, border = [], 0.0
    for name, idx in readers.items():
        if not torch.allclose(inputs[name][:, idx], other[name][:, idx], atol=1e-6):
            raise PruneError(
                f"{name} reads removed channels whose value depends on the input; "
                "the channel graph marked them absorbable wrongly (please report)"
            )
        form, value, err = _correction(originals[name], inputs[name], idx, exact)
        border = max(border, err)
        if float(value.abs().max()) > 0:
            _attach(modules[name], form, value, keep_out.get(name))
            corrections.append((name, form))
    return corrections, border


@torch.no_grad()
def remove_groups(
    model: nn.Module,
    graph: ChannelGraph,
    dropped: set[int],
    example: torch.Tensor,
    *,
    exact_borders: bool = True,
    plan: PrunePlan | None = None,
) -> tuple[nn.Module, PrunePlan, RemovalReport]:
    """Physically remove ``dropped`` groups from a copy of ``model``, absorbing their constants.

    The reference is ``model`` with the dropped groups' BN scales set to zero (and, for groups that
    cannot be absorbed, their shifts too). The pruned copy is verified against it on ``example``.

    Raises:
        PruneError: a dropped group is neither prunable nor absorbable, or verification failed.
    """
    by_id = {g.id: g for g in graph.groups}
    bad = sorted(g for g in dropped if not (by_id[g].prunable or by_id[g].absorbable))
    if bad:
        raise PruneError(f"groups {bad[:10]} cannot be removed exactly ({by_id[bad[0]].reason})")
    approximate = {g for g in dropped if not by_id[g].absorbable}
    model = model.eval()
    reference = copy.deepcopy(model)
    zero_scales_(reference, graph, set(dropped), shifts=approximate)
    plan = plan or make_plan(graph, dropped)
    pruned = apply_plan_(copy.deepcopy(reference), plan)
    corrections, border = _absorb_(
        reference, pruned, graph.readers(set(dropped)), plan, example, exact_borders
    )
    ref_out = reference(example)
    report = RemovalReport(
        len(dropped) - len(approximate),
        len(approximate),
        tuple(corrections),
        border,
        _rel_err(ref_out, model(example)),
        _rel_err(pruned(example), ref_out),
        _scale_bound(model, graph, set(dropped), example),
    )
    if exact_borders and report.max_rel_err > 1e-4:
        raise PruneError(
            f"pruned model differs from the zeroed reference by {report.max_rel_err:.2e} of the "
            "output scale; this is a bug in constant absorption, please report it"
        )
    logger.info(
        "removed %d groups (%d absorbed exactly, %d approximate), %d corrections; rel err %.2e; "
        "zeroing changed outputs by %.2e (scale bound %.2e)",
        len(dropped),
        report.absorbed_groups,
        len(approximate),
        len(corrections),
        report.max_rel_err,
        report.zeroing_err,
        report.scale_bound,
    )
    return pruned, plan, report
