"""ISTA sparsification of BN gamma (Ye et al., ICLR 2018): per-layer cost weights and the
gamma/W rescaling trick. The proximal shrink itself is the fused kernel
``kernels.ista_shrink.ista_shrink_``, run after every optimizer step.

Per-layer penalty weight lambda_l for the channels of BN layer l, which follows conv l:

- ``memory`` (default, the paper's memory footprint):
  ``lambda_l = (k_l^2 c_{l-1} + sum_{l' in T(l)} k_{l'}^2 c_{l'}) / (I_w I_h) + H_l W_l``
  where ``c_{l-1}`` is the input channels per group of conv l, ``T(l)`` the convs/linears that read
  layer l, ``c_{l'}`` their output channels, ``I_w I_h`` the input image area and ``H_l W_l`` the
  size of layer l's feature map: the parameters plus the activation one channel of l costs.
- ``flops``: ``k_l^2 c_{l-1} H_l W_l + sum_{l'} k_{l'}^2 c_{l'} H_{l'} W_{l'}``, the MACs one
  channel of l accounts for in its own conv and in its readers.

Both are normalised to a mean of 1 over layers, so ``rho`` keeps its meaning across models.

Rescaling: multiplying a BN's gamma and beta by alpha and every reader's weights by 1/alpha
preserves the function when only positively homogeneous ops (ReLU, max/avg pooling) sit between
them. ``rescale_gamma_`` verifies that numerically per BN and skips BNs where it does not hold.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import torch
from torch import nn

from pipeline.channel_graph import ChannelGraph
from pipeline.fold import conv_bn_pairs

logger = logging.getLogger(__name__)


def _feature_sizes(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Output spatial area of every conv (1 for linear)."""
    sizes, hooks = {}, []

    def record(name: str, out: torch.Tensor) -> None:  # a hook must return None
        sizes.setdefault(name, out[0, 0].numel() if out.dim() == 4 else 1)

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(lambda mod, a, out, name=name: record(name, out)))
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return sizes


def layer_costs(
    model: nn.Module, graph: ChannelGraph, example: torch.Tensor, form: str = "memory"
) -> dict[str, float]:
    """Normalised lambda_l for every BN that follows a conv."""
    if form not in ("memory", "flops"):
        raise ValueError(f"cost form must be 'memory' or 'flops', got {form!r}")
    modules, area = dict(model.named_modules()), example.shape[-1] * example.shape[-2]
    sizes = _feature_sizes(model, example)
    raw = {}
    for conv_name, bn in conv_bn_pairs(model):
        if bn not in graph.layers:
            continue
        conv = modules[conv_name]
        own = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels // conv.groups
        reader_names = list(graph.readers(set(graph.layers[bn].out_groups)))
        readers = [modules[r] for r in reader_names]
        per_reader = [
            (m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1)
            * m.weight.shape[0]
            for m in readers
        ]
        if form == "memory":
            raw[bn] = (own + sum(per_reader)) / area + sizes[conv_name]
        else:
            reader_sizes = [sizes[r] for r in reader_names]
            raw[bn] = own * sizes[conv_name] + sum(
                p * s for p, s in zip(per_reader, reader_sizes, strict=True)
            )
    mean = sum(raw.values()) / max(1, len(raw))
    return {k: v / mean for k, v in raw.items()}


@torch.no_grad()
def _scale_bn_(
    bn: nn.Module, readers: list[nn.Module], idx: Mapping[int, list[int]], alpha: float
) -> None:
    bn.weight.mul_(alpha)
    bn.bias.mul_(alpha)
    for reader, positions in zip(readers, idx.values(), strict=True):
        reader.weight[:, positions] /= alpha


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

    Returns the BN names rescaled; undo with ``alpha=1/alpha, only=<that list>``.
    """
    modules = dict(model.named_modules())
    model.eval()
    reference = model(example)
    done = []
    for bn_name, layer in graph.layers.items():
        bn = modules[bn_name]
        if (
            layer.kind != "bn"
            or not isinstance(bn, nn.BatchNorm2d)
            or bn.weight is None
            or (only is not None and bn_name not in only)
        ):
            continue
        positions = graph.readers(set(layer.out_groups))
        readers = list(positions)
        idx = dict(enumerate(positions.values()))
        if not readers or any(
            modules[r].weight.dim() == 4 and modules[r].groups > 1 for r in readers
        ):
            continue
        _scale_bn_(bn, [modules[r] for r in readers], idx, alpha)
        if torch.allclose(
            model(example), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max())
        ):
            done.append(bn_name)
        else:  # a non-homogeneous op or a second path: undo
            _scale_bn_(bn, [modules[r] for r in readers], idx, 1.0 / alpha)
    logger.info("rescaled %d BN layers by alpha=%g", len(done), alpha)
    return done
