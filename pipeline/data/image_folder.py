"""An ImageFolder dataset checked before any work: its splits, its classes and every image.

``data.name: imagefolder`` reads ``data.root/train/<class>/<image>`` and
``data.root/val/<class>/<image>`` through ``torchvision.datasets.ImageFolder``. Left to itself,
torchvision finds a bad file in the middle of training (a raw ``UnidentifiedImageError``, after
the run folder was created) and reports a missing split or an empty class without naming the
split. :func:`scan_image_folder` runs first, from ``pipeline.data.datasets.load_data``, which ``recede
run``/``train`` call before they create their output folder, so a bad dataset exits 2 with
nothing on disk. Decisions:

- **What is checked.** Both splits exist (a missing one is named alone); each has class
  folders; every class folder holds at least one image (the message names split and class);
  both splits have the same classes (torchvision numbers classes per split in sorted order, so
  a class missing from ``val/`` would silently shift every label after it); every image opens
  and passes PIL's ``verify()``: the header, and for PNG every chunk's checksum, without
  decoding pixels (a full decode would double the scan's cost on ImageNet-sized data).
- **Unreadable files** stop the run (exit 2) naming the first file and counting the rest, unless
  ``data.skip_unreadable: true``: then they are left out of the dataset and their count and
  first names are logged as a warning. A file that passes ``verify()`` but fails to decode
  later still names itself (:func:`read_rgb`).
- **Hints fit the dataset.** The layout hint uses the image type the dataset holds (``*.png``
  for a folder of PNGs), and nothing mentions other datasets.
- **Images** are what torchvision's ImageFolder reads: files with one of its extensions
  (``IMG_EXTENSIONS``), found by the same ``os.walk`` under each class folder; other files are
  ignored, as torchvision does, but named when a class has no image.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.progress import progress

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
_SHOWN = 3  # unreadable files named in a message


class ImageFolderError(ValueError):
    """The ImageFolder dataset is not usable; the message names the split, class or file."""


@dataclass(frozen=True)
class FolderScan:
    """What the scan found: the classes, images per split, and unreadable files left out."""

    classes: tuple[str, ...]
    images: dict[str, int]
    skipped: frozenset[str]  # paths as torchvision's ImageFolder spells them


def _extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def _class_files(folder: Path) -> tuple[list[str], list[str]]:
    """(images, other files) under a class folder, walked as torchvision's ``make_dataset``."""
    images, others = [], []
    for dirpath, _, names in sorted(os.walk(str(folder), followlinks=True)):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            (images if name.lower().endswith(_extensions()) else others).append(path)
    return images, others


def _main_suffix(root: Path) -> str:
    """The commonest image suffix under the splits that exist (``.jpg`` when there is none)."""
    counts: Counter[str] = Counter()
    for split in SPLITS:
        for _, _, names in os.walk(str(root / split), followlinks=True):
            counts.update(
                Path(n).suffix.lower() for n in names if n.lower().endswith(_extensions())
            )
    return counts.most_common(1)[0][0] if counts else ".jpg"


def _check_splits(root: Path) -> None:
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if not missing:
        return
    present = [s for s in SPLITS if s not in missing]
    has = f"it has {present[0]}/" if present else "it has neither train/ nor val/"
    split = " or ".join(f"{s}/" for s in missing)
    suffix = _main_suffix(root)
    raise ImageFolderError(
        f"data.root {root} has no {split} folder ({has}); expected {root}/train/<class>/"
        f"*{suffix} and {root}/val/<class>/*{suffix} with the same class folders in both; "
        f"create {root}/{missing[0]}/ with one folder per class, or fix data.root"
    )


