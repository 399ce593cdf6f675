"""The quality grid's data: images decoded once into tensors, so an epoch costs the model's time."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import DataConfig
from pipeline.core.atomic import save_torch_atomic
from pipeline.data.datasets import DataBundle, load_data


def load_tensor_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """``load_data(cfg)`` with every image decoded once into memory (and cached on disk)."""
    if cfg.name == "digits":
        return load_data(cfg, seed=seed)
    cache_dir = Path(os.environ.get("RECEDE_CACHE", Path.home() / ".cache" / "recede"))
    cache = cache_dir / f"{cfg.name}_{cfg.image_size}px_tensors.pt"
    if cache.exists():
        x_tr, y_tr, x_te, y_te = torch.load(cache, weights_only=True)
    else:
        full = load_data(dataclasses.replace(cfg, train_limit=None), seed=seed)
        x_tr, y_tr = _stack(full.train.dataset)
        x_te, y_te = _stack(full.test.dataset)
        save_torch_atomic((x_tr, y_tr, x_te, y_te), cache)
    if cfg.train_limit is not None:
        x_tr, y_tr = x_tr[: cfg.train_limit], y_tr[: cfg.train_limit]
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(
        TensorDataset(x_tr, y_tr),
        cfg.batch_size,
        shuffle=True,
        generator=gen,
        drop_last=len(y_tr) > cfg.batch_size,
    )
    test = DataLoader(TensorDataset(x_te, y_te), cfg.eval_batch_size)
    return DataBundle(train, test, 10, int(x_tr.shape[1]), cfg.image_size)


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*DataLoader(dataset, batch_size=2000), strict=True)
    return torch.cat(xs), torch.cat(ys)


def training_view(data: DataBundle, n: int = 1000) -> DataBundle:
    """``data`` whose test loader holds its first ``n`` images: what the training loop evaluates
    after every epoch (a log line). Every accuracy a cell reports uses the whole test set."""
    x, y = data.test.dataset[:n] if isinstance(data.test.dataset, TensorDataset) else (None, None)
    if x is None:
        return data
    return dataclasses.replace(data, test=DataLoader(TensorDataset(x, y), data.test.batch_size))
