"""pipeline.data.calibration: disjoint, seeded INT8 samples, and every bad path refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from pipeline.data.calibration import (
    MIN_PATH_SAMPLES,
    CalibrationError,
    from_datasets,
    from_path,
    read_inputs,
)

SHAPE = (1, 4, 4)


def _dataset(n: int, offset: int = 0) -> TensorDataset:
    """Sample i holds the value i + offset everywhere, so every sample can be told apart."""
    x = torch.arange(offset, offset + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, *SHAPE)
    return TensorDataset(x.clone(), torch.arange(n) % 10)


def _ids(array: np.ndarray) -> set[int]:
    return {int(v) for v in array[:, 0, 0, 0]}


@settings(max_examples=60, deadline=None)
@given(
    n_train=st.integers(4, 300),
    n_test=st.integers(1, 200),
    cal=st.integers(1, 400),
    val=st.integers(1, 400),
    out=st.integers(1, 400),
    seed=st.integers(0, 2**16),
)
def test_calibration_validation_and_heldout_never_overlap(n_train, n_test, cal, val, out, seed):
    train, test = _dataset(n_train), _dataset(n_test, offset=10_000)
    s = from_datasets(train, test, calibration=cal, validation=val, heldout=out, seed=seed,
                      name="t")  # fmt: skip
    c, v, h = _ids(s.calibration), _ids(s.validation), _ids(s.heldout)
    assert not c & v and not (c | v) & h  # three disjoint sets
    assert len(c) == len(s.calibration) and len(v) == len(s.validation)  # no repeats
    assert 1 <= len(s.calibration) <= cal and 1 <= len(s.validation) <= val
    assert len(s.heldout) == min(out, n_test) and all(i >= 10_000 for i in h)  # the test split
    assert s.heldout_labels is not None and len(s.heldout_labels) == len(s.heldout)
    again = from_datasets(train, test, calibration=cal, validation=val, heldout=out, seed=seed,
                          name="t")  # fmt: skip
    assert np.array_equal(again.calibration, s.calibration)  # seeded: re-export, same bytes


def test_a_path_splits_into_unlabelled_disjoint_quarters(tmp_path) -> None:
    x = _dataset(40).tensors[0].numpy()
    np.save(tmp_path / "x.npy", x)
    s = from_path(tmp_path / "x.npy", SHAPE, calibration=100, seed=0)
    assert (len(s.heldout), len(s.validation), len(s.calibration)) == (10, 10, 20)
    assert s.heldout_labels is None and s.validation_labels is None
    c, v, h = _ids(s.calibration), _ids(s.validation), _ids(s.heldout)
    assert c | v | h == set(range(40)) and not c & v and not (c | v) & h
    assert len(from_path(tmp_path / "x.npy", SHAPE, calibration=5, seed=0).calibration) == 5
    assert s.record()["labelled"] is False


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((20, 3, 4, 4), np.float32), r"expected inputs of shape \[N, 1, 4, 4\]"),
        (np.zeros((20, 1, 8, 8), np.float32), r"got \[20, 1, 8, 8\]"),
        (np.zeros((1, 4, 4), np.float32), r"got \[1, 4, 4\]"),
        (np.zeros((20, 1, 4, 4), np.int64), "expected floating-point model inputs"),
        (np.full((20, 1, 4, 4), np.nan, np.float32), "NaN or Inf"),
        (np.zeros((MIN_PATH_SAMPLES - 1, 1, 4, 4), np.float32), "at least 8"),
    ],
)
def test_a_bad_array_is_refused_naming_the_flag_and_file(tmp_path, array, match) -> None:
    path = tmp_path / "x.npy"
    np.save(path, array)
    with pytest.raises(CalibrationError, match=match) as err:
        read_inputs(path, SHAPE)
    assert "--calibration" in str(err.value) and str(path) in str(err.value)


def test_missing_empty_and_unreadable_paths_are_refused(tmp_path) -> None:
    with pytest.raises(CalibrationError, match="no such file or folder"):
        read_inputs(tmp_path / "nope", SHAPE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="holds no images"):
        read_inputs(tmp_path / "empty", SHAPE)
    (tmp_path / "x.txt").write_text("1,2,3")
    with pytest.raises(CalibrationError, match="expected a .npy array or a folder of images"):
        read_inputs(tmp_path / "x.txt", SHAPE)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(CalibrationError, match="not a readable .npy array"):
        read_inputs(tmp_path / "bad.npy", SHAPE)


def _images(folder, mode: str, count: int = 10) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(count // 2):
            Image.new(mode, (7, 5), color=(i * 20) if mode == "L" else (i * 20, 0, 0)).save(
                folder / c / f"{i}.png"
            )


def test_an_image_folder_is_read_resized_and_scaled(tmp_path) -> None:
    _images(tmp_path / "grey", "L")
    x = read_inputs(tmp_path / "grey", SHAPE)
    assert x.shape == (10, *SHAPE) and x.dtype == np.float32 and 0.0 <= x.min() <= x.max() <= 1.0
    _images(tmp_path / "rgb", "RGB")
    assert read_inputs(tmp_path / "rgb", (3, 6, 6)).shape == (10, 3, 6, 6)
    assert read_inputs(tmp_path / "grey", (3, 6, 6)).shape == (10, 3, 6, 6)  # as training does


def test_colour_images_for_a_greyscale_model_are_refused(tmp_path) -> None:
    _images(tmp_path, "RGB")
    with pytest.raises(CalibrationError, match="takes 1 channel .* mode 'RGB'"):
        read_inputs(tmp_path, SHAPE)
    with pytest.raises(CalibrationError, match="1- or 3-channel"):
        read_inputs(tmp_path, (4, 6, 6))


def test_an_undecodable_image_is_named(tmp_path) -> None:
    _images(tmp_path, "L")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(CalibrationError, match="broken.png: cannot decode"):
        read_inputs(tmp_path, SHAPE)
