"""Progress bars show only to a watcher; epoch lines name their fields."""

from __future__ import annotations

import io
import logging

import pytest

from pipeline.core import progress as prog
from pipeline.train.loop import EpochLog, format_epoch


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def tty(monkeypatch):
    """A terminal on stderr (installed in the test body: pytest's capture resets sys.stderr
    between setup and call)."""
    monkeypatch.delenv(prog.QUIET_ENV, raising=False)
    prog.set_quiet(False)

    def install() -> _Tty:
        stream = _Tty()
        monkeypatch.setattr("sys.stderr", stream)
        return stream

    yield install
    prog.set_quiet(False)


def test_a_terminal_gets_a_bar_with_rate_and_eta(tty):
    tty = tty()
    assert prog.bars_enabled()
    assert list(prog.progress(range(50), "train epoch 1/2")) == list(range(50))
    frames = tty.getvalue()
    assert "train epoch 1/2" in frames and "batch/s" in frames and "<" in frames  # ETA


@pytest.mark.parametrize("how", ["flag", "env"])
def test_quiet_turns_bars_off(tty, monkeypatch, how):
    tty = tty()
    if how == "flag":
        prog.set_quiet(True)
    else:
        monkeypatch.setenv(prog.QUIET_ENV, "1")
    assert not prog.bars_enabled()
    assert list(prog.progress(range(5), "evaluate")) == list(range(5))
    assert tty.getvalue() == ""


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.delenv(prog.QUIET_ENV, raising=False)
    assert not prog.bars_enabled()


def test_cli_quiet_flag_reaches_the_bars(monkeypatch, tmp_path):
    from pipeline.cli import main as cli

    seen = []
    monkeypatch.setattr(prog, "set_quiet", seen.append)
    cli.main(["--quiet", "inspect", str(tmp_path / "missing")])
    cli.main(["inspect", str(tmp_path / "missing")])
    assert seen == [True, False]


def _log(**kw) -> EpochLog:
    base = dict(
        epoch=3, loss=0.4321, penalty=395956.8525, accuracy=0.92, below_005=0.464,
        above_05=0.3, bimodality=0.92, seconds=61.2, strength=124.0, receded=0.209,
        wanted=0.5, reachable=0.6, channels=2752,
    )  # fmt: skip
    return EpochLog(**{**base, **kw})


def test_epoch_line_names_its_fields_and_scales_the_penalty_per_channel():
    line = format_epoch("train", _log(), 10)
    assert line.startswith("train epoch 3/10: loss 0.4321")
    assert "penalty 144/channel (lambda 124)" in line  # 395956.85 / 2752 channels
    assert "test accuracy 92.00%" in line
    assert "importance: 46.4% < 0.05, 30.0% > 0.5, bimodality 0.92" in line
    assert "receded 20.9% (scheduled 50.0%)" in line and line.endswith("61.2 s")
    for cryptic in ("BC ", "imp<", "395956"):
        assert cryptic not in line


def test_fine_tuning_lines_leave_out_penalty_and_budget():
    line = format_epoch("finetune", _log(channels=None, strength=None, receded=None), 3)
    assert "penalty" not in line and "receded" not in line
    assert "loss 0.4321, test accuracy 92.00% | importance" in line


def test_training_logs_the_named_line(caplog):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.config import TrainConfig
    from pipeline.data.datasets import DataBundle
    from pipeline.train.loop import train_
    from pipeline.train.polarise import Polariser
    from tests.conftest import TinyNet

    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    data = DataBundle(loader, loader, 5, 3, 8)
    model, cfg = TinyNet(), TrainConfig(device="cpu", epochs=1)
    pol = Polariser.prepare(model, x[:2], cfg, total_steps=2)
    with caplog.at_level(logging.INFO, logger="pipeline.train.loop"):
        (log,) = train_(model, data, cfg, epochs=1, lr=0.01, polariser=pol)
    n = sum(p.numel() for p in pol.penalty.params)
    assert log.channels == n > 0
    assert log.penalty_per_channel == pytest.approx(log.penalty / n)
    assert "train epoch 1/1: loss " in caplog.text and "/channel (lambda" in caplog.text
