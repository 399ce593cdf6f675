"""Remove channel groups exactly, absorbing the constant that a zero-scale channel still emits.

A BN channel whose scale is zero (ISTA drives gamma to exact zeros) outputs the constant beta,
so after its activation the channel carries ``act(beta)``, not zero. Dropping it naively
changes every consumer. Here every consumer conv/linear gets that contribution back exactly:

The form follows from the reader's structure, not from what one example's border shows (a 1x1
output has no border, yet its zero padding shapes it at every other size):

- ``kernel`` form (zero-padded conv, constant uniform over positions): the correction is
  ``conv2d(ones(1, 1, H, W), W_eff)`` with ``W_eff = sum_d c_d W[:, d]``. Zero padding makes it
  smaller at the borders, and this reproduces that exactly at ANY input size.
- ``bias`` form (linear heads, unpadded convs, reflect/replicate/circular padding, which keep a
  constant constant, and ``exact_borders=False``): the interior value ``sum W_eff`` is added to
  the bias. With ``exact_borders=False`` on a zero-padded reader this is the ISTA paper's
  behaviour, and the largest border error it leaves is reported.
- ``map`` form (conv, input-independent but position-dependent, e.g. after a zero-padded average
  pool): a per-position ``[C_out, H', W']`` buffer computed at the example's size; it becomes a
  constant Add in ONNX. Running another spatial size raises instead of silently drifting.

Uniformity is checked on the example and on a larger input (a 1x1 map is trivially uniform),
and the result is verified at both sizes wherever the model runs at the larger one.

Groups whose readers see input-dependent values under a zero scale (an SE gate multiplies the
channel by a data-dependent gate) cannot be absorbed; they are removed under the zero mask
(scale and shift zeroed) and counted as ``approximate``.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.bounded_bn import BoundedBatchNorm2d
from pipeline.channel_graph import ChannelGraph
from pipeline.prune import PruneError, PrunePlan, apply_plan_, make_plan, zero_scale_

logger = logging.getLogger(__name__)


class CorrectedConv2d(nn.Conv2d):
    """A Conv2d plus the exact contribution of removed constant input channels.

    The ``kernel`` correction depends only on the input's spatial size, so it is computed once
    per (H, W, device, dtype) and cached outside the state dict; later calls at that size add a
    stored tensor and run no extra conv. The cache is rebuilt whenever ``const_kernel`` is
    replaced or changed in place (folding, rescaling, pruning again).
    """

    const_kernel: torch.Tensor | None
    const_map: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.const_kernel is not None:
            y = y + self.kernel_correction(x)
        if self.const_map is not None:
            if not torch.jit.is_tracing() and y.shape[-2:] != self.const_map.shape[-2:]:
                raise RuntimeError(
                    f"constant-channel correction was computed for a {tuple(self.const_map.shape[-2:])} output, got "
                    f"{tuple(y.shape[-2:])}; prune again with an example of the deployment input size"
                )
            y = y + self.const_map
        return y

    def kernel_correction(self, x: torch.Tensor) -> torch.Tensor:
        """``conv2d(ones(1, 1, H, W), const_kernel)`` for ``x``'s size: (1, C_out, H', W')."""
        kernel = self.const_kernel
        cache = self.__dict__.get("_correction_cache")
        if cache is None or cache[0] is not kernel or cache[1] != kernel._version:
            cache = (kernel, kernel._version, {})  # holding the kernel keeps its id unique
            self.__dict__["_correction_cache"] = cache
        key = (int(x.shape[-2]), int(x.shape[-1]), x.device, x.dtype)
        if key not in cache[2]:
            ones = torch.ones(1, 1, *key[:2], device=x.device, dtype=x.dtype)
            with torch.no_grad():  # zero padding shapes the borders
                cache[2][key] = F.conv2d(
                    ones, kernel, None, self.stride, self.padding, self.dilation
                )
        return cache[2][key]


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
    other_size_rel_err: float = 0.0  # pruned vs reference at a larger input size, where it runs


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


def _zero_padded(layer: nn.Conv2d) -> bool:
    """Whether ``layer`` pads with zeros, so that a constant input shrinks at its borders.

    Reflect, replicate and circular padding of a constant map is that constant again.
    """
    if layer.padding_mode != "zeros":
        return False
    if isinstance(layer.padding, str):  # "valid" or "same"
        return layer.padding == "same" and any(k > 1 for k in layer.kernel_size)
    return any(p > 0 for p in layer.padding)


def _effective_kernel(layer: nn.Conv2d, const: torch.Tensor) -> torch.Tensor:
    """``sum_d const_d W[:, d]`` per output channel: (C_out, 1, kh, kw); ``const``: (C_in,)."""
    cvec = const.view(layer.groups, -1)  # (groups, in per group)
    group_of_out = torch.arange(layer.out_channels) // (layer.out_channels // layer.groups)
    return (layer.weight * cvec[group_of_out][:, :, None, None]).sum(1, keepdim=True)


