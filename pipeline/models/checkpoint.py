"""Save and rebuild pruned models: a JSON shape manifest plus a state dict, never a pickle.

A model folder holds ``model.pt`` and ``shapes.json``.

A pruned model is rebuilt by calling its original constructor (from the saved model spec),
re-shaping the layers named in the manifest, and loading the state dict with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.atomic import save_torch_atomic, write_json_atomic
from pipeline.layers.bn import convert_to_bounded_bn_, is_bn
from pipeline.layers.corrected_conv import corrections, make_corrected_
from pipeline.models.shapes_file import (  # noqa: F401 - CheckpointError, SHAPES: public here
    LEGACY_SHAPES,
    SHAPES,
    CheckpointError,
    check_layer_shapes,
    model_spec,
    read_shapes,
    shapes_path,
)
from pipeline.models.zoo import ModelSpec

WEIGHTS = "model.pt"
MODEL_SUBFOLDERS = ("model", "trained")  # `recede train` and `recede run` save the model there


logger = logging.getLogger(__name__)


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
                "corrections": {k: list(v.shape) for k, v in corrections(m).items()},
            }
        elif isinstance(m, nn.Linear):
            shapes[name] = {
                "type": "Linear",
                "in_features": m.in_features,
                "out_features": m.out_features,
            }
        elif is_bn(m):
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


def save_pruned(
    model: nn.Module, out_dir: str | Path, *, spec: ModelSpec | Mapping[str, Any]
) -> Path:
    """Write ``model.pt`` (state dict) and ``shapes.json`` (spec + shapes) into ``out_dir``.

    ``spec`` is a :class:`~pipeline.models.zoo.ModelSpec` (as :func:`load_pruned` returns it), or
    its :meth:`~pipeline.models.zoo.ModelSpec.to_dict` mapping (written unchanged).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_dict = spec.to_dict() if isinstance(spec, ModelSpec) else dict(spec)
    save_torch_atomic(model.state_dict(), out / WEIGHTS)
    write_json_atomic(out / SHAPES, {"spec": spec_dict, "shapes": shape_manifest(model)})
    return out


def model_folder(path: str | Path) -> Path:
    """The folder holding a saved model: ``path`` itself, or a train (``model/``) or run
    (``trained/``) folder's model.

    Raises:
        CheckpointError: If none of them holds ``model.pt``.
    """
    root = Path(path)
    for candidate in (root, *(root / sub for sub in MODEL_SUBFOLDERS)):
        if (candidate / WEIGHTS).is_file():
            return candidate
    raise CheckpointError(
        f"{root} holds no saved model: expected {WEIGHTS} and {SHAPES} in it or in its "
        f"{' or '.join(s + '/' for s in MODEL_SUBFOLDERS)} subfolder; pass a folder written by "
        "`recede train`, `recede prune` or `recede run`"
    )


def _unpickling_reason(err: Exception) -> str:
    """The line of torch's weights-only refusal that says what was refused, without its advice."""
    lines = [ln.strip() for ln in str(err).splitlines() if "nsupported" in ln]
    return lines[-1][:200] if lines else "not a torch file"


def load_state_dict_file(path: Path, *, plain: bool = True) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` that names ``path`` in every failure.

    ``plain`` requires a flat state dict (names to tensors); otherwise any dict is accepted
    (a full training checkpoint).

    Raises:
        CheckpointError: If the file is empty, truncated, not a torch file, holds objects other
            than tensors (a pickle with code is refused, never run), or is not a state dict.
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); expected a state dict; save it again")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol warns before it is refused
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's advice (weights_only=False) is not ours
        raise CheckpointError(
            f"{path} is not a plain state dict ({_unpickling_reason(err)}), so it was refused "
            "without running it; expected the state dict recede saves; restore it, or write the "
            "folder again with the command that made it (`recede prune`, `recede train`)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(
            f"{path} ({size} bytes) is not a readable torch file ({type(err).__name__}: "
            f"{str(err)[:200]}); it may be truncated; restore it or save the model again"
        ) from None
    tensors = not plain or all(
        isinstance(v, torch.Tensor) for v in getattr(state, "values", list)()
    )
    if not isinstance(state, dict) or not tensors:
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, expected a state dict (names to tensors); "
            "restore it, or write the folder again with the command that made it (`recede prune`, "
            "`recede train`)"
        )
    return state


def load_pruned(out_dir: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model saved by ``save_pruned``; returns (model, its spec).

    ``out_dir`` may also be a train or run folder (see :func:`model_folder`). Folders saved
    before ``shapes.json`` existed (``manifest.json`` with ``spec`` and ``shapes``) still load.

    Raises:
        CheckpointError: If a file is missing, malformed or does not match the model.
    """
    folder = model_folder(out_dir)
    manifest, path = read_shapes(folder, WEIGHTS), shapes_path(folder)
    typed = model_spec(manifest["spec"], path)
    model = typed.build()
    classes = _output_width(model.eval(), typed.input_shape, path)  # the head is never pruned
    if typed.bounded_bn:
        convert_to_bounded_bn_(model, shift=typed.bn_shift)
    check_layer_shapes(manifest["shapes"], model, path)
    state = load_state_dict_file(folder / WEIGHTS)
    try:
        reshape_to_manifest_(model, manifest["shapes"])
        model.load_state_dict(state)
    except (RuntimeError, KeyError, AttributeError, TypeError) as err:
        raise CheckpointError(
            f"{folder / WEIGHTS} does not fit the model its shape manifest describes "
            f"({type(err).__name__}: {str(err)[:300]}); save both files again together"
        ) from None
    got = _output_width(model.eval(), typed.input_shape, path)
    if None not in (classes, got) and classes != got:  # an edited spec would be carried on
        raise CheckpointError(
            f"{folder / SHAPES}: spec.num_classes {typed.num_classes} builds a model with "
            f"{classes} outputs, but the weights in {folder / WEIGHTS} give {got}; expected "
            "them to agree; restore shapes.json (or save the model again)"
        )
    return model, typed


def _output_width(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> int | None:
    """Width of ``model``'s 2-D output for one example, or None if it cannot be told.

    A model that cannot take its own recorded ``spec.input_shape`` at all is refused here,
    naming ``shapes.json``: export, bench and prune would all fail on it later.
    """
    import torch

    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise CheckpointError(
            f"{path}: key 'spec.input_shape' {list(input_shape)}: the model cannot take an input "
            f"of that shape ({type(err).__name__}: {first}); expected the shape it was saved "
            "with; restore the file or save the model again"
        ) from None
    return out.shape[1] if isinstance(out, torch.Tensor) and out.ndim == 2 else None
