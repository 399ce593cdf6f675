"""Apply a plan: slice the planned channels out of the model, absorbing the constants they emit.

Applying a plan slices conv/linear weights and BN entries in place; it never re-creates module
objects, so hooks, names and the model class survive. :func:`remove_groups` is the exact
removal: the reference is the model with the dropped groups' BN scales zeroed
(:func:`zero_groups_`), the constants those channels still emit are absorbed into their readers
(``pipeline.prune.absorb``), and the pruned copy is verified against the reference.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.checks import Check, VerificationError, insensitivity_hint
from pipeline.core.numerics import float_dtype, rel_err
from pipeline.core.output_checks import judge_trees
from pipeline.core.tolerance import Tolerance
from pipeline.graph.channel_graph import ChannelGraph
from pipeline.layers.bn import zero_scale_
from pipeline.layers.corrected_conv import replace_corrections_
from pipeline.prune.absorb import absorb_, larger_input, scale_bound
from pipeline.prune.plan import LayerPlan, PruneError, PrunePlan

logger = logging.getLogger(__name__)


def _index(t: torch.Tensor | None, keep: list[int], dim: int = 0) -> torch.Tensor | None:
    return (
        None
        if t is None
        else t.detach()
        .index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))
        .clone()
    )


def _set_param(m: nn.Module, name: str, value: torch.Tensor | None) -> None:
    old = getattr(m, name)
    if value is None or old is None:
        return
    if isinstance(old, nn.Parameter):
        setattr(m, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(m, name, value)


def _prune_conv(m: nn.Conv2d, plan: LayerPlan) -> None:
    keep_out, keep_in = list(plan.keep_out), list(plan.keep_in)
    g, cin, cout = m.groups, m.in_channels, m.out_channels
    weight = _index(m.weight, keep_out)
    if g == cin == cout:  # depthwise: groups shrink with the channels
        if keep_in != keep_out:
            raise PruneError(f"{plan.name}: depthwise conv must keep the same in and out channels")
        m.groups = len(keep_out)
    elif g > 1:
        ipg = cin // g
        within = [j for j in keep_in if j < ipg]
        if keep_in != [k * ipg + j for k in range(g) for j in within]:
            raise PruneError(f"{plan.name}: grouped conv lost uneven input channels across groups")
        weight = _index(weight, within, dim=1)
    else:
        weight = _index(weight, keep_in, dim=1)
    _set_param(m, "weight", weight)
    _set_param(m, "bias", _index(m.bias, keep_out))
    replace_corrections_(m, lambda t: _index(t, keep_out))  # corrections are per output
    m.in_channels, m.out_channels = len(keep_in), len(keep_out)


def _prune_linear(m: nn.Linear, plan: LayerPlan) -> None:
    _set_param(
        m, "weight", _index(_index(m.weight, list(plan.keep_out)), list(plan.keep_in), dim=1)
    )
    _set_param(m, "bias", _index(m.bias, list(plan.keep_out)))
    m.in_features, m.out_features = len(plan.keep_in), len(plan.keep_out)


def _prune_bn(m: nn.Module, plan: LayerPlan) -> None:
    keep = list(plan.keep_out)
    for name in ("weight", "bias", "running_mean", "running_var"):
        _set_param(m, name, _index(getattr(m, name, None), keep))
    m.num_features = len(keep)


def apply_plan_(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Physically remove the planned channels from ``model``, in place. Returns ``model``.

    Exact (equal to ``zero_groups_`` of scales and shifts) for ``graph.prunable_groups``. Groups
    that are only absorbable need :func:`remove_groups`, which also restores their constants.
    """
    modules = dict(model.named_modules())
    for layer in plan.layers:
        m = modules.get(layer.name)
        if m is None:
            raise PruneError(
                f"plan names layer {layer.name!r}, which {type(model).__name__} lacks; "
                "apply a plan only to the architecture it was made for"
            )
        if layer.kind == "conv":
            _prune_conv(m, layer)
        elif layer.kind == "linear":
            _prune_linear(m, layer)
        else:
            _prune_bn(m, layer)
    return model


