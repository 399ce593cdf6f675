"""Open what ``recede bench`` measures: a run, prune or train folder, a model folder, an ONNX file.

Each path becomes one or more labelled :class:`Artefact` s: a BN-folded PyTorch model (when
the path holds ``model.pt``) and its ONNX graph (when there is one). A run folder holds two,
``dense`` (``trained/`` + ``dense.onnx``) and ``pruned`` (``pruned/`` + ``pruned.onnx``). A
path that cannot be measured raises :class:`ArtefactError` naming it, before any timing.

INT8 graphs (``dense.int8.onnx``/``pruned.int8.onnx`` in a run folder, ``model.int8.onnx`` in a
model or release folder) open as artefacts of their own, with the label of the model they
quantize and precision ``int8``: ONNX Runtime times them interleaved with the fp32 graphs, and
their speed-up is against the dense fp32 model like every other row's.

A pruned model alone says nothing about speed, so :func:`dense_reference` finds the dense model
it came from. Decision: nothing new is stored beside pruned artefacts. A run's ``pruned/``
already has its trained dense model one folder up (``trained/`` + ``dense.onnx``), used as is.
A ``recede prune`` folder records the model spec in ``shapes.json`` and a ``recede export``
folder in ``manifest.json`` (``config.spec``); the dense model is rebuilt from that spec with
fresh weights. Latency depends on layer shapes, not on weight values, so the rebuilt model times
as the trained one would, and copying a dense checkpoint (often larger than the pruned one) into
every prune folder buys nothing. A spec that cannot be rebuilt here (a user factory not on the
path) is refused with a message; ``recede bench --reference MODEL`` names the dense model
explicitly instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.graph.costs import count_macs

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

_KINDS = (
    "a `recede run` folder, a `recede prune` or `recede train` folder, a folder holding "
    "model.pt and shapes.json, or an .onnx file"
)


@dataclass(frozen=True)
class Artefact:
    """One model to time, under every backend it can run on (:func:`open_artefacts` opens them).

    Attributes:
        label: Row name, e.g. ``"dense"``, ``"pruned"`` or the folder's name.
        source: Where it came from (the MODEL path it was opened from).
        input_shape: Per-sample input shape, e.g. ``(3, 32, 32)``.
        model: The BN-folded network in eval mode on the CPU, or None (an ONNX file alone).
        onnx: Its ONNX graph, or None.
        fixed_batch: The ONNX input's batch size when it is not dynamic, else None.
        macs: Multiply-accumulates per sample of ``model`` (None without one).
        precision: ``fp32``, or ``int8`` for a quantized (QDQ) graph, which has no torch model.
    """

    label: str
    source: str
    input_shape: tuple[int, ...]
    model: nn.Module | None
    onnx: Path | None
    fixed_batch: int | None = None
    macs: int | None = None
    precision: str = "fp32"


class ArtefactError(ValueError):
    """A MODEL path cannot be measured (missing, unreadable or of an unknown kind)."""


def onnx_input(path: Path) -> tuple[tuple[int, ...], int | None]:
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

    from pipeline.core.integrity import file_sha256

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


def _folded(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """``model`` with its BNs folded, as it is exported and timed."""
    import torch

    from pipeline.fold.batchnorm import fold_bn

    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    return fold_bn(model.eval(), example)[0]


def _torch_artefact(label: str, folder: Path, onnx: Path | None) -> Artefact:
    """Load ``folder``'s model, fold its BNs and pair it with ``onnx`` when that exists."""
    from pipeline.models.checkpoint import load_pruned

    model, spec = load_pruned(folder)
    shape = spec.input_shape
    folded = _folded(model, shape)
    fixed = None
    if onnx is not None and onnx.is_file():
        _check_against_manifest(folder, onnx)
        onnx_shape, fixed = onnx_input(onnx)
        if onnx_shape != shape:
            raise ArtefactError(
                f"{onnx} takes inputs of shape {onnx_shape}, but {folder / 'shapes.json'} says "
                f"{shape}; re-export it with `recede export {folder}`"
            )
    else:
        onnx = None
    return Artefact(label, str(folder), shape, folded, onnx, fixed, count_macs(folded, shape))


def _with_int8(artefact: Artefact, path: Path) -> list[Artefact]:
    """``artefact``, and its INT8 graph at ``path`` when that file exists."""
    if not path.is_file():
        return [artefact]
    shape, fixed = onnx_input(path)
    if shape != artefact.input_shape:
        raise ArtefactError(
            f"{path} takes inputs of shape {shape}, and its fp32 model {artefact.input_shape}; "
            f"re-export it with `recede export --format onnx-int8`"
        )
    int8 = Artefact(artefact.label, str(path), shape, None, path, fixed, artefact.macs, "int8")
    return [artefact, int8]


