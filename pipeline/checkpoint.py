"""Save and rebuild pruned models: a JSON shape manifest plus a state dict, never a pickle.

A pruned model is rebuilt by calling its original constructor (from the saved model spec),
re-shaping the layers named in the manifest, and loading the state dict with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.absorb import make_corrected_
from pipeline.atomic import save_torch_atomic, write_json_atomic
from pipeline.bounded_bn import BoundedBatchNorm2d, convert_to_bounded_bn_
from pipeline.config import ModelConfig, from_dict
from pipeline.models import build_model

MANIFEST = "manifest.json"
WEIGHTS = "model.pt"


def shape_manifest(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Name -> shape attributes of every conv, linear and BN layer."""
    shapes: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = {
                "type": "Conv2d",
                "in_channels": m.in_channels,
                "out_channels": m.out_channels,
                "groups": m.groups,
                "bias": m.bias is not None,
                "corrections": {
                    k: list(v.shape)
                    for k in ("const_kernel", "const_map")
                    if (v := getattr(m, k, None)) is not None
                },
            }
        elif isinstance(m, nn.Linear):
            shapes[name] = {
                "type": "Linear",
                "in_features": m.in_features,
                "out_features": m.out_features,
            }
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, BoundedBatchNorm2d)):
            shapes[name] = {"type": "BatchNorm", "num_features": m.num_features}
    return shapes


def _reshape(m: nn.Module, names: tuple[str, ...], shapes: list[tuple[int, ...]]) -> None:
    for name, shape in zip(names, shapes, strict=False):
        old = getattr(m, name, None)
        if old is None:
            continue
        new = torch.zeros(shape, dtype=old.dtype)
        setattr(
            m, name, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new
        )


def reshape_to_manifest_(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> nn.Module:
    """Give each named layer the manifest's shapes (values are loaded afterwards)."""
    for name, s in shapes.items():
        m = model.get_submodule(name)
        if s["type"] == "Conv2d":
            k = m.kernel_size
            m.in_channels, m.out_channels, m.groups = (
                s["in_channels"],
                s["out_channels"],
                s["groups"],
            )
            if s.get("bias") and m.bias is None:  # constant absorption may have added a bias
                m.bias = nn.Parameter(torch.zeros(m.out_channels))
            _reshape(
                m,
                ("weight", "bias"),
                [(m.out_channels, m.in_channels // m.groups, *k), (m.out_channels,)],
            )
            corr = {key: torch.zeros(shape) for key, shape in s.get("corrections", {}).items()}
            if corr:
                make_corrected_(m, kernel=corr.get("const_kernel"), map_=corr.get("const_map"))
        elif s["type"] == "Linear":
            m.in_features, m.out_features = s["in_features"], s["out_features"]
            _reshape(m, ("weight", "bias"), [(m.out_features, m.in_features), (m.out_features,)])
        else:
            c = m.num_features = s["num_features"]
            _reshape(m, ("weight", "bias", "running_mean", "running_var"), [(c,)] * 4)
    return model


def save_pruned(model: nn.Module, out_dir: str | Path, *, spec: dict[str, Any]) -> Path:
    """Write ``model.pt`` (state dict) and ``manifest.json`` (spec + shapes) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(model.state_dict(), out / WEIGHTS)
    write_json_atomic(out / MANIFEST, {"spec": spec, "shapes": shape_manifest(model)})
    return out


def load_pruned(out_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by ``save_pruned``; returns (model, spec)."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file() or not (out / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{out} holds no pruned model: expected {MANIFEST} and {WEIGHTS} written by "
            "`recede prune` or `recede run`"
        )
    manifest = json.loads((out / MANIFEST).read_text())
    spec = manifest["spec"]
    model = build_model(
        from_dict(ModelConfig, spec["model"]),
        num_classes=spec["num_classes"],
        in_channels=spec["in_channels"],
    )
    if spec.get("bounded_bn"):
        convert_to_bounded_bn_(model, shift=spec.get("bn_shift", False))
    reshape_to_manifest_(model, manifest["shapes"])
    model.load_state_dict(torch.load(out / WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval(), spec
