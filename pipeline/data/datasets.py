"""Datasets: real data through scikit-learn and torchvision, never hand-written file parsing.

``digits`` is scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits shipped inside
scikit-learn, so it works offline) split 80/20 with a fixed seed and resized bilinearly.
``fashion_mnist`` reads through ``torchvision.datasets.FashionMNIST``; Debian's
``dataset-fashion-mnist`` files are used when present (decompressed once into a cache folder in
torchvision's layout), otherwise a copy in torchvision's layout under ``data.root``. Nothing is
downloaded and nothing is created inside ``data.root``. ``cifar10``/``cifar100``/``imagefolder``
need ``data.root``.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from pipeline.config import DataConfig
from pipeline.core.atomic import atomic_path, file_lock

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DataError(ValueError):
    """A dataset cannot be found or read; the message names the path and how to get it."""


@dataclass(frozen=True)
class DataBundle:
    """Train and test loaders plus the facts a model needs."""

    train: DataLoader
    test: DataLoader
    num_classes: int
    in_channels: int
    image_size: int
    class_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


def _digits(cfg: DataConfig) -> tuple[Dataset, Dataset, int, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(
        x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False
    )
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=digits.target)
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te]), 10, 1


def _idx_size(path: Path) -> tuple[int, int] | None:
    """(actual, expected) byte length of IDX file ``path``, or None if no IDX header is there.

    The header is a 4-byte magic (0, 0, 0x08 for uint8, ndim) and ndim big-endian sizes, so the
    expected length is the header plus the product of the sizes.
    """
    try:
        with open(path, "rb") as f:
            head, actual = f.read(16), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None
    ndim = head[3] if len(head) >= 4 else 0
    if head[:3] != b"\x00\x00\x08" or not 1 <= ndim <= 3 or len(head) < 4 + 4 * ndim:
        return None
    dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return actual, 4 + 4 * ndim + math.prod(dims)


def _idx_complete(path: Path) -> bool:
    size = _idx_size(path)
    return size is not None and size[0] == size[1]


def decompress_once(gz: Path, target: Path) -> None:
    """Decompress ``gz`` to ``target`` unless a complete copy is there; replace a truncated one.

    The copy is written to a unique temporary file, checked against its IDX header, fsynced and
    renamed onto ``target`` (:func:`pipeline.core.atomic.atomic_path`), so a reader never sees a
    partial file and a bad archive never reaches the cache.
    """
    if _idx_complete(target):
        return
    if target.exists():
        logger.warning("%s is truncated or not an IDX file; rebuilding it from %s", target, gz)
    with atomic_path(target) as tmp:
        with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if not _idx_complete(tmp):
            actual, expected = _idx_size(tmp) or (tmp.stat().st_size, "an IDX header and more")
            raise DataError(
                f"{gz} decompresses to {actual} bytes, expected {expected}; the archive is "
                "damaged: reinstall it with apt-get install --reinstall dataset-fashion-mnist"
            )


def fashion_root() -> Path:
    """torchvision-layout folder holding Debian's Fashion-MNIST files, decompressed once.

    Any number of processes may call this at once on the same cache (``RECEDE_CACHE`` or
    ``~/.cache/recede``): one decompresses under a file lock while the others wait, and a
    truncated file left in the cache is detected by its size and rebuilt.
    """
    cache = (
        Path(os.environ.get("RECEDE_CACHE", Path.home() / ".cache" / "recede")) / "fashion_mnist"
    )
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with file_lock(raw / ".lock"):  # removed when released (see file_lock)
        for gz in sorted(DEBIAN_FASHION_MNIST.glob("*-ubyte.gz")):
            decompress_once(gz, raw / gz.name[:-3])
    return cache


def _torchvision(cfg: DataConfig) -> tuple[Dataset, Dataset, int, int]:
    import torchvision.datasets as D
    import torchvision.transforms as T

    size = [T.Resize(cfg.image_size)]
    if cfg.name == "fashion_mnist":
        root = fashion_root() if DEBIAN_FASHION_MNIST.is_dir() else _root(cfg)
        tf = T.Compose([*size, T.ToTensor(), T.Normalize((0.2860,), (0.3530,))])
        return (  # download=False: torchvision would create data.root/FashionMNIST/raw first
            D.FashionMNIST(root, True, tf, download=False),
            D.FashionMNIST(root, False, tf, download=False),
            10,
            1,
        )
    root = _root(cfg)
    tf = T.Compose([*size, T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    if cfg.name in ("cifar10", "cifar100"):
        cls = D.CIFAR10 if cfg.name == "cifar10" else D.CIFAR100
        return cls(root, True, tf), cls(root, False, tf), 10 if cfg.name == "cifar10" else 100, 3
    return _image_folder(cfg, root)


def _image_folder(cfg: DataConfig, root: Path) -> tuple[Dataset, Dataset, int, int]:
    """train/ and val/ read by torchvision's ImageFolder after :func:`scan_image_folder`."""
    import torchvision.datasets as D
    import torchvision.transforms as T
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from pipeline.data.image_folder import ImageFolderError, read_rgb, scan_image_folder

    try:
        skipped = scan_image_folder(root, skip_unreadable=cfg.skip_unreadable).skipped
    except ImageFolderError as err:
        raise DataError(str(err)) from None

    def wanted(path: str) -> bool:  # ImageFolder's own rule, less the skipped files
        return path.lower().endswith(IMG_EXTENSIONS) and path not in skipped

    tf = T.Compose([T.Resize((cfg.image_size, cfg.image_size)), T.ToTensor()])
    train, test = (
        D.ImageFolder(str(root / s), tf, loader=read_rgb, is_valid_file=wanted)
        for s in ("train", "val")
    )
    return train, test, len(train.classes), 3