def zero_groups_(
    model: nn.Module, graph: ChannelGraph, groups: Iterable[int], *, shifts: Iterable[int] = ()
) -> nn.Module:
    """Zero the BN scale of every channel in ``groups`` (and the shift for ``shifts``), in place.

    With ``shifts=groups`` this is the masked model that a plain ``apply_plan_`` must equal;
    with scales only it is the reference that :func:`remove_groups` absorbs constants against.
    A weight-gated group (no BN) has its writers' filter rows as its scale and their biases as
    its shift (``pipeline.graph.channel_graph``). Returns ``model``.
    """
    modules, scales, shifts = dict(model.named_modules()), set(groups), set(shifts)
    with torch.no_grad():
        for g in graph.groups:
            if g.id not in scales:
                continue
            for name, c in g.bn_channels:
                bn = modules[name]
                zero_scale_(bn, c)
                if g.id in shifts and bn.bias is not None:
                    bn.bias[c] = 0.0
            if g.weight_gated:
                for name, row in graph.writers(g.id):
                    layer = modules[name]
                    layer.weight[row] = 0.0
                    if g.id in shifts and layer.bias is not None:
                        layer.bias[row] = 0.0
    return model


def shifted_groups(model: nn.Module, graph: ChannelGraph, groups: Iterable[int]) -> set[int]:
    """The ``groups`` that only an approximation removes: not absorbable (a reader sees their
    constant through a gate or other non-affine op, so it cannot be added back), with a shift
    that is not exactly zero (a BN's beta, or for a weight-gated group its writers' biases).

    Zeroing such a shift changes the model; with every shift exactly zero, zeroing the scale
    alone already leaves nothing, and the removal is exact (``pipeline.train.gated_shift``
    trains them so).
    """
    modules, wanted, out = dict(model.named_modules()), set(groups), set()
    for g in graph.groups:
        if g.id not in wanted or g.absorbable:
            continue
        shifts = [(modules[n].bias, c) for n, c in g.bn_channels]
        if g.weight_gated:
            shifts = [(modules[n].bias, row) for n, row in graph.writers(g.id)]
        if any(b is not None and float(b.detach()[i]) != 0.0 for b, i in shifts):
            out.add(g.id)
    return out


class ApproximateRemovalError(PruneError):
    """A plan drops groups whose removal is approximate without ``prune.allow_approximate``
    (CLI exit 2: a setting the user chooses)."""


EXACT_RTOL = 1e-6
"""Largest float64 error, relative to the output scale, an exact removal may show (see
``numerics.float_dtype``; exact absorption measures about 1e-13)."""


class ExactnessError(PruneError, VerificationError):
    """The pruned model is not the zeroed model: a failed verification (CLI exit code 1), and a
    :class:`PruneError` for callers that catch those."""


@dataclass(frozen=True)
class RemovalReport:
    """What an exact removal did and how exact it was.

    ``absorbed_groups`` are the exact removals (constants absorbed, or nothing to absorb);
    ``approximate_groups`` had a gated shift zeroed (``prune.allow_approximate``), and
    ``approximate_err`` is what that alone changed: the output of the model with the dropped
    scales zeroed against the same with those shifts zeroed too, relative to its scale.
    """

    absorbed_groups: int
    approximate_groups: int
    corrections: tuple[tuple[str, str], ...]  # (layer, "kernel" | "map" | "bias")
    max_border_err: float  # left by exact_borders=False
    zeroing_err: float  # output change from zeroing the scales (and approximate shifts)
    max_rel_err: float  # pruned vs the zeroed reference
    scale_bound: float  # max |scale * x_hat| of removed BN channels: per-channel change bound
    other_size_rel_err: float = 0.0  # pruned vs reference at a larger input size, where it runs
    check: Check | None = None  # the float64 pruned-vs-zeroed check, where exactness is required
    approximate_err: float = 0.0  # output change from zeroing the approximate groups' shifts


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
    return rel_err(out, ref)


