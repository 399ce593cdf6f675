"""Resumable training: SIGKILL mid-epoch and resume to the same weights; NaN stops training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import DataConfig, ModelConfig, TrainConfig
from pipeline.data.datasets import load_data
from pipeline.models.zoo import build_model
from pipeline.train.loop import DivergedError, train_
from tests.conftest import TOO_SLOW_S, finish_or_skip

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [
    "train", "-c", "configs/demo.yaml", "--set", "data.image_size=16", "--set", "model.width=0.25",
    "--set", "train.epochs=4", "--set", "train.penalty.strength=0.01",
]  # fmt: skip


def _recede(children, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same sums every run
    cmd = ["nice", "-n", "19", sys.executable, "-m", "pipeline.cli.main", *args]
    return children(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    code, err = finish_or_skip(proc, "recede train")
    assert code == 0, err


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model" / "model.pt", weights_only=True)


def _kill_mid_epoch(children, out: Path) -> None:
    """Start training, SIGKILL it during epoch 2 (after epoch 1's checkpoint), check it died.

    It waits for the checkpoint file however long that takes on a busy machine (the verdict
    is on the weights, not the time); past TOO_SLOW_S the test is skipped."""
    proc = _recede(children, [*TRAIN, "--out", str(out)])
    last = out.parent / f".{out.name}.partial" / "checkpoints" / "train_last.pt"
    waited = 0.0
    while not last.exists() and proc.poll() is None:
        if waited > TOO_SLOW_S:
            pytest.skip(f"machine too slow: no epoch finished in {TOO_SLOW_S:.0f} s")
        time.sleep(0.05)
        waited += 0.05
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert last.exists() and not out.exists()


def test_killed_training_resumes_to_the_same_weights(tmp_path, children):
    reference = _recede(children, [*TRAIN, "--out", str(tmp_path / "ref")])
    _kill_mid_epoch(children, tmp_path / "run")
    _finish(reference)
    _finish(_recede(children, [*TRAIN, "--out", str(tmp_path / "run"), "--resume"]))
    ref, resumed = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert ref.keys() == resumed.keys()
    for name in ref:
        assert torch.equal(ref[name], resumed[name]), name
    assert not (tmp_path / ".run.partial").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("train_epoch*.pt")) == [
        f"train_epoch{e:03d}.pt" for e in range(1, 5)
    ]


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(name="digits", image_size=16, batch_size=64))


def _poison_at(module: torch.nn.Module, call: int) -> None:
    """Make ``module``'s scale NaN on its ``call``-th forward pass (a diverging update)."""
    calls = [0]

    def hook(m, _inputs):
        calls[0] += 1
        if calls[0] == call:
            with torch.no_grad():
                m.weight.fill_(float("nan"))

    module.register_forward_pre_hook(hook)


def test_nan_scale_stops_training_naming_step_and_layer(digits, tmp_path):
    model = build_model(ModelConfig(name="vgg", width=0.125), num_classes=10, in_channels=1)
    steps = len(digits.train)
    # the recalibration and evaluation passes of epoch 1 also call forward: count them in
    calls = steps + min(50, steps) + len(digits.test) + 3
    _poison_at(model.features[5], calls)  # the second BN
    with pytest.raises(DivergedError) as info:
        train_(
            model, digits, TrainConfig(), epochs=2, lr=0.01, polariser=None,
            checkpoint_dir=tmp_path, tag="train",
        )  # fmt: skip
    message = str(info.value)
    assert "train epoch 2/2, step 3" in message
    assert "'features.5'" in message and "loss nan" in message
    assert f"last good checkpoint is {tmp_path / 'train_last.pt'}" in message
    saved = torch.load(tmp_path / "train_last.pt", weights_only=True)
    assert len(saved["logs"]) == 1 and torch.isfinite(saved["model"]["features.5.weight"]).all()


def test_resume_refuses_a_checkpoint_of_another_model(digits, tmp_path):
    small = build_model(ModelConfig(name="vgg", width=0.125), num_classes=10, in_channels=1)
    train_(small, digits, TrainConfig(), epochs=1, lr=0.01, polariser=None, checkpoint_dir=tmp_path)
    wide = build_model(ModelConfig(name="vgg", width=0.25), num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="train_last.pt does not fit this run"):
        train_(
            wide, digits, TrainConfig(), epochs=2, lr=0.01, polariser=None,
            checkpoint_dir=tmp_path, resume=True,
        )  # fmt: skip


def _interrupted(tmp_path: Path, overrides: list[str]) -> Path:
    """A partial train folder as a killed run leaves it: its config and a last checkpoint."""
    from pipeline.config import dump_config, load_config
    from pipeline.core.output_folders import partial_folder

    out = tmp_path / "run"
    partial = partial_folder(out)
    (partial / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}}, partial / "checkpoints" / "train_last.pt")
    (partial / "config.yaml").write_text(dump_config(load_config("configs/demo.yaml", overrides)))
    return out


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("train.lr=0.1", "train.lr (checkpoint 0.05, now 0.1)"),
        ("data.batch_size=32", "data.batch_size (checkpoint 64, now 32)"),
        ("model.width=1.0", "model.width (checkpoint 0.5, now 1.0)"),
        ("prune.min_channels=8", "prune.min_channels (checkpoint 4, now 8)"),
    ],
)
def test_resume_refuses_a_config_that_trains_differently(tmp_path, capsys, change, key):
    from pipeline.cli.main import main

    out = _interrupted(tmp_path, [])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv = ["train", "-c", "configs/demo.yaml", "--set", change, "--out", str(out), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert key in err and "start afresh without --resume" in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_resume_allows_settings_that_do_not_change_training(tmp_path):
    from pipeline.config import load_config
    from pipeline.train.resume import check_resume_config

    out = _interrupted(tmp_path, [])
    changed = [
        "prune.threshold=ratio", "prune.finetune_epochs=1", "export.atol=1e-3",
        "bench.runs=60", "data.num_workers=1",
    ]  # fmt: skip
    check_resume_config(load_config("configs/demo.yaml", changed), out)
    with pytest.raises(ValueError, match=r"train.epochs \(checkpoint 6, now 7\)"):
        check_resume_config(load_config("configs/demo.yaml", [*changed, "train.epochs=7"]), out)


def test_a_truncated_checkpoint_refuses_before_anything_is_staged(tmp_path, capsys):
    """A finished folder whose train_last.pt is truncated: --resume exits 2 naming the file and
    leaves no .partial copy beside --out (it used to copy the folder, then fail on the load)."""
    from pipeline.cli.main import main
    from pipeline.config import dump_config, load_config

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    last = out / "checkpoints" / "train_last.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, last)
    last.write_bytes(last.read_bytes()[:200])
    (out / "config.yaml").write_text(dump_config(load_config("configs/demo.yaml", [])))
    (out / "model").mkdir()  # a finished `recede train` folder, as far as its files tell
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["train", "-c", "configs/demo.yaml", "--out", str(out), "--resume"]
    assert main(argv) == 2
    assert "train_last.pt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