def _split_files(root: Path, split: str) -> dict[str, list[str]]:
    """Class name to image paths for one split; refuses a split without classes or an empty class."""
    folder = root / split
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise ImageFolderError(
            f"data.root split {split}/ ({folder}) holds no class folders; expected "
            f"{folder}/<class>/<images>, one folder per class"
        )
    files = {}
    for name in classes:
        images, others = _class_files(folder / name)
        if not images:
            found = (
                f"{len(others)} other files, e.g. {Path(others[0]).name}" if others else "nothing"
            )
            raise ImageFolderError(
                f"data.root split {split}/, class {name!r}: {folder / name} holds no images "
                f"(found {found}); expected at least one file ending in one of "
                f"{', '.join(_extensions())}; add images to it, or remove the class from "
                f"every split"
            )
        files[name] = images
    return files


def _check_same_classes(root: Path, files: dict[str, dict[str, list[str]]]) -> None:
    train, val = set(files["train"]), set(files["val"])
    if train == val:
        return
    only = {s: sorted(a - b) for s, a, b in (("train", train, val), ("val", val, train))}
    listed = "; ".join(f"only in {s}/: {', '.join(n)}" for s, n in only.items() if n)
    raise ImageFolderError(
        f"data.root {root}: the splits have different classes ({listed}); expected the same "
        "class folders in train/ and val/ (labels are numbered from the sorted class names, "
        "so they would not match); add the missing class folders or remove the extra ones"
    )


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read as an image, or None when it can."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {str(err).strip()[:120]}"
    return None


def _bad_files(files: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    paths = [p for split in files.values() for ps in split.values() for p in ps]
    bad = {}
    for path in progress(paths, "checking images", unit="image"):
        why = _unreadable(path)
        if why is not None:
            bad[path] = why
    return bad


def _refuse_unreadable(bad: dict[str, str]) -> None:
    first, why = next(iter(bad.items()))
    more = f"; {len(bad) - 1} more unreadable, e.g. {', '.join(list(bad)[1:_SHOWN])}"
    raise ImageFolderError(
        f"data.root: cannot read image {first} ({why}){more if len(bad) > 1 else ''}; "
        "expected every image file to open; replace or remove it, or set "
        "data.skip_unreadable=true to leave unreadable files out"
    )


def _drop_unreadable(files: dict[str, dict[str, list[str]]], bad: dict[str, str]) -> None:
    """Leave ``bad`` out of ``files`` in place; refuse when that empties a class."""
    logger.warning(
        "data.skip_unreadable: leaving out %d unreadable image(s), e.g. %s",
        len(bad),
        ", ".join(list(bad)[:_SHOWN]),
    )
    for split, classes in files.items():
        for name, paths in classes.items():
            classes[name] = [p for p in paths if p not in bad]
            if not classes[name]:
                raise ImageFolderError(
                    f"data.root split {split}/, class {name!r}: every image is unreadable "
                    f"(data.skip_unreadable left them all out); expected at least one readable "
                    "image per class; replace the files or remove the class from every split"
                )


def scan_image_folder(root: str | os.PathLike[str], *, skip_unreadable: bool = False) -> FolderScan:
    """Check an ImageFolder dataset before any work (see the module docstring).

    Args:
        root: ``data.root``, holding ``train/`` and ``val/``.
        skip_unreadable: Leave unreadable images out (logged) instead of refusing.

    Raises:
        ImageFolderError: a split or class is missing or empty, the splits' classes differ, or
            an image cannot be read (without ``skip_unreadable``).
    """
    root = Path(root)
    _check_splits(root)
    files = {split: _split_files(root, split) for split in SPLITS}
    _check_same_classes(root, files)
    bad = _bad_files(files)
    if bad and not skip_unreadable:
        _refuse_unreadable(bad)
    if bad:
        _drop_unreadable(files, bad)
    images = {s: sum(map(len, classes.values())) for s, classes in files.items()}
    logger.info("data.root %s: %s", root, ", ".join(f"{n} {s} images" for s, n in images.items()))
    return FolderScan(tuple(files["train"]), images, frozenset(bad))


def read_rgb(path: str):
    """torchvision's default image loader, whose failures name the file (exit 2 in the CLI).

    Returns:
        The image as a PIL RGB image.
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageFolderError(
            f"cannot decode image {path} ({type(err).__name__}: {str(err)[:120]}); "
            "replace or remove it, or set data.skip_unreadable=true"
        ) from None
