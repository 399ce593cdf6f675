"""Rescale through readers: a BN's output channel scaled by alpha, its readers' weights by 1/alpha.

Both the exact conversion of a trained BN (``pipeline.train.convert``, per-channel alpha) and ISTA's
gamma/W rescaling trick (``pipeline.train.ista``, one alpha per model) move a factor out of a BN and
into every conv/linear that reads it. That preserves the function only where each path from
the BN to its readers is positively homogeneous (``positively_homogeneous_bns`` decides it from
the graph); callers then check the outputs with :func:`outputs_changed_by` on the example and on
3x it (past the clip of ReLU6-like ops), and undo by calling again with the inverse factor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.core.numerics import rel_err
from pipeline.graph.channel_graph import ChannelGraph


def reader_factors(
    graph: ChannelGraph, name: str, factor: torch.Tensor
) -> list[tuple[str, list[int], torch.Tensor]]:
    """(reader, input positions, ``factor`` of the BN channel at each position) for BN ``name``."""
    channel_of = {g: c for c, g in enumerate(graph.layers[name].out_groups)}
    out = []
    for r, pos in graph.readers(set(channel_of)).items():
        out.append((r, pos, factor[[channel_of[graph.layers[r].in_groups[p]] for p in pos]]))
    return out


@torch.no_grad()
def scale_readers_(model: nn.Module, readers: list[tuple[str, list[int], torch.Tensor]]) -> None:
    """Multiply each reader's weights at its positions by the factors from :func:`reader_factors`."""
    for r, pos, f in readers:
        m = model.get_submodule(r)
        m.weight[:, pos] *= f.view(-1, *[1] * (m.weight.dim() - 2))


def probe_inputs(example: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The example and 3x it: a clipping activation checked only below its clip would pass."""
    return example, 3.0 * example


@torch.no_grad()
def outputs_changed_by(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    references: Sequence[torch.Tensor],
    *,
    floor: float = 1e-12,
) -> float:
    """Largest relative change of ``model``'s outputs on ``inputs`` against ``references``."""
    return max(
        rel_err(model(x), ref, floor=floor) for x, ref in zip(inputs, references, strict=True)
    )
