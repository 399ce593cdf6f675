"""Check before any work that a config's model can be built and fits: the pre-flight of run/train.

The model is built on the ``meta`` device (shapes, no storage), so a factory that fails, a
``model.width`` that would need terabytes of weights or a ``data.image_size`` whose activations
no machine holds is refused in a second, naming the key, instead of after data loading or
training ends in an allocation traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError, RunConfig
from pipeline.models.zoo import ModelError, build_model

logger = logging.getLogger(__name__)

MAX_PARAMS = 2_000_000_000  # 8 GB of fp32 weights, ~32 GB with gradients and optimiser state
MAX_SAMPLE_ACTIVATION_BYTES = 8 * 2**30  # fp32 outputs of every layer for one example
_BUILTIN = ("vgg", "resnet20", "resnet56", "torchvision:", "timm:")


@dataclass(frozen=True)
class ModelSize:
    """What one example costs: parameters, and bytes of layer outputs (None: not estimable)."""

    params: int
    activation_bytes: int | None


def data_facts(cfg: RunConfig) -> tuple[int, int]:
    """(num_classes, in_channels) of ``cfg.data`` without reading any sample."""
    name = cfg.data.name
    if name in ("digits", "fashion_mnist"):
        return 10, 1
    if name in ("cifar10", "cifar100"):
        return (10 if name == "cifar10" else 100), 3
    train = Path(cfg.data.root or ".").expanduser() / "train"
    classes = [p for p in train.iterdir() if p.is_dir()] if train.is_dir() else []
    return max(2, len(classes)), 3


def _build(cfg: RunConfig, num_classes: int, in_channels: int) -> nn.Module:
    """The model on the meta device; user factories run on the CPU (they may not know meta)."""
    builtin = cfg.model.name.startswith(_BUILTIN) or cfg.model.name in _BUILTIN
    try:
        if not builtin:
            return build_model(cfg.model, num_classes=num_classes, in_channels=in_channels)
        with torch.device("meta"):
            return build_model(cfg.model, num_classes=num_classes, in_channels=in_channels)
    except ModelError as err:
        raise ConfigError(f"model.name: {err}") from None


def _activation_bytes(model: nn.Module, shape: tuple[int, ...]) -> int | None:
    """Bytes of every leaf module's fp32 output for one example, from a forward on meta."""
    total = [0]

    def count(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * 4

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model.to("meta").eval()(torch.empty((1, *shape), device="meta"))
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
        logger.debug("no activation estimate for this model on meta: %s", err)
        return None
    finally:
        for h in hooks:
            h.remove()
    return total[0] + 4 * torch.Size(shape).numel()


def estimate(cfg: RunConfig) -> ModelSize:
    """Parameters and one example's activation bytes of the model ``cfg`` trains."""
    num_classes, in_channels = data_facts(cfg)
    model = _build(cfg, num_classes, in_channels)
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:  # no forward: it would only confirm the model is too large
        return ModelSize(params, None)
    size = cfg.data.image_size
    return ModelSize(params, _activation_bytes(model, (in_channels, size, size)))


def check_feasible(cfg: RunConfig) -> ModelSize:
    """Refuse a config whose model cannot be built or would not fit, naming the key.

    Raises:
        ConfigError: ``model.name`` cannot be built, ``model.width`` gives more than
            MAX_PARAMS parameters, or ``data.image_size`` more than MAX_SAMPLE_ACTIVATION_BYTES
            of activations for one example.
    """
    size = estimate(cfg)
    if size.params > MAX_PARAMS:
        raise ConfigError(
            f"model.width={cfg.model.width} gives {cfg.model.name} {size.params:.3g} parameters, "
            f"expected at most {MAX_PARAMS:.0e} (fp32 weights, gradients and optimiser state "
            "of more do not fit in memory); lower model.width (or model.depth)"
        )
    acts = size.activation_bytes
    if acts is not None and acts > MAX_SAMPLE_ACTIVATION_BYTES:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size}: one example's activations in "
            f"{cfg.model.name} would take {acts / 2**30:.3g} GiB, expected at most "
            f"{MAX_SAMPLE_ACTIVATION_BYTES / 2**30:.0f} GiB; lower data.image_size "
            "(or model.width)"
        )
    logger.debug("model: %d parameters, %s activation bytes per example", size.params, acts)
    return size
