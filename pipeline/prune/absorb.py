"""Absorb the constant that a removed zero-scale channel still emits into its readers.

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

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.graph.channel_graph import ChannelGraph
from pipeline.layers.bn import bn_scale
from pipeline.layers.corrected_conv import make_corrected_
from pipeline.prune.plan import PruneError

logger = logging.getLogger(__name__)


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


def _channel_dim(layer: nn.Module) -> int:
    """The axis ``layer`` reads channels on: the last for a Linear (tokens, channels last), 1 for
    a conv."""
    return -1 if isinstance(layer, nn.Linear) else 1


def _removed(layer: nn.Module, x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """The removed channels' values at every position: ``(positions, len(idx))``."""
    dim = _channel_dim(layer) % x.dim()
    picked = x.index_select(dim, torch.tensor(idx, dtype=torch.long, device=x.device))
    return picked.movedim(dim, -1).reshape(-1, len(idx))


def _masked(layer: nn.Module, x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``x`` with every channel but ``idx`` zeroed, on ``layer``'s channel axis."""
    dim = _channel_dim(layer) % x.dim()
    keep = torch.zeros(x.shape[dim], dtype=x.dtype, device=x.device)
    keep[idx] = 1
    return x * keep.view(-1, *[1] * (x.dim() - dim - 1))


def _matches(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the last ulps of a pooling sum (relative 1e-6 of the larger magnitude)."""
    tol = 1e-6 * max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) <= tol


def _uniform(
    layer: nn.Module, here: torch.Tensor, there: torch.Tensor | None, idx: list[int]
) -> bool:
    """Whether the removed channels hold one value per channel at every position of the example
    and of the larger input (``there``; None where the model does not run there), the same at
    both: then the correction is a bias or a kernel, right at every size."""
    values = [_removed(layer, here, idx)]
    if there is not None:
        values.append(_removed(layer, there, idx))
    first = values[0][:1]
    return all(_matches(v, first.expand_as(v)) for v in values)


def _linear_correction(layer: nn.Linear, xin: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``W x`` of the removed channels alone at every position: ``(positions, out_features)``."""
    out = F.linear(_masked(layer, xin, idx), layer.weight)
    return out.reshape(-1, out.shape[-1])


def _conv_correction(
    layer: nn.Conv2d, xin: torch.Tensor, idx: list[int], exact: bool, uniform: bool
) -> tuple[str, torch.Tensor, float]:
    """(form, tensor, border error) for a conv reader; see ``_correction``."""
    masked = _masked(layer, xin, idx)
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


def _correction(
    name: str,
    layer: nn.Module,
    xin: torch.Tensor,
    larger: torch.Tensor | None,
    idx: list[int],
    exact: bool,
) -> tuple[str, torch.Tensor, float]:
    """(form, tensor, error left) for the removed input channels ``idx`` of ``layer``.

    The form follows from the layer's structure, never from the example's border: a 1x1 output
    has no border to look at, yet its zero padding still shapes it. A constant that differs
    between positions or input sizes (a zero-padded or adaptive pooling, or a resampling,
    between the BN and ``layer``) gets a per-position ``map`` on a conv whose output size
    follows the input's, so a run at another size is refused; where nothing could refuse it (a
    Linear's one bias, a conv behind a global pool) removal is refused here, or with ``exact``
    False applied at the example's size with the error it leaves reported.
    """
    uniform = _uniform(layer, xin, larger, idx)
    if isinstance(layer, nn.Linear):
        here = _linear_correction(layer, xin, idx)
        if uniform:
            return "bias", here[0], 0.0
        value, seen = here.mean(0), [here]
        if larger is not None:
            seen.append(_linear_correction(layer, larger, idx))
        err = max(float((v - value).abs().max()) for v in seen)
        _refuse_if_exact(name, layer, xin, err, exact)
        return "bias", value, err
    form, value, err = _conv_correction(layer, xin, idx, exact, uniform)
    if form == "map" and larger is not None and xin.shape[-2:] == larger.shape[-2:]:
        there = _conv_correction(layer, larger, idx, exact, False)[1]
        if not _matches(there, value):  # one output size: the map cannot refuse the other
            err = float((there - value).abs().max())
            _refuse_if_exact(name, layer, xin, err, exact)
    return form, value, err


def _refuse_if_exact(
    name: str, layer: nn.Module, xin: torch.Tensor, err: float, exact: bool
) -> None:
    """Raise ``PruneError`` naming ``layer`` and the setting that removes its channels anyway."""
    if not exact or err == 0:
        return
    reader = (
        "a Linear holds one bias for every position and input size"
        if isinstance(layer, nn.Linear)
        else "this conv's input has one size at every input size of the model, so a "
        "per-position correction cannot refuse the sizes it is wrong at"
    )
    raise PruneError(
        f"{name} ({type(layer).__name__}) reads removed channels whose constant differs between "
        f"positions or input sizes (by up to {err:.2e} in its output): a zero-padded or adaptive "
        f"pooling or a resampling between their BN and {name} makes it depend on where and at "
        f"what size it is computed, and {reader}. Set prune.exact_borders=false (on `recede "
        "prune`, --no-exact-borders) to remove them with the constant of the "
        f"example's size ({tuple(xin.shape)} at {name}) and have the error it leaves reported, "
        "or keep these channels (prune.threshold below their importance), or pool without "
        "counting padding (count_include_pad=False keeps a constant constant)"
    )


def larger_input(example: torch.Tensor) -> torch.Tensor | None:
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


def scale_bound(
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
        scale = bn_scale(bn)[c].abs()
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


def absorb_(
    reference: nn.Module,
    pruned: nn.Module,
    readers: dict[str, list[int]],
    keep_out: dict[str, list[int]],
    example: torch.Tensor,
    exact: bool,
) -> tuple[list[tuple[str, str]], float]:
    """Attach each reader's correction to ``pruned``; returns (corrections, border error).

    ``readers``: layer -> its input positions that read removed channels (on ``reference``);
    ``keep_out``: the kept output channels of every layer the plan shrinks.
    """
    a, b = example[:1], torch.flip(example[:1], dims=(-1,)) * 0.5 + 0.3
    inputs, other = (
        _capture_inputs(reference, list(readers), a),
        _capture_inputs(reference, list(readers), b),
    )
    larger = _capture_if_runs(reference, list(readers), larger_input(example))
    originals, modules = dict(reference.named_modules()), dict(pruned.named_modules())
    corrections, border = [], 0.0
    for name, idx in readers.items():
        layer = originals[name]
        here, there = _removed(layer, inputs[name], idx), _removed(layer, other[name], idx)
        if not torch.allclose(here, there, atol=1e-6):
            raise PruneError(
                f"{name} reads removed channels whose value depends on the input; "
                "the channel graph marked them absorbable wrongly (please report)"
            )
        form, value, err = _correction(name, layer, inputs[name], larger.get(name), idx, exact)
        border = max(border, err)
        if float(value.abs().max()) > 0:
            _attach(modules[name], form, value, keep_out.get(name))
            corrections.append((name, form))
    return corrections, border
