"""The Fashion-MNIST cache is safe to prepare from many processes at once and heals itself."""

import gzip
import multiprocessing

import numpy as np
import pytest

from pipeline.data.datasets import DEBIAN_FASHION_MNIST, DataError, decompress_once, fashion_root

pytestmark = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)

N_PROCESSES = 3
TIMEOUT_S = 120
RAW_FILES = {
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
}


def _zero_images_in_gz(name: str) -> int:
    """All-zero images in the packaged file, read straight from the .gz: the truth."""
    with gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz", "rb") as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return int((pixels.reshape(-1, 28 * 28).max(axis=1) == 0).sum())


def _facts(root) -> dict:
    """What a training run would see: sample counts and all-zero images per split."""
    import torchvision.datasets as D

    facts = {}
    for split, train in (("train", True), ("test", False)):
        ds = D.FashionMNIST(root, train=train, download=False)
        facts[split] = len(ds)
        facts[f"{split}_labels"] = len(ds.targets)
        facts[f"{split}_zero"] = int((ds.data.flatten(1).amax(1) == 0).sum())
    return facts


def _worker(barrier, results) -> None:
    """Prepare the cache the moment every process is ready, then report what loaded."""
    import torchvision.datasets  # noqa: F401  (import before the barrier so all start together)

    try:
        barrier.wait(timeout=TIMEOUT_S)
        results.put(_facts(fashion_root()))
    except Exception as err:  # report any failure to the parent, which asserts on it
        results.put({"error": f"{type(err).__name__}: {err}"})


def test_concurrent_processes_all_load_complete_data(tmp_path, monkeypatch):
    monkeypatch.setenv("RECEDE_CACHE", str(tmp_path))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(N_PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(barrier, results)) for _ in range(N_PROCESSES)]
    for p in procs:
        p.start()
    got = [results.get(timeout=TIMEOUT_S) for _ in procs]
    for p in procs:
        p.join(timeout=TIMEOUT_S)
    expected = {
        "train": 60000,
        "train_labels": 60000,
        "train_zero": _zero_images_in_gz("train-images-idx3-ubyte"),
        "test": 10000,
        "test_labels": 10000,
        "test_zero": _zero_images_in_gz("t10k-images-idx3-ubyte"),
    }
    assert got == [expected] * N_PROCESSES
    raw = tmp_path / "fashion_mnist" / "FashionMNIST" / "raw"
    assert {p.name for p in raw.iterdir()} == RAW_FILES, "temporary or lock files left behind"


def test_truncated_cache_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("RECEDE_CACHE", str(tmp_path))
    raw = fashion_root() / "FashionMNIST" / "raw"
    images, labels = raw / "train-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    full = images.stat().st_size, labels.stat().st_size
    with open(images, "r+b") as f:
        f.truncate(full[0] // 2)
    labels.write_bytes(b"")
    root = fashion_root()
    assert (images.stat().st_size, labels.stat().st_size) == full
    facts = _facts(root)
    assert facts["train_zero"] == _zero_images_in_gz("train-images-idx3-ubyte")
    assert (facts["train"], facts["test_labels"]) == (60000, 10000)


def test_corrupt_archive_never_reaches_the_cache(tmp_path):
    gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(DEBIAN_FASHION_MNIST / gz.name, "rb") as f:
        whole = f.read()
    with gzip.open(gz, "wb") as f:
        f.write(whole[:-100])  # a valid gzip stream holding a short IDX file
    target = tmp_path / "cache" / gz.name[:-3]
    with pytest.raises(DataError, match="bytes, expected"):
        decompress_once(gz, target)
    assert not target.parent.exists() or list(target.parent.iterdir()) == []
