"""Multi-process training under ``torchrun``: the process group, the sharded loader, rank rules.

A process started by ``torchrun`` (``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its
environment) trains as one rank of a DistributedDataParallel job; a plain ``python`` or
``recede`` process trains alone exactly as before. Decisions, each one on purpose:

- **Global batch.** ``data.batch_size`` is the global batch: each rank takes
  ``batch_size / world_size`` samples per step, and a size that does not divide is refused
  (exit 2) rather than rounded, so a run means the same thing on any number of processes.
- **Data order.** Under ``torchrun`` the training order comes from ``DistributedSampler``
  (seed ``train.seed``, ``set_epoch`` every epoch): rank ``r`` takes positions ``r, r + W, ...``
  of one permutation, so the union of the ranks' step-``k`` batches is the step-``k`` batch of
  a one-process ``torchrun`` run; any world size walks the same global batches. A plain process
  keeps the loader's own shuffling (its order differs; both are seeded).
- **Identical penalty.** DDP averages the data-loss gradients during ``backward()``; the
  penalty gradient, the budget controller and the ISTA shrink / polarization clamp are then
  computed on every rank from identical parameters, so they stay identical without further
  communication (tested: BN scales equal bit for bit across ranks).
- **BatchNorm.** Batch statistics are per rank (``SyncBatchNorm`` is CUDA-only and does not
  cover ``BoundedBatchNorm2d``), as in most DDP image training; running statistics are
  broadcast from rank 0 at each forward (DDP's ``broadcast_buffers``) and averaged across ranks
  after the end-of-epoch recalibration. Per-rank batch statistics are why a W-process run
  matches a one-process run of the same global batch only to a tolerance, not bit for bit.
- **Evaluation** runs on every rank over the whole test set (identical models give identical
  accuracies, so no all-reduce is needed and every rank logs the same epoch).
- **Writing.** Rank 0 alone writes: checkpoints, the run folder, reports, ONNX. After training
  every rank meets at a barrier and the process group is closed; ranks other than 0 then exit 0
  and rank 0 prunes, fine-tunes, exports and benchmarks alone (fine-tuning is not distributed).
  Resuming, every rank reads rank 0's ``checkpoints/train_last.pt`` (one machine, or a shared
  filesystem across machines).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class DistributedConfigError(ValueError):
    """The torchrun environment and the config do not fit together (CLI exit 2)."""


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes (rank 0, or a process not started by ``torchrun``)."""
    return rank() == 0


def active() -> bool:
    """Whether a process group is open, so training steps must be synchronised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def check_batch(batch_size: int) -> None:
    """Refuse a global batch that the ranks cannot share evenly."""
    for name in ENV:
        value = os.environ.get(name, "0")
        if launched() and not value.isdigit():
            raise DistributedConfigError(
                f"environment variable {name}={value!r}, expected a non-negative integer; "
                "start recede with torchrun, which sets it"
            )
    world = world_size()
    if world < 1 or batch_size % world:
        raise DistributedConfigError(
            f"data.batch_size={batch_size} is the global batch and must divide evenly among "
            f"WORLD_SIZE={world} processes; expected a multiple of {world}; set "
            f"data.batch_size={max(world, batch_size // max(world, 1) * world)} or change "
            "--nproc_per_node"
        )


def device_for(device: torch.device) -> torch.device:
    """This rank's GPU (``cuda:LOCAL_RANK``) under torchrun; ``device`` itself otherwise."""
    if launched() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


@contextlib.contextmanager
def process_group(device: torch.device, batch_size: int) -> Iterator[None]:
    """Open the process group for a training (nccl on CUDA, gloo on CPU) and close it after.

    Does nothing outside ``torchrun``. On leaving, every rank meets at a barrier first, so no
    rank closes the group while another still trains.
    """
    if not launched() or active():
        yield
        return
    check_batch(batch_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group(backend)
    logger.info("rank %d of %d joined the %s process group", rank(), world_size(), backend)
    try:
        yield
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def shard_loader(loader: DataLoader, seed: int) -> DataLoader:
    """``loader`` as this rank's share of each global batch (itself without a process group).

    The returned loader has a ``DistributedSampler`` (call :func:`set_epoch` every epoch) and
    ``batch_size / world_size`` samples per batch; the sampler drops the tail that does not
    split evenly.
    """
    if not active():
        return loader
    from torch.utils.data.distributed import DistributedSampler

    world = world_size()
    check_batch(loader.batch_size)
    sampler = DistributedSampler(
        loader.dataset, num_replicas=world, rank=rank(), shuffle=True, seed=seed, drop_last=True
    )
    return DataLoader(
        loader.dataset,
        loader.batch_size // world,
        sampler=sampler,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseed a sharded loader's sampler for ``epoch`` (no-op for a plain loader)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel while a process group is open, else itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)  # broadcast_buffers: on by default


@torch.no_grad()
def average_buffers_(model: nn.Module) -> None:
    """Average BN running statistics across ranks (after each rank recalibrated on its shard)."""
    if not active():
        return
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and name.endswith(("running_mean", "running_var")):
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
            buf.div_(world_size())


def mean_across_ranks(values: tuple[float, ...], device: torch.device) -> tuple[float, ...]:
    """Each value averaged over the ranks (an epoch's loss over the whole global batch)."""
    if not active():
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=device)  # nccl: a GPU tensor
    torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM)
    return tuple((summed / world_size()).tolist())


def barrier() -> None:
    if active():
        torch.distributed.barrier()
