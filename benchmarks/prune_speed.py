"""Time trace + plan + apply of a 50% channel prune of resnet50: recede vs Torch-Pruning.

Both run in this process on fresh copies of the same torchvision ``resnet50`` (random BN scales)
with a 1x3x224x224 example; the best of ``--repeats`` runs is reported. recede: build the channel
graph, rank groups by BN scale, drop half of them, make and apply the plan. Torch-Pruning 1.6:
``MagnitudePruner(pruning_ratio=0.5)`` (dependency-graph tracing in the constructor) and
``step()``. Copying the model is not timed.

    pip install torch-pruning==1.6.1    # or: pip install -e '.[bench]'
    python benchmarks/prune_speed.py    # with recede installed (or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from collections.abc import Callable
from importlib.metadata import version

import torch
import torchvision
from torch import nn

from pipeline.graph.channel_graph import build_channel_graph
from pipeline.prune.stage import (
    SelectionRules,
    apply_plan_,
    group_importance,
    make_plan,
    select_groups,
)

RATIO = 0.5


def resnet50(seed: int = 0) -> nn.Module:
    """Untrained resnet50 in eval mode with random BN scales, so importances are not all tied."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)
    return model


def recede_prune_(model: nn.Module, example: torch.Tensor) -> None:
    graph = build_channel_graph(model, example)
    importance = group_importance(model, graph)
    dropped = select_groups(importance, graph, ratio=RATIO, rules=SelectionRules(min_channels=1))
    apply_plan_(model, make_plan(graph, dropped))


def torch_pruning_prune_(model: nn.Module, example: torch.Tensor) -> None:
    import torch_pruning as tp

    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=RATIO,
        ignored_layers=[model.fc],
    )
    pruner.step()


def best_of(
    prune_: Callable[[nn.Module, torch.Tensor], None],
    base: nn.Module,
    example: torch.Tensor,
    repeats: int,
) -> tuple[list[float], nn.Module]:
    """Seconds of each run on a fresh copy of ``base``, and the last pruned model."""
    times = []
    for _ in range(repeats):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        prune_(model, example)
        times.append(time.perf_counter() - start)
    return times, model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    try:
        tp_version = version("torch-pruning")
    except Exception:  # importlib.metadata raises PackageNotFoundError
        print("Torch-Pruning is not installed: pip install torch-pruning==1.6.1")
        return 2
    base = resnet50()
    example = torch.randn(1, 3, args.size, args.size)
    params = sum(p.numel() for p in base.parameters())
    print(
        f"resnet50 {args.size}x{args.size}, {params / 1e6:.2f} M params, ratio {RATIO}, "
        f"best of {args.repeats}; torch {torch.__version__}, torch-pruning {tp_version}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    best = {}
    for name, prune_ in (("recede", recede_prune_), ("torch-pruning", torch_pruning_prune_)):
        times, pruned = best_of(prune_, base, example, args.repeats)
        with torch.no_grad():
            assert pruned(example).shape == (1, 1000)
        after = sum(p.numel() for p in pruned.parameters())
        best[name] = min(times)
        runs = ", ".join(f"{t:.3f}" for t in times)
        print(
            f"{name:14s} best {min(times):.3f} s  (runs {runs})  params after {after / 1e6:.2f} M"
        )
    print(f"torch-pruning / recede = {best['torch-pruning'] / best['recede']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