def open_artefacts(path: str | Path) -> list[Artefact]:
    """The artefacts at ``path`` (see the module docstring), labelled by role or name.

    Raises:
        ArtefactError: ``path`` is missing, of an unknown kind, or holds an invalid ONNX file.
        CheckpointError: Its ``model.pt`` or ``shapes.json`` is missing, damaged or unsafe.
    """
    from pipeline.models.checkpoint import WEIGHTS, model_folder

    root = Path(path)
    if not root.exists():
        raise ArtefactError(f"MODEL {root}: no such file or folder; expected {_KINDS}")
    if root.is_file():
        if root.suffix != ".onnx":
            raise ArtefactError(f"MODEL {root}: a file, but not .onnx; expected {_KINDS}")
        from pipeline.bench.onnx_macs import onnx_macs
        from pipeline.export.int8 import is_qdq

        shape, fixed = onnx_input(root)
        precision = "int8" if is_qdq(root) else "fp32"
        macs = onnx_macs(root)  # the graph's own count: a release holds no weights
        return [Artefact(root.stem, str(root), shape, None, root, fixed, macs, precision)]
    if (root / "trained" / WEIGHTS).is_file() and (root / "pruned" / WEIGHTS).is_file():
        fp32 = [
            _torch_artefact(label, root / sub, root / f"{label}.onnx")
            for label, sub in (("dense", "trained"), ("pruned", "pruned"))
        ]
        return [a for f in fp32 for a in _with_int8(f, root / f"{f.label}.int8.onnx")]
    if not (root / WEIGHTS).is_file() and (root / "model.onnx").is_file():  # an export --out
        return _with_int8(open_artefacts(root / "model.onnx")[0], root / "model.int8.onnx")
    folder = model_folder(root)
    return _with_int8(
        _torch_artefact(root.name, folder, folder / "model.onnx"), folder / "model.int8.onnx"
    )


def _recorded_spec(root: Path) -> tuple[dict | None, Path | None]:
    """The model spec a prune folder (``shapes.json``) or an export folder (``manifest.json``
    ``config.spec``) records for ``root`` (a folder or a file in one), and where; a
    ``shapes.json`` counts only beside the ``plan.json`` of a prune."""
    import json

    folder = root if root.is_dir() else root.parent
    pruned = (folder / "plan.json").is_file()  # shapes.json alone may be a dense train folder's
    for name, keys in (("shapes.json", ("spec",)), ("manifest.json", ("config", "spec"))):
        if name == "shapes.json" and not pruned:
            continue
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8"))
            for key in keys:
                value = value[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, dict):
            return value, folder / name
    return None, None


def _rebuilt_dense(spec: dict, where: Path, with_onnx: bool) -> Artefact:
    """The dense model ``spec`` describes, fresh weights (seed 0, so the same spec gives the
    same model and the same sha256 in a bench baseline), folded; exported to ONNX in a
    temporary folder (removed at exit) when ``with_onnx``."""
    import atexit
    import shutil
    import tempfile

    import torch

    from pipeline.models.zoo import ModelError, ModelSpec

    try:
        typed = ModelSpec.from_dict(spec)
        shape = tuple(int(d) for d in typed.input_shape)
        with torch.random.fork_rng(devices=[]):  # one spec, one model: a baseline's sha256 holds
            torch.manual_seed(0)
            model = _folded(typed.build(), shape)
    except (ModelError, KeyError, TypeError, ValueError) as err:
        raise ArtefactError(
            f"{where}: cannot rebuild the dense model from its recorded spec ({err}); expected "
            "a model this machine can build; pass --reference MODEL with the dense model"
        ) from None
    onnx = None
    if with_onnx:
        from pipeline.export.onnx import export_onnx

        tmp = Path(tempfile.mkdtemp(prefix="recede-dense-"))
        atexit.register(shutil.rmtree, tmp, True)
        example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        onnx = export_onnx(model, example, tmp / "dense.onnx")
    source = f"rebuilt from {where} (fresh weights: latency depends on shapes only)"
    return Artefact("dense", source, shape, model, onnx, None, count_macs(model, shape))


def dense_reference(path: str | Path, pruned: Artefact) -> Artefact | None:
    """The dense model ``pruned`` (opened from ``path``) came from, labelled ``dense``, or
    None when ``path`` records none (see the module docstring for where it is found).

    Raises:
        ArtefactError: The recorded spec cannot be rebuilt here.
    """
    from pipeline.models.checkpoint import WEIGHTS

    root = Path(path)
    run = root.parent if root.is_dir() else root.parent.parent
    inside = {run.resolve(), (run / "trained").resolve()}
    if (run / "trained" / WEIGHTS).is_file() and root.resolve() not in inside:
        return _torch_artefact("dense", run / "trained", run / "dense.onnx")
    spec, where = _recorded_spec(root)
    if spec is None or where is None:
        return None
    return _rebuilt_dense(spec, where, with_onnx=pruned.onnx is not None)


def unique_labels(artefacts: list[Artefact]) -> list[Artefact]:
    """``artefacts`` with repeated labels made unique (``pruned``, ``pruned-2``, ...); a model's
    INT8 graph keeps its model's label (its rows differ by precision)."""
    seen: dict[str, int] = {}
    out: list[Artefact] = []
    for a in artefacts:
        if a.precision == "int8" and a.model is None and out and out[-1].precision == "fp32":
            out.append(replace(a, label=out[-1].label))  # a model's INT8 graph follows it
            continue
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
