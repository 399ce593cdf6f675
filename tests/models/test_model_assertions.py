"""A model that asserts on its own input (timm's attention blocks want H, W a multiple of their
block size) is refused at the first forward: exit 2 naming ``--input-shape``, the failed check
as the model's code reads, the sizes it names, and nothing written."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.cli.main import main


class BlockNet(nn.Module):
    """A conv whose forward asserts, without a message, that W is a multiple of ``block``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.block = 8
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] % self.block == 0
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def _refused(tmp_path, capsys, model: str, shape: str) -> str:
    out = tmp_path / "out"
    assert main(["prune", "--model", model, "--input-shape", shape, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--input-shape" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing beside --out either
    return err


def test_a_bare_assert_in_forward_names_the_check_and_its_sizes(tmp_path, capsys):
    err = _refused(tmp_path, capsys, "tests.models.test_model_assertions:BlockNet", "1,3,12,12")
    assert "`assert x.shape[-1] % self.block == 0` failed (test_model_assertions.py:" in err, err
    assert "x.shape=(1, 3, 12, 12)" in err and "self.block=8" in err, err


def test_timm_bat_resnext26ts_at_128_px_names_its_block_size_and_default(tmp_path, capsys):
    pytest.importorskip("timm")
    err = _refused(tmp_path, capsys, "timm:bat_resnext26ts", "1,3,128,128")
    assert "% self.block_size == 0" in err and "self.block_size=8" in err, err
    assert "its default input size is 3x256x256" in err, err