@torch.no_grad()
def remove_groups(
    model: nn.Module,
    graph: ChannelGraph,
    plan: PrunePlan,
    example: torch.Tensor,
    *,
    exact_borders: bool = True,
    allow_approximate: bool = False,
) -> tuple[nn.Module, RemovalReport]:
    """Physically remove ``plan``'s dropped groups from a copy of ``model``, absorbing constants.

    The reference is ``model`` with the dropped groups' BN scales set to zero (and, for groups
    whose constant cannot be absorbed, their shifts too: only with ``allow_approximate``, see
    :func:`shifted_groups`). The pruned copy is verified against it on ``example``.

    Raises:
        ApproximateRemovalError: the plan drops groups only an approximation removes and
            ``allow_approximate`` is off.
        PruneError: a dropped group is neither prunable nor absorbable, or verification failed.
    """
    dropped, by_id = set(plan.dropped_groups), {g.id: g for g in graph.groups}
    if not dropped <= set(by_id):
        raise PruneError(
            f"plan drops groups {sorted(dropped - set(by_id))[:10]}, which this graph lacks; "
            "make the plan from the graph of the model you remove from"
        )
    bad = sorted(g for g in dropped if not (by_id[g].prunable or by_id[g].absorbable))
    if bad:
        raise PruneError(f"groups {bad[:10]} cannot be removed exactly ({by_id[bad[0]].reason})")
    approximate = shifted_groups(model, graph, dropped)
    if approximate and not allow_approximate:
        raise ApproximateRemovalError(_approximate_message(graph, approximate))
    dtype = float_dtype(model)
    model, example = copy.deepcopy(model.eval()).double(), example.double()  # float_dtype says why
    scales_only = zero_groups_(copy.deepcopy(model), graph, dropped)
    reference = zero_groups_(copy.deepcopy(model), graph, dropped, shifts=approximate)
    pruned = apply_plan_(copy.deepcopy(reference), plan)
    keep_out = {l.name: list(l.keep_out) for l in plan.layers}
    corrections, border = absorb_(
        reference, pruned, graph.readers(dropped), keep_out, example, exact_borders
    )
    ref_out, out = reference(example), pruned(example)
    enforced = exact_borders or border == 0  # nothing approximated: must be exact
    check = judge_trees(
        "removal", [(ref_out, out)], Tolerance(EXACT_RTOL, 0.0, "fp64"),
        hint=insensitivity_hint(model),
    ) if enforced else None  # fmt: skip
    report = RemovalReport(
        len(dropped) - len(approximate),
        len(approximate),
        tuple(corrections),
        border,
        rel_err(ref_out, model(example)),
        rel_err(out, ref_out),
        scale_bound(model, graph, dropped, example),
        _other_size_err(reference, pruned, larger_input(example)),
        check,
        rel_err(ref_out, scales_only(example)) if approximate else 0.0,
    )
    if enforced:
        _check_exact(report, example)
    _log(report, len(dropped))
    return pruned.to(dtype), report


def _approximate_message(graph: ChannelGraph, groups: set[int]) -> str:
    by_id = {g.id: g for g in graph.groups}
    first = by_id[min(groups)]
    where = first.bn_channels[0] if first.bn_channels else graph.writers(first.id)[0]
    return (
        f"{len(groups)} dropped groups (e.g. group {first.id}, {where[0]} channel {where[1]}) "
        "emit a constant that a gate or other non-affine reader sees, and their shift is not "
        "zero, so removing them changes the model; expected a plan without them. Keep them "
        "(prune_model does unless prune.allow_approximate), train with train.target so the "
        "shifts recede with the scales, or pass allow_approximate=True "
        "(prune.allow_approximate=true) to zero the shifts and report the error"
    )


def _log(report: RemovalReport, dropped: int) -> None:
    logger.info(
        "removed %d groups (%d exactly, %d approximately: %.2e), %d corrections; rel err %.2e "
        "(%.2e at a larger size); zeroing changed outputs by %.2e (scale bound %.2e); %s",
        dropped,
        report.absorbed_groups,
        report.approximate_groups,
        report.approximate_err,
        len(report.corrections),
        report.max_rel_err,
        report.other_size_rel_err,
        report.zeroing_err,
        report.scale_bound,
        f"check: {report.check.line()}" if report.check else "approximate removal, not checked",
    )


def _check_exact(report: RemovalReport, example: torch.Tensor) -> None:
    """Raise unless the pruned model matched the zeroed reference at both checked sizes."""
    worst = report.check.output if report.check is not None else ""  # of several outputs
    for err, where in (
        (report.max_rel_err, f"on the example {tuple(example.shape)}"
         + (f" (worst: output {worst!r})" if worst else "")),
        (report.other_size_rel_err, "at a larger input size"),
    ):
        if err > EXACT_RTOL:
            raise ExactnessError(
                f"pruned model differs from the zeroed reference by {err:.2e} of the output scale "
                f"{where}, computed in float64 (expected <= {EXACT_RTOL:.0e}); this is a bug in "
                "constant absorption or a layer that computes in lower precision; please report "
                "it with the model. No setting makes this removal exact: "
                "prune.exact_borders=false would only skip this check, not the error"
            )