def _root(cfg: DataConfig) -> Path:
    hint = {
        "fashion_mnist": _FASHION_FIX,
        "cifar10": "download CIFAR-10 with torchvision.datasets.CIFAR10(root, download=True) on a machine with network",
        "cifar100": "download CIFAR-100 with torchvision.datasets.CIFAR100(root, download=True)",
        "imagefolder": "point data.root at a folder with train/<class>/<images> and val/<class>/<images>",
    }[cfg.name]
    if cfg.root is None:
        raise DataError(f"data.name={cfg.name} needs data.root; {hint}")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root {str(root)!r} does not exist; {hint}")
    return root  # an ImageFolder's layout is checked by pipeline.data.image_folder


_LAYOUT = {
    "cifar10": "cifar-10-batches-py/ from cifar-10-python.tar.gz",
    "cifar100": "cifar-100-python/ from cifar-100-python.tar.gz",
    "fashion_mnist": "FashionMNIST/raw/*-ubyte",
}
_FASHION_FIX = (
    "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or set "
    "data.root to a folder holding FashionMNIST/raw/*-ubyte"
)


def _torchvision_checked(cfg: DataConfig) -> tuple[Dataset, Dataset, int, int]:
    """``_torchvision`` whose download and missing-file failures name ``data.root``."""
    try:
        return _torchvision(cfg)
    except (RuntimeError, OSError) as err:  # torchvision: not found, or a failed download
        where = f"data.root {cfg.root!r}" if cfg.root else "data.root (unset)"
        raise DataError(
            f"data.name={cfg.name}: {where} holds no usable copy of the dataset "
            f"({type(err).__name__}: {str(err).split('. You can use')[0][:200]}); expected "
            f"the torchvision layout there ({_LAYOUT.get(cfg.name, 'train/ and val/')}); "
            + (
                _FASHION_FIX
                if cfg.name == "fashion_mnist"
                else "put the files in place (recede downloads nothing) or fix data.root"
            )
        ) from None


FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)  # fmt: skip
_NORMALISE = {  # (mean, std) per channel, as the loaders above apply them
    "digits": ((0.5,), (0.5,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "cifar100": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def preprocessing(cfg: DataConfig) -> dict[str, object]:
    """What a deployment must do to an image before the model sees it, as the loaders do:
    size, channel order, scaling, normalisation (or none), and the class of each output."""
    channels = 1 if cfg.name in ("digits", "fashion_mnist") else 3
    mean, std = _NORMALISE.get(cfg.name, (None, None))
    resize = {
        "digits": "the 8x8 digit scaled to [0, 1] (value / 16), resized bilinearly",
        "imagefolder": "resized to exactly H x W (aspect ratio not kept), RGB",
    }.get(cfg.name, "resized (shorter side) with torchvision's Resize")
    return {
        "input_shape": [channels, cfg.image_size, cfg.image_size],
        "layout": "NCHW, float32",
        "channel_order": "greyscale" if channels == 1 else "RGB",
        "resize": resize,
        "scale": "[0, 1] (torchvision ToTensor: value / 255)" if cfg.name != "digits" else "[0, 1]",
        "mean": list(mean) if mean else None,
        "std": list(std) if std else None,
        "normalise": "(x - mean) / std per channel" if mean else "none",
        "class_names": list(class_names(cfg)),
    }


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def class_names(cfg: DataConfig) -> tuple[str, ...]:
    """The class of each model output, in order, without loading the data: fixed lists for the
    built-in datasets, the sorted class folders of ``train/`` for an ImageFolder (torchvision's
    order); () where it cannot be told cheaply (CIFAR-100's names live in its data files)."""
    fixed = {
        "digits": tuple(str(d) for d in range(10)),
        "fashion_mnist": FASHION_CLASSES,
        "cifar10": CIFAR10_CLASSES,
    }
    if cfg.name in fixed:
        return fixed[cfg.name]
    train = Path(cfg.root or "", "train")
    if cfg.name == "imagefolder" and train.is_dir():
        return tuple(sorted(d.name for d in train.iterdir() if d.is_dir()))
    return ()


def load_data(cfg: DataConfig, *, seed: int = 0) -> DataBundle:
    """Build train/test loaders for ``cfg``.

    Raises:
        DataError: the dataset is missing or unreadable; the message names ``data.root``.
    """
    train, test, num_classes, in_channels = (
        _digits(cfg) if cfg.name == "digits" else _torchvision_checked(cfg)
    )
    names = class_names(cfg)
    if cfg.train_limit is not None:
        train = Subset(train, range(min(cfg.train_limit, len(train))))
    gen = torch.Generator().manual_seed(seed)
    kw = {"num_workers": cfg.num_workers}
    logger.info(
        "data %s: %d train / %d test samples, %d classes",
        cfg.name,
        len(train),
        len(test),
        num_classes,
    )
    return DataBundle(
        DataLoader(
            train,
            cfg.batch_size,
            shuffle=True,
            generator=gen,
            drop_last=len(train) > cfg.batch_size,
            **kw,
        ),
        DataLoader(test, cfg.eval_batch_size, shuffle=False, **kw),
        num_classes,
        in_channels,
        cfg.image_size,
        names,
    )
