"""Full training checkpoints: everything needed to continue a run as if it never stopped.

A checkpoint holds the model, optimizer, LR scheduler and ``Polariser`` state (step and budget
controller), the Python, NumPy and torch random states, the training loader's shuffling
generator, and the epoch logs so far. It is written atomically once per epoch, so the last one
on disk is always complete; a run killed mid-epoch resumes at the start of that epoch and, under
deterministic settings, ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.atomic import save_torch_atomic
from pipeline.models.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = 1


def _rng_state(loader: torch.utils.data.DataLoader) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    generator = getattr(loader, "generator", None)
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": generator.get_state() if generator is not None else None,
    }


def _set_rng_state(state: dict[str, Any], loader: torch.utils.data.DataLoader) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["loader"] is not None and getattr(loader, "generator", None) is not None:
        loader.generator.set_state(state["loader"])


def _tuples(value: Any) -> Any:
    """random.setstate wants tuples; a list may come back from some serialisers."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class TrainingState:
    """The objects one training loop advances, saved and restored together."""

    def __init__(self, model: nn.Module, optimizer, scheduler, polariser, loader) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.polariser, self.loader = polariser, loader

    def save(self, path: Path, logs: list[dict[str, Any]]) -> None:
        """Write the checkpoint atomically (the previous one stays until this one is whole)."""
        save_torch_atomic(
            {
                "format": FORMAT,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "polariser": self.polariser.state_dict() if self.polariser else None,
                "rng": _rng_state(self.loader),
                "logs": logs,
            },
            path,
        )

    def load(self, path: Path) -> list[dict[str, Any]]:
        """Restore everything from ``path`` if it exists; returns the epoch logs it holds."""
        from pipeline.models.checkpoint import load_state_dict_file

        if not path.is_file():
            logger.info("no checkpoint at %s; starting from epoch 1", path)
            return []
        state = load_state_dict_file(path, plain=False)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.polariser is not None:
                self.polariser.load_state_dict(state["polariser"])
            _set_rng_state(state["rng"], self.loader)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(
                f"{path} does not fit this run ({type(err).__name__}: {str(err)[:300]}); "
                "resume with the model, data and train settings it was written with, or start "
                "afresh without --resume"
            ) from None
        logger.info("resumed from %s after epoch %d", path, len(state["logs"]))
        return list(state["logs"])


# Settings that do not change what training computes, so a resumed run may differ in them:
# everything after training (the threshold and fine-tune re-run on the trained model, which is
# how a refused automatic threshold is retried without retraining), export, bench, and data
# settings that only change how fast batches load or how the test set is chunked. Every other
# key (data, model, train, and prune.min_channels / prune.max_layer_ratio, which bound the
# budget controller during training) must be unchanged.
RESUMABLE_CHANGES = (
    "export.",
    "bench.",
    "train.compile",  # how the same step runs, not what it computes
    "data.num_workers",
    "data.eval_batch_size",
    "prune.threshold",
    "prune.ratio",
    "prune.aggregate",
    "prune.round_to",
    "prune.finetune_epochs",
    "prune.finetune_lr",
    "prune.exact_borders",
    "prune.recalibrate",
)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_training_keys(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts and that affect training."""
    old, new = _flat(before), _flat(now)
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return [k for k in differ if not k.startswith(RESUMABLE_CHANGES)]


def check_resume_config(cfg: Any, final: Path) -> None:
    """Refuse to resume output folder ``final`` under a config that trains differently from the
    one its checkpoints were written under.

    The folder resumed is the partial one a failed or killed run left, else the finished one
    (as ``pipeline.core.output_folders.staged_folder`` picks it); its ``config.yaml`` is the resolved config,
    written by the same run before its first checkpoint.

    Raises:
        CheckpointError: A key that affects training differs; the message lists each one with
            both values.
    """
    from pipeline.config import load_config, to_dict
    from pipeline.core.output_folders import partial_folder
    from pipeline.models.checkpoint import load_state_dict_file

    folder = partial_folder(final) if partial_folder(final).is_dir() else Path(final)
    stored = folder / "config.yaml"
    last = folder / "checkpoints" / "train_last.pt"
    if not last.is_file() or not stored.is_file():
        return  # nothing to resume: training starts at epoch 1
    before, now = to_dict(load_config(stored)), to_dict(cfg)
    keys = changed_training_keys(before, now)
    if keys:
        old, new = _flat(before), _flat(now)
        shown = ", ".join(f"{k} (checkpoint {old.get(k)!r}, now {new.get(k)!r})" for k in keys)
        raise CheckpointError(
            f"--resume: the config differs from the one {folder / 'checkpoints'} was trained "
            f"with in {shown}; expected the same training settings (only export, bench, "
            "data.num_workers/eval_batch_size and post-training prune settings may change); "
            "pass the original settings, or start afresh without --resume"
        )
    load_state_dict_file(last, plain=False)  # a truncated checkpoint refuses before any staging
