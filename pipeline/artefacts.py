"""Open what ``recede bench`` measures: a run, prune or train folder, a model folder, an ONNX file.

Each path becomes one or more labelled :class:`~pipeline.bench.Artefact` s: a BN-folded PyTorch model (when
the path holds ``model.pt``) and its ONNX graph (when there is one). A run folder holds two,
``dense`` (``trained/`` + ``dense.onnx``) and ``pruned`` (``pruned/`` + ``pruned.onnx``). A
path that cannot be measured raises :class:`ArtefactError` naming it, before any timing.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from pipeline.bench import Artefact, count_macs

logger = logging.getLogger(__name__)

_KINDS = (
    "a `recede run` folder, a `recede prune` or `recede train` folder, a folder holding "
    "model.pt and shapes.json, or an .onnx file"
)


class ArtefactError(ValueError):
    """A MODEL path cannot be measured (missing, unreadable or of an unknown kind)."""


def _onnx_input(path: Path) -> tuple[tuple[int, ...], int | None]:
    """Check ``path`` with onnx; return its per-sample input shape and fixed batch (or None)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(graph)
    except Exception as err:  # noqa: BLE001 - protobuf and onnx raise several unrelated types
        raise ArtefactError(
            f"{path} is not a valid ONNX model ({type(err).__name__}: {str(err)[:200]}); "
            f"re-create it with `recede export {path.parent}` or delete it"
        ) from None
    inputs = [
        i for i in graph.graph.input if i.name not in {t.name for t in graph.graph.initializer}
    ]
    dims = (
        [
            d.dim_value if d.HasField("dim_value") else 0
            for d in inputs[0].type.tensor_type.shape.dim
        ]
        if inputs
        else []
    )
    if len(inputs) != 1 or len(dims) < 2 or min(dims[1:]) < 1:
        raise ArtefactError(
            f"{path}: expected one input with static dimensions after the batch axis, got "
            f"{len(inputs)} inputs, shape {dims} (0 = dynamic); export with a fixed C,H,W"
        )
    return tuple(dims[1:]), dims[0] or None


def _check_against_manifest(folder: Path, onnx: Path) -> None:
    """Refuse to pair ``onnx`` with ``folder``'s weights when the release manifest beside them
    (in the folder or its parent run folder) records other bytes for either: a stale ONNX
    beside re-saved weights would be timed as if it were that model."""
    import json

    from pipeline.integrity import file_sha256

    mine = {(folder / "model.pt").resolve()}  # the ONNX itself: its own checks come next
    for manifest in (folder / "manifest.json", folder.parent / "manifest.json"):
        try:
            entries = json.loads(manifest.read_text(encoding="utf-8"))["artefacts"].values()
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # no manifest here (or not one of recede's): nothing recorded to compare
        changed = [
            str(path)
            for entry in entries
            if isinstance(entry, dict)
            and (path := (manifest.parent / str(entry.get("path", ""))).resolve()) in mine
            and path.is_file()
            and file_sha256(path) != entry.get("sha256")
        ]
        if changed:
            raise ArtefactError(
                f"{folder}: {', '.join(changed)} no longer match {manifest}: the weights "
                f"changed after {onnx.name} was exported; expected the bytes the manifest records; "
                f"re-export with `recede export {folder}` so the ONNX is built from these weights"
            )


def _torch_artefact(label: str, folder: Path, onnx: Path | None) -> Artefact:
    """Load ``folder``'s model, fold its BNs and pair it with ``onnx`` when that exists."""
    import torch

    from pipeline.checkpoint import load_pruned
    from pipeline.fold import fold_bn

    model, spec = load_pruned(folder)
    shape = tuple(int(d) for d in spec["input_shape"])
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    folded, _ = fold_bn(model, example)
    fixed = None
    if onnx is not None and onnx.is_file():
        _check_against_manifest(folder, onnx)
        onnx_shape, fixed = _onnx_input(onnx)
        if onnx_shape != shape:
            raise ArtefactError(
                f"{onnx} takes inputs of shape {onnx_shape}, but {folder / 'shapes.json'} says "
                f"{shape}; re-export it with `recede export {folder}`"
            )
    else:
        onnx = None
    return Artefact(label, str(folder), shape, folded, onnx, fixed, count_macs(folded, shape))


def open_artefacts(path: str | Path) -> list[Artefact]:
    """The artefacts at ``path`` (see the module docstring), labelled by role or name.

    Raises:
        ArtefactError: ``path`` is missing, of an unknown kind, or holds an invalid ONNX file.
        CheckpointError: Its ``model.pt`` or ``shapes.json`` is missing, damaged or unsafe.
    """
    from pipeline.checkpoint import WEIGHTS, model_folder

    root = Path(path)
    if not root.exists():
        raise ArtefactError(f"MODEL {root}: no such file or folder; expected {_KINDS}")
    if root.is_file():
        if root.suffix != ".onnx":
            raise ArtefactError(f"MODEL {root}: a file, but not .onnx; expected {_KINDS}")
        shape, fixed = _onnx_input(root)
        return [Artefact(root.stem, str(root), shape, None, root, fixed)]
    if (root / "trained" / WEIGHTS).is_file() and (root / "pruned" / WEIGHTS).is_file():
        return [
            _torch_artefact(label, root / sub, root / f"{label}.onnx")
            for label, sub in (("dense", "trained"), ("pruned", "pruned"))
        ]
    folder = model_folder(root)
    return [_torch_artefact(root.name, folder, folder / "model.onnx")]


def unique_labels(artefacts: list[Artefact]) -> list[Artefact]:
    """``artefacts`` with repeated labels made unique (``pruned``, ``pruned-2``, ...)."""
    seen: dict[str, int] = {}
    out = []
    for a in artefacts:
        seen[a.label] = seen.get(a.label, 0) + 1
        out.append(a if seen[a.label] == 1 else replace(a, label=f"{a.label}-{seen[a.label]}"))
    return out


def check_batches(artefacts: list[Artefact], batches: tuple[int, ...]) -> None:
    """Refuse batch sizes an ONNX graph with a fixed batch axis cannot take.

    Raises:
        ArtefactError: naming the file, its batch and ``--batches``.
    """
    for a in artefacts:
        wrong = [b for b in batches if a.fixed_batch is not None and b != a.fixed_batch]
        if wrong:
            raise ArtefactError(
                f"{a.onnx} has a fixed batch of {a.fixed_batch}, but --batches asks for "
                f"{wrong}; pass --batches {a.fixed_batch}, or export with a dynamic batch axis"
            )
