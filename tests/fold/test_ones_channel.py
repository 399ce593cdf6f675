"""pipeline.fold.ones_channel: border corrections as a constant input channel, exact or refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pipeline.fold.ones_channel as ones_channel
from pipeline.fold.ones_channel import OnesChannelError, ones_channels_
from pipeline.layers.corrected_conv import CorrectedConv2d, make_corrected_

REL = 1e-6


class Chain(nn.Module):
    """producer conv -> ``between`` -> reader conv (3x3, zero padding) with a kernel correction."""

    def __init__(self, between: nn.Module, *, residual: bool = False, width: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.producer = nn.Conv2d(3, width, 3, padding=1)
        self.between = between
        self.reader = nn.Conv2d(width, 5, 3, padding=1)
        self.head = nn.Conv2d(5, 4, 1)
        self.residual = residual
        make_corrected_(self.reader, kernel=torch.randn(5, 1, 3, 3, generator=g))

    def forward(self, x):
        y = self.between(self.producer(x))
        out = self.head(torch.relu(self.reader(y)))
        return out + y[:, :4].mean() if self.residual else out


def _converted(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, object, torch.Tensor]:
    model = model.eval()
    with torch.no_grad():
        ref = model(x)
    clone = copy.deepcopy(model)
    report = ones_channels_(clone, x)
    with torch.no_grad():
        out = clone(x)
    assert (out - ref).abs().max() <= REL * ref.abs().max()  # exact whatever was decided
    return clone, report, ref


@pytest.mark.parametrize(
    "between", [nn.ReLU(), nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 1, 1)), nn.Sigmoid()]
)
def test_a_border_correction_becomes_a_constant_channel_exactly(between) -> None:
    x, original = torch.randn(2, 3, 7, 9), Chain(between).eval()
    model, report, _ = _converted(original, x)
    assert report.converted == (("reader", "producer"),)
    assert type(model.reader) is nn.Conv2d  # no correction left: no Add in the graph
    assert model.producer.out_channels == 7 and model.reader.in_channels == 7
    bigger = torch.randn(1, 3, 12, 5)  # exact at other sizes too: the padding does the work
    with torch.no_grad():
        want = original(bigger)
        assert (model(bigger) - want).abs().max() <= REL * want.abs().max()


def test_an_aligned_reader_keeps_its_map() -> None:
    # 8 input channels run blocked in ONNX Runtime; a ninth would not (see CHANNEL_ALIGN)
    model, report, _ = _converted(Chain(nn.ReLU(), width=8), torch.randn(2, 3, 7, 9))
    assert not report.converted and "multiple of 8" in dict(report.kept)["reader"]
    assert isinstance(model.reader, CorrectedConv2d) and model.reader.in_channels == 8
    model, report, _ = _converted(Chain(nn.ReLU(), width=7), torch.randn(2, 3, 7, 9))
    assert report.converted == (("reader", "producer"),) and model.reader.in_channels == 8


def test_a_producer_with_another_user_keeps_its_map() -> None:
    _, report, _ = _converted(Chain(nn.ReLU(), residual=True), torch.randn(2, 3, 7, 9))
    assert not report.converted and "users" in dict(report.kept)["reader"]


def test_a_layer_that_is_not_element_wise_is_refused() -> None:
    between = nn.AvgPool2d(3, 1, 1, count_include_pad=True)  # borders average in zeros
    model, report, _ = _converted(Chain(between), torch.randn(2, 3, 7, 9))
    assert not report.converted and "not element-wise" in dict(report.kept)["reader"]
    assert isinstance(model.reader, CorrectedConv2d)


def test_the_measured_constant_is_the_safety_net(monkeypatch) -> None:
    # Declared pass-through wrongly: the channel then differs at the borders, is measured, refused
    monkeypatch.setattr(ones_channel, "PASS_THROUGH", (*ones_channel.PASS_THROUGH, nn.AvgPool2d))
    between = nn.AvgPool2d(3, 1, 1, count_include_pad=True)
    model, report, _ = _converted(Chain(between), torch.randn(2, 3, 7, 9))
    assert not report.converted and "not one non-zero constant" in dict(report.kept)["reader"]
    assert model.producer.out_channels == 6 and model.reader.in_channels == 6  # undone


def test_a_wrong_constant_is_caught(monkeypatch) -> None:
    real = ones_channel._reader_input_constant
    monkeypatch.setattr(ones_channel, "_reader_input_constant", lambda *a: real(*a) * 1.01)
    model = Chain(nn.ReLU()).eval()
    with pytest.raises(OnesChannelError, match="changed the outputs"):
        ones_channels_(model, torch.randn(2, 3, 7, 9))
