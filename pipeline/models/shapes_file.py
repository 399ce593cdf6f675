"""Read a saved model's ``shapes.json`` and check every field, naming the file and key when one is wrong.

A model folder holds ``model.pt`` (the state dict) and ``shapes.json``: ``spec`` (how to build
the unpruned model: ``model``, ``num_classes``, ``in_channels``, ``input_shape``, ``bounded_bn``,
``bn_shift``) and ``shapes`` (each pruned layer's widths). A malformed field (a zero or negative
size, a string, a bool where a number belongs, a layer the model lacks, a width larger than the
unpruned layer's) is refused here as a :class:`CheckpointError` that names ``shapes.json`` and the
key, before anything is built at that size. Pruning only narrows a layer, so the widths of the
unpruned model built from ``spec`` bound every width in ``shapes``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.layers.bn import is_bn
from pipeline.models.zoo import ModelSpec

SHAPES = "shapes.json"
LEGACY_SHAPES = "manifest.json"  # the name before run folders got a release manifest.json
_SPEC_KEYS = ("model", "num_classes", "in_channels", "input_shape")
_FIX = "restore the file or save the model again"
_LAYER_FIELDS = {  # type in shapes.json -> (module check, the integer widths it records)
    "Conv2d": (lambda m: isinstance(m, nn.Conv2d), ("in_channels", "out_channels", "groups")),
    "Linear": (lambda m: isinstance(m, nn.Linear), ("in_features", "out_features")),
    "BatchNorm": (is_bn, ("num_features",)),
}


class CheckpointError(ValueError):
    """A saved model folder or file cannot be loaded; the message names the file (CLI exit 2)."""


def shapes_path(folder: Path) -> Path:
    """``folder``'s shape manifest: ``shapes.json``, or ``manifest.json`` in older folders."""
    return folder / SHAPES if (folder / SHAPES).is_file() else folder / LEGACY_SHAPES


def _describe_keys(obj: Any) -> str:
    if not isinstance(obj, dict):
        return type(obj).__name__
    return f"keys {sorted(obj)}" if obj else "an empty object"


def read_shapes(folder: Path, weights: str) -> dict[str, Any]:
    """The parsed manifest of ``folder`` with its top-level keys present."""
    path = shapes_path(folder)
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has {weights} but no {SHAPES}; write the folder again with `recede prune` "
            "(or `recede train`), which saves both files together"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}); expected the shape manifest recede writes "
            f"beside {weights}; {_FIX}"
        ) from None
    spec = manifest.get("spec") if isinstance(manifest, dict) else None
    missing = [k for k in _SPEC_KEYS if not isinstance(spec, dict) or k not in spec]
    if missing or not isinstance(manifest.get("shapes"), dict):
        raise CheckpointError(
            f"{path} is not a shape manifest: expected keys 'spec' (with {', '.join(_SPEC_KEYS)}) "
            f"and 'shapes', got {_describe_keys(manifest)}; restore it or save the model again"
        )
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_spec_fields(spec: dict[str, Any], path: Path) -> None:
    """Each of spec's plain fields has its type and range (ints are never bools or floats)."""
    for key in ("num_classes", "in_channels"):
        if not _is_count(spec[key]):
            raise CheckpointError(
                f"{path}: key 'spec.{key}' must be an integer >= 1, got {spec[key]!r}; {_FIX}"
            )
    shape = spec["input_shape"]
    if not (isinstance(shape, list) and shape and all(_is_count(d) for d in shape)):
        raise CheckpointError(
            f"{path}: key 'spec.input_shape' must be one example's shape, a list of integers "
            f">= 1 such as [3, 32, 32], got {shape!r}; {_FIX}"
        )
    if shape[0] != spec["in_channels"]:
        raise CheckpointError(
            f"{path}: key 'spec.input_shape' {shape} starts with {shape[0]} channels, expected "
            f"spec.in_channels {spec['in_channels']}; {_FIX}"
        )
    for key in ("bounded_bn", "bn_shift"):
        if not isinstance(spec.get(key, False), bool):
            raise CheckpointError(
                f"{path}: key 'spec.{key}' must be true or false, got {spec[key]!r}; {_FIX}"
            )


def model_spec(spec: dict[str, Any], path: Path) -> ModelSpec:
    """``spec`` read as a ``ModelSpec``; a malformed field names the file and the key."""
    if not isinstance(spec["model"], dict):
        raise CheckpointError(
            f"{path}: key 'spec.model' must be a mapping such as {{'name': 'resnet20'}}, got "
            f"{spec['model']!r}; restore the file or save the model again"
        )
    _check_spec_fields(spec, path)
    try:
        return ModelSpec.from_dict(spec)
    except (ValueError, TypeError) as err:  # ConfigError is a ValueError
        raise CheckpointError(
            f"{path}: key 'spec.model' does not describe a model ({err}); expected a mapping "
            f"such as {{'name': 'resnet20'}} with valid model keys; {_FIX}"
        ) from None


def _check_layer(name: str, entry: Any, model: nn.Module, path: Path) -> None:
    where = f"{path}: key 'shapes.{name}'"
    kind = entry.get("type") if isinstance(entry, dict) else None
    if kind not in _LAYER_FIELDS:
        raise CheckpointError(
            f"{where} must be a mapping whose 'type' is one of {', '.join(_LAYER_FIELDS)}, got "
            f"{str(entry)[:120]}; {_FIX}"
        )
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        layer = None
    fits, fields = _LAYER_FIELDS[kind]
    if layer is None or not fits(layer):
        raise CheckpointError(
            f"{where} describes a {kind} layer, and the model spec builds "
            f"{type(layer).__name__ if layer is not None else 'no layer'} there; {_FIX}"
        )
    for field in fields:
        value, top = entry.get(field), getattr(layer, field)
        if not _is_count(value) or value > top:
            raise CheckpointError(
                f"{path}: key 'shapes.{name}.{field}' must be an integer in [1, {top}] (the "
                f"unpruned layer that 'spec' builds has {top}, and pruning only narrows it), got "
                f"{value!r}; {_FIX}"
            )
    if kind == "Conv2d" and (
        entry["in_channels"] % entry["groups"] or entry["out_channels"] % entry["groups"]
    ):
        raise CheckpointError(
            f"{where}: groups {entry['groups']} must divide in_channels {entry['in_channels']} "
            f"and out_channels {entry['out_channels']}; {_FIX}"
        )
    if not isinstance(entry.get("bias", False), bool):
        raise CheckpointError(
            f"{path}: key 'shapes.{name}.bias' must be true or false, got {entry['bias']!r}; {_FIX}"
        )
    corrections = entry.get("corrections", {})
    if not isinstance(corrections, dict) or not all(
        isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                    for d in s)
        for s in corrections.values()
    ):  # fmt: skip
        raise CheckpointError(
            f"{path}: key 'shapes.{name}.corrections' must map names to shapes (lists of integers >= 0), got "
            f"{str(corrections)[:120]}; {_FIX}"
        )


def check_layer_shapes(shapes: dict[str, Any], model: nn.Module, path: Path) -> None:
    """Every entry of ``shapes`` names a layer of the unpruned ``model`` of its type, with
    widths in [1, that layer's width]."""
    for name, entry in shapes.items():
        _check_layer(name, entry, model, path)
