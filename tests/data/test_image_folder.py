"""An ImageFolder dataset is checked before any work; each error names split, class or file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.datasets import DataError, load_data

CLASSES = ("cat", "dog")


def _png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 255 - shade, 0)).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """root/{train,val}/{cat,dog}/N.png: 3 train and 2 val 8x8 PNGs per class."""
    root = tmp_path / "data"
    for split, n in (("train", 3), ("val", 2)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                _png(root / split / name / f"{i}.png", 40 * i + 100 * c)
    return root


def _load(root: Path, **kw):
    return load_data(DataConfig(name="imagefolder", root=str(root), image_size=8, **kw))


def test_a_good_folder_loads(folder):
    data = _load(folder)
    assert (len(data.train.dataset), len(data.test.dataset), data.num_classes) == (6, 4, 2)
    x, _ = next(iter(data.train))
    assert x.shape[1:] == (3, 8, 8)


def test_a_corrupt_png_is_named(folder):
    bad = folder / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all")
    with pytest.raises(DataError, match="cannot read image") as err:
        _load(folder)
    assert str(bad) in str(err.value) and "data.skip_unreadable=true" in str(err.value)


def test_a_truncated_png_is_caught_by_its_checksums(folder):
    good = folder / "val" / "cat" / "0.png"
    good.write_bytes(good.read_bytes()[:-20])  # header intact, IEND and a CRC gone
    with pytest.raises(DataError, match=str(good)):
        _load(folder)


def test_skip_unreadable_leaves_them_out_with_a_count(folder, caplog):
    for name in ("a.png", "b.jpg"):
        (folder / "train" / "cat" / name).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.image_folder"):
        data = _load(folder, skip_unreadable=True)
    assert len(data.train.dataset) == 6  # the two bad files are not in it
    assert "leaving out 2 unreadable" in caplog.text and "a.png" in caplog.text


def test_skipping_every_image_of_a_class_is_refused(folder):
    for png in (folder / "val" / "dog").glob("*.png"):
        png.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"split val/, class 'dog': every image is unreadable"):
        _load(folder, skip_unreadable=True)


def test_a_missing_split_is_named_alone_with_a_hint_that_fits(folder):
    import shutil

    shutil.rmtree(folder / "val")
    with pytest.raises(DataError) as err:
        _load(folder)
    msg = str(err.value)
    assert "has no val/ folder (it has train/)" in msg
    assert "train/ folder" not in msg and "train/ or" not in msg
    assert "*.png" in msg and "*.jpg" not in msg


def test_an_empty_class_names_split_and_class(folder):
    empty = folder / "train" / "bird"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    (folder / "val" / "bird").mkdir()
    _png(folder / "val" / "bird" / "0.png", 7)
    with pytest.raises(DataError) as err:
        _load(folder)
    msg = str(err.value)
    assert "split train/, class 'bird'" in msg and "notes.txt" in msg
    assert "fashion" not in msg.lower()


def test_splits_with_different_classes_are_refused(folder):
    _png(folder / "train" / "bird" / "0.png", 7)
    with pytest.raises(DataError, match="only in train/: bird"):
        _load(folder)


def test_cli_exits_2_on_a_corrupt_png_and_leaves_nothing(folder, tmp_path, capsys):
    from pipeline.cli.main import main

    bad = folder / "val" / "cat" / "1.png"
    bad.write_bytes(b"junk")
    out = tmp_path / "runs" / "t"
    sets = ["data.name=imagefolder", f"data.root={folder}", "data.image_size=16"]
    sets += ["model.width=0.125", "train.epochs=1"]
    code = main(["train", "--out", str(out), *[a for s in sets for a in ("--set", s)]])
    assert code == 2
    assert str(bad) in capsys.readouterr().err
    assert not out.exists() and not (out.parent / ".t.partial").exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())
