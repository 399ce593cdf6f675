"""Check before any training every config value that would only fail later: run/train pre-flight.

``pipeline.train.feasibility`` bounds the model's size on the meta device. This builds the model
for real and passes one example through it, so a value that used to fail after data loading,
after training or mid-benchmark (with a traceback and a ``.partial`` folder left behind) is
refused first, exit 2, naming the key:

- ``data.image_size`` the model cannot take (its pooling stages shrink it to nothing);
- ``model.name`` naming a model without BatchNorm (training polarises BN scales and pruning
  ranks channels by them) or one torch.fx cannot trace (training's budget and every stage after
  it work on the channel graph);
- ``train.device`` cuda on a machine without a GPU;
- ``bench.batches`` (``recede run``) whose largest batch cannot fit in memory: the benchmark
  holds at least one layer's input and output at that batch, a floor on what it allocates
  (it never refuses a batch that fits, only one that cannot).

The other keys are checked when the config is loaded (``pipeline.config``), or cannot fail
late: ``tests/cli/test_cli_late_values.py`` lists each key with the reason.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from pipeline.config import ConfigError, RunConfig

logger = logging.getLogger(__name__)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def _build(cfg: RunConfig) -> tuple[nn.Module, torch.Tensor]:
    """The model ``cfg`` trains (eval mode, on the CPU) and one example of its input."""
    from pipeline.models.zoo import ModelError, build_model
    from pipeline.train.feasibility import data_facts

    num_classes, in_channels = data_facts(cfg)
    try:
        model = build_model(cfg.model, num_classes=num_classes, in_channels=in_channels)
    except ModelError as err:
        raise ConfigError(f"model.name: {err}") from None
    size = cfg.data.image_size
    return model.eval(), torch.randn(1, in_channels, size, size)


def layer_peak_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """The largest input plus output bytes of one leaf layer for ``example``; raises what the
    forward raises. The floor of what any forward holds at once, per ``len(example)`` samples.
    """
    peak = [example.numel() * example.element_size()]

    def size(values: object) -> int:
        values = values if isinstance(values, (tuple, list)) else (values,)
        return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))

    def record(_m: nn.Module, inputs: object, output: object) -> None:
        peak[0] = max(peak[0], size(inputs) + size(output))

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return peak[0]


def _forward(cfg: RunConfig, model: nn.Module, example: torch.Tensor) -> int:
    """``layer_peak_bytes`` for one example; a model that cannot take it names the keys."""
    try:
        return layer_peak_bytes(model, example)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as err:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size}: model.name={cfg.model.name} cannot take an "
            f"input of shape {tuple(example.shape)} ({_first_line(err)}); expected a size it "
            "accepts; raise data.image_size (e.g. --set data.image_size=32) or pick another "
            "model.name"
        ) from None


def check_trainable(cfg: RunConfig, model: nn.Module, example: torch.Tensor) -> None:
    """Refuse a model without BatchNorm, or one whose channel graph cannot be traced."""
    from pipeline.graph.channel_graph import build_channel_graph
    from pipeline.graph.slot_layers import SLOT_BN_CLASSES
    from pipeline.graph.tracing import GraphError

    if not any(isinstance(m, SLOT_BN_CLASSES) for m in model.modules()):
        raise ConfigError(
            f"model.name={cfg.model.name} has no BatchNorm layer, and recede trains and prunes "
            f"by BN scales (train.penalty.method={cfg.train.penalty.method}); expected a model "
            "with BatchNorm2d after its convolutions; pick one with --set model.name=resnet20 "
            "(or vgg, torchvision:resnet18, timm:<name>), or add BatchNorm2d to your factory"
        )
    try:
        build_channel_graph(model, example)
    except GraphError as err:
        raise ConfigError(f"model.name={cfg.model.name}: {err}") from None


def available_memory() -> int | None:
    """Bytes this machine can still allocate (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _device_memory() -> list[tuple[str, int]]:
    """(where, free bytes) of every memory the benchmark runs in."""
    found = []
    if (free := available_memory()) is not None:
        found.append(("this machine's memory", free))
    if torch.cuda.is_available():
        found.append(("the GPU's memory", torch.cuda.mem_get_info()[0]))
    return found


def check_bench_batches(batches: tuple[int, ...], peak: int) -> None:
    """Refuse ``bench.batches`` whose largest batch cannot hold ``peak`` bytes per sample."""
    biggest = max(batches)
    for where, free in _device_memory():
        if biggest * peak > free:
            raise ConfigError(
                f"bench.batches={list(batches)}: batch {biggest} needs at least "
                f"{biggest * peak / 2**30:.3g} GiB (the largest layer's input and output, "
                f"{peak} bytes per sample), and {where} has {free / 2**30:.3g} GiB free; "
                f"expected batches up to {max(1, free // peak)}; lower them, e.g. --set "
                "bench.batches=[1,32]"
            )


def check_before_training(cfg: RunConfig, *, bench: bool) -> None:
    """Refuse, naming the key, every value of ``cfg`` that would only fail after work began.

    Args:
        cfg: The resolved config.
        bench: Whether the command benchmarks after training (``recede run``).

    Raises:
        ConfigError: A value fails (see the module docstring); ValueError for ``train.device``.
    """
    from pipeline.train.feasibility import check_feasible
    from pipeline.train.loop import resolve_device

    check_feasible(cfg)  # size bounds first, on the meta device: nothing huge is allocated
    resolve_device(cfg.train.device)
    model, example = _build(cfg)
    peak = _forward(cfg, model, example)
    check_trainable(cfg, model, example)
    if bench:
        check_bench_batches(cfg.bench.batches, peak)
    logger.debug("pre-flight: %s takes %s, %d bytes per sample at most", cfg.model.name,
                 tuple(example.shape), peak)  # fmt: skip
