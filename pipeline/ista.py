"""ISTA sparsification of BN gamma (Ye et al., ICLR 2018): per-layer cost weights and the
gamma/W rescaling trick. The proximal shrink itself is the fused kernel
``kernels.ista_shrink.ista_shrink_``, run after every optimizer step.

Per-layer penalty weight lambda_l for the channels of BN layer l (every affine BN, wherever it
sits: after a conv, after a concat, pre-activation):

- ``memory`` (default): the "memory cost per channel" of Ye et al.'s reference code,
  ``lambda_l = (k_w k_h c_{l-1} + sum_{l' reading l} k'_w k'_h c' + H_l W_l) / (I_w I_h)``:
  the weights of the filter producing a channel, the weights of every reader's slice that reads
  it (grouped, depthwise and flatten->Linear readers counted exactly), and the channel's feature
  map area, all over the input image area. Computed per channel group by
  ``pipeline.costs.group_costs`` and averaged over the BN's channels (equal to the formula when
  each channel is its own group, as in a VGG).
- ``flops``: the multiply-accumulates per sample one channel accounts for in its producer and
  its readers (``group_costs(..., "macs")``).

Deliberate difference from the reference: both are normalised to a mean of 1 over layers, so
``rho`` keeps its meaning across models and input sizes.

The optimiser: the reference code runs plain SGD (no momentum) on gamma, because a momentum
buffer keeps pushing a zeroed gamma off zero after the shrink. ``pipeline.train.make_optimizer``
therefore puts ISTA's gammas in a param group of their own with momentum 0.

Rescaling: multiplying a BN's gamma and beta by alpha and every reader's weights by 1/alpha
preserves the function when only positively homogeneous ops (ReLU, max/avg pooling) sit between
them. ``rescale_gamma_`` decides that from the graph's op types and skips the other BNs.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import torch
from torch import nn

from pipeline.bn import bn_modules
from pipeline.channel_graph import ChannelGraph, positively_homogeneous_bns
from pipeline.costs import group_costs
from pipeline.rescale import outputs_changed_by, probe_inputs, reader_factors, scale_readers_

logger = logging.getLogger(__name__)


def _channel_groups(graph: ChannelGraph) -> dict[str, tuple[int, ...]]:
    """BN name -> the group id of each of its channels."""
    return {name: layer.out_groups for name, layer in graph.layers.items() if layer.kind == "bn"}


def layer_costs(
    model: nn.Module, graph: ChannelGraph, example: torch.Tensor, form: str = "memory"
) -> dict[str, float]:
    """Normalised lambda_l for every affine BN in ``model`` (module order)."""
    if form not in ("memory", "flops"):
        raise ValueError(f"cost form must be 'memory' or 'flops', got {form!r}")
    per_group = group_costs(model, graph, example, "memory" if form == "memory" else "macs")
    channels = _channel_groups(graph)
    raw = {}
    for name in bn_modules(model):
        if name not in channels:
            raise ValueError(
                f"BN {name!r} was not traced into the channel graph, so ISTA cannot weigh it; "
                "check `recede inspect` for barriers around it"
            )
        groups = channels[name]
        raw[name] = sum(per_group[g] for g in groups) / len(groups)
    mean = sum(raw.values()) / max(1, len(raw))
    return {k: v / mean for k, v in raw.items()}


@torch.no_grad()
def rescale_gamma_(
    model: nn.Module,
    graph: ChannelGraph,
    example: torch.Tensor,
    alpha: float,
    *,
    only: Collection[str] | None = None,
) -> list[str]:
    """Scale gamma, beta by ``alpha`` and readers' weights by 1/alpha where that preserves the function.

    Which BNs qualify is decided structurally (``positively_homogeneous_bns``: only ReLU-like
    ops and pooling between the BN and ungrouped readers), never by one example's numbers: a
    ReLU6 checked below its clip is not exact above it. The result is then verified on
    ``example`` and on 3x ``example``.

    Returns the BN names rescaled; undo with ``alpha=1/alpha, only=<that list>``.

    Raises:
        RuntimeError: the rescaled model differs from the original (a bug in the rule).
    """
    modules = dict(model.named_modules())
    model.eval()
    inputs = probe_inputs(example)
    references = [model(x) for x in inputs]
    eligible = positively_homogeneous_bns(model)
    done = []
    for bn_name, layer in graph.layers.items():
        bn = modules[bn_name]
        if (
            layer.kind != "bn"
            or bn_name not in eligible
            or not isinstance(bn, nn.BatchNorm2d)
            or bn.weight is None
            or (only is not None and bn_name not in only)
        ):
            continue
        readers = reader_factors(graph, bn_name, torch.full_like(bn.weight, 1.0 / alpha))
        if readers:
            bn.weight.mul_(alpha)
            bn.bias.mul_(alpha)
            scale_readers_(model, readers)
            done.append(bn_name)
    err = outputs_changed_by(model, inputs, references)
    if err > 1e-4:
        raise RuntimeError(
            f"gamma/W rescaling changed the output by {err:.2e} of its scale; this is a bug "
            "in positively_homogeneous_bns, please report it (train.penalty.rescale=1 avoids it)"
        )
    logger.info("rescaled %d BN layers by alpha=%g", len(done), alpha)
    return done
