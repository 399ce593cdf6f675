"""INT8 calibration data for TensorRT: fixed-size batches from a dataset, and the calibrator.

:class:`CalibrationFeed` is plain torch, so its batching is tested on the CPU;
:func:`entropy_calibrator` wraps it in TensorRT's ``IInt8EntropyCalibrator2`` (the module is
passed in, so nothing here imports ``tensorrt``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.atomic import atomic_path

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class CalibrationFeed:
    """Fixed-size float32 batches for INT8 calibration, cut from a stream of dataset batches.

    TensorRT asks for exactly ``batch_size`` samples per call; dataset loaders give batches of
    any size (the last one short). Samples are carried over between loader batches, a short
    remainder at the end is dropped, and at most ``max_batches`` batches are given.

    Args:
        batches: Input tensors ``[n, C, H, W]`` or ``(inputs, labels)`` pairs, e.g. a DataLoader.
        batch_size: Samples per calibration batch.
        input_shape: Per-sample shape ``(C, H, W)`` the engine takes.
        max_batches: Most batches to give (calibration cost grows with it).
    """

    def __init__(
        self,
        batches: Iterable[Any],
        batch_size: int,
        input_shape: Sequence[int],
        *,
        max_batches: int = 16,
    ) -> None:
        if batch_size < 1 or max_batches < 1:
            raise ValueError(
                f"expected batch_size >= 1 and max_batches >= 1, got {batch_size} and {max_batches}"
            )
        self.batch_size, self.max_batches = batch_size, max_batches
        self.input_shape = tuple(int(d) for d in input_shape)
        self.given = 0
        self._source: Iterator[Any] = iter(batches)
        self._pending: list[torch.Tensor] = []

    def _pull(self) -> torch.Tensor | None:
        item = next(self._source, None)
        if item is None:
            return None
        x = item[0] if isinstance(item, (tuple, list)) else item
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"calibration batch has per-sample shape {tuple(x.shape[1:])}, expected "
                f"{self.input_shape}; feed batches from the dataset the model was trained on"
            )
        return x.detach().float().cpu()

    def next_batch(self) -> torch.Tensor | None:
        """The next ``[batch_size, *input_shape]`` float32 batch, or None when done."""
        import torch

        if self.given >= self.max_batches:
            return None
        while sum(len(t) for t in self._pending) < self.batch_size:
            x = self._pull()
            if x is None:
                return None  # a short remainder cannot be given: TensorRT needs the full size
            self._pending.append(x)
        joined = torch.cat(self._pending)
        self._pending = [joined[self.batch_size :]] if len(joined) > self.batch_size else []
        self.given += 1
        return joined[: self.batch_size].contiguous()


def entropy_calibrator(
    trt: Any, feed: CalibrationFeed, cache_path: str | Path | None = None, *, device: str = "cuda"
) -> Any:
    """A ``trt.IInt8EntropyCalibrator2`` that gives ``feed``'s batches and keeps a cache file.

    A cache written by an earlier build (``cache_path``) is reused, so calibration runs once
    per model and dataset. The batch handed to TensorRT is kept alive until the next call.
    """
    cache = Path(cache_path) if cache_path is not None else None

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.current = None  # the device copy TensorRT reads from

        def get_batch_size(self) -> int:
            return feed.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = feed.next_batch()
            if batch is None:
                return None
            self.current = batch.to(device)
            return [int(self.current.data_ptr())] * len(names)

        def read_calibration_cache(self) -> bytes | None:
            if cache is not None and cache.is_file():
                logger.info("INT8 calibration: reusing %s", cache)
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, data: Any) -> None:
            if cache is not None:
                with atomic_path(cache) as tmp:
                    tmp.write_bytes(bytes(data))

    return _EntropyCalibrator()
