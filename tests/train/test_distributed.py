"""Multi-process training: 2 gloo ranks on the CPU against one process of the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.data.datasets import load_data
from pipeline.train.loop import seed_everything
from pipeline.train.stage import build_and_train

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = [
    "data.image_size=16",
    "data.train_limit=256",
    "data.batch_size=64",
    "model.width=0.25",
    "train.epochs=2",
    "train.device=cpu",
]  # fmt: skip; 4 global batches per epoch, 8 optimizer steps
# 2 ranks against one process that normalises the same half-batches (HalfBatches): measured
# 1.9e-8 of the update apart (float summation order), 2026-12-01, 2-core CPU. Against a plain
# one-process run of the same global batch, whose BN normalises all 64 samples together, the
# demo's budgeted training ends 1.07 of the update apart after 8 steps: per-rank BN statistics
# (pipeline.core.distributed) are the one intended difference, and this tolerance would catch more.
RELATIVE_TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One torchrun-style rank: train the tiny config and save what it ended with."""
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / "demo.yaml", SETTINGS)
    data = load_data(cfg.data, seed=cfg.train.seed)
    seed_everything(cfg.train.seed)
    model, logs = build_and_train(cfg, data, None)
    torch.save({"state": model.state_dict(), "loss": logs[-1].loss}, f"{out}/r{rank}w{world}.pt")


def _initial_state() -> dict[str, torch.Tensor]:
    """The weights every run starts from (as ``build_and_train`` builds them)."""
    from pipeline.models.zoo import build_model
    from pipeline.train.polarise import Polariser

    cfg = load_config(ROOT / "configs" / "demo.yaml", SETTINGS)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, num_classes=10, in_channels=1)
    Polariser.prepare(model, torch.zeros(2, 1, 16, 16), cfg.train, total_steps=1, prune=cfg.prune)
    return model.state_dict()


def _weights(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every trained parameter (BN scales and shifts included), flattened; no BN statistics."""
    return torch.cat([v.flatten() for k, v in state.items() if v.is_floating_point()
                      and not k.endswith(("running_mean", "running_var"))])  # fmt: skip


def _relative(a: dict, b: dict, start: torch.Tensor) -> float:
    """|a - b| over |b - start|: how far apart two runs end, as a share of how far they moved."""
    wa, wb = _weights(a), _weights(b)
    return float((wa - wb).norm() / (wb - start).norm())


def _spawn(world: int, out: Path) -> list[dict]:
    mp.spawn(_rank, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"r{r}w{world}.pt", weights_only=True) for r in range(world)]


class HalfBatches(torch.nn.Module):
    """Runs a global batch as the two ranks' halves (even and odd positions, as
    ``DistributedSampler`` deals them), so BN normalises each half apart, as the ranks do."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        even, odd = self.model(x[0::2]), self.model(x[1::2])
        return torch.stack([even, odd], 1).flatten(0, 1)  # (N, K) back in x's order


def _one_process(monkeypatch) -> dict[str, torch.Tensor]:
    """The same global batches in this process, as a one-process torchrun job (HalfBatches)."""
    from pipeline.core import distributed

    for key, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(_free_port())).items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "wrap", lambda model, device: HalfBatches(model))
    cfg = load_config(ROOT / "configs" / "demo.yaml", SETTINGS)
    seed_everything(cfg.train.seed)
    model, _ = build_and_train(cfg, load_data(cfg.data, seed=cfg.train.seed), None)
    monkeypatch.undo()
    return model.state_dict()


def test_two_gloo_ranks_stay_identical_and_match_one_process(tmp_path, monkeypatch):
    two = _spawn(2, tmp_path)
    assert two[0]["state"].keys() == two[1]["state"].keys()
    for name in two[0]["state"]:  # (a) gamma, every weight and buffer: bit for bit
        assert torch.equal(two[0]["state"][name], two[1]["state"][name]), name
    assert two[0]["loss"] == two[1]["loss"]  # the epoch loss is averaged over the ranks
    start = _weights(_initial_state())
    one = _one_process(monkeypatch)
    diff = _relative(two[0]["state"], one, start)  # (b) same global batches
    assert diff < RELATIVE_TOL, f"2 ranks vs 1 process: {diff:.3g} of the update apart"


def test_a_global_batch_that_does_not_split_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    out = tmp_path / "run"
    code = main(["train", "-c", "configs/demo.yaml", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.batch_size=64" in err and "WORLD_SIZE=3" in err and "data.batch_size=63" in err
    assert not any(tmp_path.iterdir())


AUDIT = """
import os, runpy, sys
log = open(os.environ["AUDIT_LOG"] + os.environ["RANK"], "w")
watched = os.environ["AUDIT_DIR"]
def hook(event, args):
    if event in ("open", "os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.rmtree"):
        path, mode = str(args[0]), args[1] if event == "open" else "w"
        writes = event != "open" or any(c in str(mode) for c in "wax+") or (
            isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes and path.startswith(watched):
            log.write(f"{event} {path}\\n"); log.flush()
sys.addaudithook(hook)
sys.argv = ["recede", *sys.argv[1:]]
runpy.run_module("pipeline.cli.main", run_name="__main__")
"""


def test_under_torchrun_only_rank_0_writes(tmp_path):
    script, out = tmp_path / "audited_recede.py", tmp_path / "runs" / "ddp"
    script.write_text(AUDIT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "AUDIT_LOG": str(tmp_path / "rank"), "AUDIT_DIR": str(tmp_path / "runs")}  # fmt: skip
    sets = [a for s in SETTINGS for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(script), "train", "-c", "configs/demo.yaml",
           *sets, "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = ((tmp_path / f"rank{r}").read_text() for r in (0, 1))
    assert "model.pt" in rank0 and "train_last.pt" in rank0  # the audit sees rank 0's writes
    assert rank1 == "", f"rank 1 wrote: {rank1[:500]}"
    assert (out / "model" / "model.pt").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "train_epoch001.pt", "train_epoch002.pt", "train_last.pt"
    ]  # fmt: skip


@pytest.mark.parametrize("value", ["x", "-1"])
def test_a_broken_torchrun_environment_is_refused(monkeypatch, tmp_path, value, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", value)
    code = main(["train", "-c", "configs/demo.yaml", "--out", str(tmp_path / "run")])
    assert code == 2 and "RANK" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
