"""ISTA sparsification of BN gamma (Ye et al., ICLR 2018): the gamma/W rescaling trick. The
proximal shrink itself is the fused kernel ``kernels.ista_shrink.ista_shrink_``, run after every
optimizer step; the per-layer penalty weights are ``pipeline.graph.costs.layer_costs``.

The optimiser: the reference code runs plain SGD (no momentum) on gamma, because a momentum
buffer keeps pushing a zeroed gamma off zero after the shrink. ``pipeline.train.loop.make_optimizer``
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

from pipeline.graph.channel_graph import ChannelGraph, positively_homogeneous_bns
from pipeline.graph.rescale import outputs_changed_by, probe_inputs, reader_factors, scale_readers_

logger = logging.getLogger(__name__)


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

    A BN with a frozen scale is skipped.

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
            or not bn.weight.requires_grad  # frozen: never moved, not even there and back
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
