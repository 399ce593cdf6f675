"""Samples for INT8: calibration, validation and held-out inputs, from a run's data or from a path.

Three disjoint sets, each with its own job (``pipeline.export.int8_export``):

- **calibration** sets the quantization ranges;
- **validation** decides which layers the sensitive-layer fallback keeps in float;
- **held-out** judges the result (the verdict), so no choice is made on the data that judges it.

From a run (``recede run``, or ``recede export`` of a run's model folder) calibration and
validation come from the **training split** and the held-out samples are the **test split**,
drawn by index with a fixed seed (never through the shuffling loader), so the same run gives the
same samples and a re-export the same bytes. From a path (``--calibration PATH``, for a folder
that carries no data) one seeded shuffle splits the inputs: a quarter held out, a quarter for
validation, the rest (up to the calibration count) for calibration. Such inputs have no labels
(an image folder's class folders need not match the model's classes), so INT8 is judged by its
agreement with fp32 there (``pipeline.export.int8_check``).

A path is a ``.npy`` array ``[N, C, H, W]`` of model inputs, preprocessed as the model expects,
or a folder of images (searched recursively: an ImageFolder, recede's ``train/``/``val/``
layout or a flat folder), read as ``recede run`` reads ``data.name: imagefolder``: resized to
the model's H x W, scaled to [0, 1], no normalisation. A 3-channel model reads every image as
RGB (as training did); a 1-channel model takes greyscale (mode ``L``) images only. Everything
is checked before any work, and a bad path raises :class:`CalibrationError` naming it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

MIN_PATH_SAMPLES = 8
"""Fewest inputs a ``--calibration`` path may hold: two each for validation and held-out."""


class CalibrationError(ValueError):
    """Calibration data cannot be used; the message names the path or flag (CLI exit 2)."""


@dataclass(frozen=True)
class Int8Samples:
    """Calibration, validation and held-out inputs (float32 ``[n, C, H, W]``) and labels."""

    calibration: np.ndarray
    validation: np.ndarray
    validation_labels: np.ndarray | None
    heldout: np.ndarray
    heldout_labels: np.ndarray | None
    source: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """Where the samples came from and how many of each, for the report and manifest."""
        return {
            **self.source,
            "calibration_samples": len(self.calibration),
            "validation_samples": len(self.validation),
            "heldout_samples": len(self.heldout),
            "labelled": self.heldout_labels is not None,
        }


def _draw(dataset: Dataset, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np
    import torch

    xs, ys = [], []
    for i in indices:
        x, y = dataset[int(i)]
        xs.append(torch.as_tensor(x, dtype=torch.float32).numpy())
        ys.append(int(y))
    return np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.int64)


def from_datasets(
    train: Dataset,
    test: Dataset,
    *,
    calibration: int,
    validation: int,
    heldout: int,
    seed: int,
    name: str,
) -> Int8Samples:
    """Calibration and validation from ``train``, held-out from ``test`` (see the module
    docstring); each count is capped by what the split holds."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(train))
    validation = min(validation, len(order) // 2)
    cal, val = order[: min(calibration, len(order) - validation)], order[-validation:]
    test_order = np.random.default_rng(seed).permutation(len(test))[:heldout]
    x_cal, _ = _draw(train, cal)
    x_val, y_val = _draw(train, val)
    x_out, y_out = _draw(test, np.sort(test_order))
    source = {"from": name, "calibration_split": "train", "heldout_split": "test", "seed": seed}
    return Int8Samples(x_cal, x_val, y_val, x_out, y_out, source)


def from_path(
    path: str | os.PathLike[str], input_shape: Sequence[int], *, calibration: int, seed: int
) -> Int8Samples:
    """Split the inputs at ``path`` (see the module docstring); unlabelled.

    Raises:
        CalibrationError: missing, empty, unreadable, of the wrong shape or channel count.
    """
    import numpy as np

    inputs = read_inputs(path, input_shape)
    order = np.random.default_rng(seed).permutation(len(inputs))
    quarter = len(order) // 4
    heldout, validation, rest = order[:quarter], order[quarter : 2 * quarter], order[2 * quarter :]
    cal = np.sort(rest[:calibration])
    source = {"from": str(path), "seed": seed, "labels": "fp32 decisions (no labels)"}
    return Int8Samples(
        inputs[cal], inputs[np.sort(validation)], None, inputs[np.sort(heldout)], None, source
    )


def read_inputs(path: str | os.PathLike[str], input_shape: Sequence[int]) -> np.ndarray:
    """Every input at ``path`` as float32 ``[N, *input_shape]``, checked (module docstring).

    Raises:
        CalibrationError: naming ``--calibration``, the path, what was expected and what was got.
    """
    path = Path(path)
    shape = tuple(int(d) for d in input_shape)
    if not path.exists():
        raise CalibrationError(
            f"--calibration {path}: no such file or folder; pass a .npy array of inputs "
            f"[N, {', '.join(map(str, shape))}] or a folder of images"
        )
    inputs = _read_npy(path, shape) if path.is_file() else _read_images(path, shape)
    if len(inputs) < MIN_PATH_SAMPLES:
        raise CalibrationError(
            f"--calibration {path}: holds {len(inputs)} inputs, expected at least "
            f"{MIN_PATH_SAMPLES} (calibration, validation and held-out samples come from it); "
            "add more inputs"
        )
    return inputs


def _read_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import numpy as np

    if path.suffix != ".npy":
        raise CalibrationError(
            f"--calibration {path}: expected a .npy array or a folder of images, got a "
            f"{path.suffix or 'suffix-less'} file"
        )
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CalibrationError(
            f"--calibration {path}: not a readable .npy array ({err}); save it with numpy.save"
        ) from None
    if array.ndim != len(shape) + 1 or tuple(array.shape[1:]) != shape:
        raise CalibrationError(
            f"--calibration {path}: expected inputs of shape [N, {', '.join(map(str, shape))}] "
            f"(the model's input, C={shape[0]} channels), got {list(array.shape)}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise CalibrationError(
            f"--calibration {path}: expected floating-point model inputs (preprocessed as the "
            f"model expects), got dtype {array.dtype}; save them as float32"
        )
    if not np.isfinite(array).all():
        raise CalibrationError(f"--calibration {path}: holds NaN or Inf; expected finite inputs")
    return array.astype(np.float32)


def _image_files(folder: Path) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(
        Path(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMG_EXTENSIONS)
    )


def _read_images(folder: Path, shape: tuple[int, ...]) -> np.ndarray:
    import numpy as np

    channels = shape[0]
    if channels not in (1, 3) or len(shape) != 3:
        raise CalibrationError(
            f"--calibration {folder}: images feed 1- or 3-channel [C, H, W] models, and this "
            f"model takes {list(shape)}; pass a .npy array of inputs instead"
        )
    files = _image_files(folder)
    if not files:
        raise CalibrationError(
            f"--calibration {folder}: the folder holds no images (searched recursively for "
            ".png, .jpg and the other ImageFolder extensions); add images or pass a .npy array"
        )
    return np.stack([_read_image(f, shape) for f in files]).astype(np.float32)


def _read_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import torchvision.transforms.functional as TF
    from PIL import Image

    try:
        with Image.open(path) as image:
            mode = image.mode
            picture = image.convert("RGB" if shape[0] == 3 else "L")
    except (OSError, SyntaxError, ValueError) as err:
        raise CalibrationError(
            f"--calibration {path}: cannot decode the image ({type(err).__name__}: "
            f"{str(err)[:120]}); replace or remove it"
        ) from None
    if shape[0] == 1 and mode != "L":
        raise CalibrationError(
            f"--calibration {path}: the model takes 1 channel (greyscale), the image has mode "
            f"{mode!r}; convert the images to greyscale ('L') or pass a .npy array"
        )
    return TF.to_tensor(TF.resize(picture, [shape[1], shape[2]])).numpy()