def _correction(
    layer: nn.Module, xin: torch.Tensor, idx: list[int], exact: bool, uniform: bool
) -> tuple[str, torch.Tensor, float]:
    """(form, tensor, border error) for the removed input channels ``idx`` of ``layer``.

    The form follows from the layer's structure, never from the example's border: a 1x1 output
    has no border to look at, yet its zero padding still shapes it. ``uniform``: the removed
    channels hold one value per channel at every position (and every input size).
    """
    masked = torch.zeros_like(xin)
    masked[:, idx] = xin[:, idx]
    if isinstance(layer, nn.Linear):
        return "bias", F.linear(masked, layer.weight)[0], 0.0
    full = layer._conv_forward(masked, layer.weight, None)[0]  # the layer's own padding mode
    if not uniform:  # position-dependent constants: exact at this size, refused at others
        return "map", full, 0.0
    w_eff = _effective_kernel(layer, masked[0, :, 0, 0])
    interior = w_eff.sum((1, 2, 3))  # where the window sees no padding
    if not _zero_padded(layer):
        return "bias", interior, 0.0
    if exact:
        return "kernel", w_eff, 0.0
    return "bias", interior, float((full - interior[:, None, None]).abs().max())


def _uniform(captures: list[dict[str, torch.Tensor]], name: str, idx: list[int]) -> bool:
    """Whether channels ``idx`` of ``name``'s input are spatially uniform in every capture."""
    for seen in captures:
        x = seen.get(name)
        if x is None or x.dim() != 4:
            continue
        x = x[0, idx]  # (len(idx), H, W)
        tol = 1e-6 * max(float(x.abs().max()), 1e-30)  # pooling sums may differ in the last ulp
        if float((x - x[:, :1, :1]).abs().max()) > tol:
            return False
    return True


def _larger(example: torch.Tensor) -> torch.Tensor | None:
    """A batch-1 input at least twice (and at least 8 px) larger: a size with an interior."""
    if example.dim() != 4:
        return None
    h, w = example.shape[-2:]
    k = max(2, math.ceil(8 / min(h, w)))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, example.shape[1], h * k, w * k, generator=gen, dtype=example.dtype)
    return x.to(example.device)


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


def _capture_if_runs(
    model: nn.Module, names: list[str], x: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Like ``_capture_inputs``, but ``{}`` when ``x`` is None or the model cannot run at its size.

    A model that rejects another size (a flatten before a linear head) never meets it, so there
    is nothing to be exact about there.
    """
    if x is None:
        return {}
    try:
        return _capture_inputs(model, names, x)
    except (RuntimeError, ValueError) as err:
        logger.debug("model does not run at %s (%s); checking one size only", tuple(x.shape), err)
        return {}


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
    larger = _capture_if_runs(reference, list(readers), _larger(example))
    keep_out = {l.name: list(l.keep_out) for l in plan.layers}
    originals, modules = dict(reference.named_modules()), dict(pruned.named_modules())
    corrections, border = [], 0.0
    for name, idx in readers.items():
        if not torch.allclose(inputs[name][:, idx], other[name][:, idx], atol=1e-6):
            raise PruneError(
                f"{name} reads removed channels whose value depends on the input; "
                "the channel graph marked them absorbable wrongly (please report)"
            )
        uniform = _uniform([inputs, larger], name, idx)
        form, value, err = _correction(originals[name], inputs[name], idx, exact, uniform)
        border = max(border, err)
        if float(value.abs().max()) > 0:
            _attach(modules[name], form, value, keep_out.get(name))
            corrections.append((name, form))
    return corrections, border


def _other_size_err(reference: nn.Module, pruned: nn.Module, x: torch.Tensor | None) -> float:
    """Relative error at a second input size; 0 where the models do not run there.

    ``map`` corrections refuse other sizes by design (a RuntimeError), which is not an error.
    """
    if x is None:
        return 0.0
    try:
        ref = reference(x)
        out = pruned(x)
    except (RuntimeError, ValueError):
        return 0.0
    return _rel_err(out, ref)


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
        _other_size_err(reference, pruned, _larger(example)),
    )
    if exact_borders:
        _check_exact(report, example)
    logger.info(
        "removed %d groups (%d absorbed exactly, %d approximate), %d corrections; rel err %.2e "
        "(%.2e at a larger size); zeroing changed outputs by %.2e (scale bound %.2e)",
        len(dropped),
        report.absorbed_groups,
        len(approximate),
        len(corrections),
        report.max_rel_err,
        report.other_size_rel_err,
        report.zeroing_err,
        report.scale_bound,
    )
    return pruned, plan, report


def _check_exact(report: RemovalReport, example: torch.Tensor) -> None:
    """Raise unless the pruned model matched the zeroed reference at both checked sizes."""
    for err, where in (
        (report.max_rel_err, f"on the example {tuple(example.shape)}"),
        (report.other_size_rel_err, "at a larger input size"),
    ):
        if err > 1e-4:
            raise PruneError(
                f"pruned model differs from the zeroed reference by {err:.2e} of the output scale "
                f"{where} (expected <= 1e-4); this is a bug in constant absorption, please report "
                "it (prune.exact_borders=false removes it approximately meanwhile)"
            )
