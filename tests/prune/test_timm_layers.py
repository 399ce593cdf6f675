"""timm support: the ``timm:`` spec, BatchNorm subclasses carrying an activation, and the issue's
done-when (``recede prune`` then ``recede export`` on efficientnet_b0). The tracing fallback's
tests are in test_tracing.py."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.fold.batchnorm import conv_bn_pairs, fold_bn
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.layers.bn import convert_to_bounded_bn_
from pipeline.layers.bn_act import BoundedBatchNormAct2d, bn_tail
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.models.zoo import ModelError, build_model
from pipeline.prune.stage import apply_plan_, make_plan, zero_groups_
from pipeline.train.convert import convert_trained_to_bounded_

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


class Odd(nn.BatchNorm2d):
    """A BN subclass whose forward recede has not read: it must be refused, not guessed."""

    def forward(self, x):
        return super().forward(x) * 2 + 1


class Net(nn.Module):
    """conv -> norm(+act) -> conv -> norm(+act) -> pool -> linear, the norm layer chosen."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, bias=False), norm(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), norm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _randomised(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def test_timm_spec_passes_classes_and_channels() -> None:
    model = build_model(ModelConfig(name="timm:resnet18"), num_classes=7, in_channels=1)
    assert model.conv1.in_channels == 1
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 7)


def test_unknown_timm_name_suggests_close_names() -> None:
    with pytest.raises(ModelError, match="efficientnet_b0"):
        build_model(ModelConfig(name="timm:efficientnet_b00"), num_classes=7, in_channels=3)


def test_missing_timm_names_the_extra() -> None:
    with (
        mock.patch.dict(sys.modules, {"timm": None}),
        pytest.raises(ModelError, match=r"recede\[timm\]"),
    ):
        build_model(ModelConfig(name="timm:resnet18"), num_classes=7, in_channels=3)


@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU, nn.Hardswish])
def test_norm_act_prunes_exactly(act) -> None:
    """Zeroing a BatchNormAct2d channel's scale and shift zeroes act(0): removal equals masking."""
    model = _randomised(Net(lambda c: BatchNormAct2d(c, act_layer=act)))
    graph = build_channel_graph(model, X)
    assert not graph.barriers
    assert {name for g in graph.prunable_groups for name, _ in g.bn_channels} == {"bn1", "bn2"}
    dropped = {g.id for g in graph.prunable_groups[::2]}
    masked = zero_groups_(copy.deepcopy(model), graph, dropped, shifts=dropped)
    pruned = apply_plan_(copy.deepcopy(masked), make_plan(graph, dropped))
    assert pruned.bn1.num_features < 8 and isinstance(pruned.bn1.act, act)
    assert _rel(pruned(X), masked(X)) < 1e-6


def test_zero_breaking_act_is_not_prunable_by_masking() -> None:
    """sigmoid(0) = 0.5: a masked channel is not zero, so only absorption may remove it."""
    model = _randomised(Net(lambda c: BatchNormAct2d(c, act_layer=nn.Sigmoid)))
    graph = build_channel_graph(model, X)
    bn1 = [g for g in graph.groups if any(n == "bn1" for n, _ in g.bn_channels)]
    assert bn1 and not any(g.prunable for g in bn1) and all(g.absorbable for g in bn1)


def test_unknown_bn_subclass_is_a_barrier_and_not_folded() -> None:
    model = _randomised(Net(Odd))
    graph = build_channel_graph(model, X)
    assert bn_tail(model.bn1) is None
    assert any("BatchNorm subclass" in b.op and b.module == "bn1" for b in graph.barriers)
    assert not {g for g in graph.prunable_groups if any(n == "bn1" for n, _ in g.bn_channels)}
    assert conv_bn_pairs(model) == []
    with pytest.raises(ValueError, match="Odd"):
        convert_to_bounded_bn_(model)


def test_fold_keeps_the_activation() -> None:
    model = _randomised(Net(lambda c: BatchNormAct2d(c, act_layer=nn.SiLU)))
    folded, report = fold_bn(model, X)
    assert len(report.folded) == 2 and not report.kept
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.SiLU) for m in folded.modules()) == 2
    assert _rel(folded(X), model(X)) < 1e-5


def test_bounded_conversion_keeps_the_activation() -> None:
    model = _randomised(Net(lambda c: BatchNormAct2d(c, act_layer=nn.SiLU)))
    fresh = copy.deepcopy(model)
    assert convert_to_bounded_bn_(fresh, shift=True) == 2
    assert type(fresh.bn1) is BoundedBatchNormAct2d and isinstance(fresh.bn1.act, nn.SiLU)
    report = convert_trained_to_bounded_(model, X)
    assert isinstance(model.bn2, BoundedBatchNormAct2d) and isinstance(model.bn2.act, nn.SiLU)
    assert report.max_rel_err < 1e-5
    assert set(model.state_dict()) == set(fresh.state_dict())  # reloads after a rebuild
    assert isinstance(model.bn1, BoundedBatchNorm2d)


def test_cli_prunes_and_exports_efficientnet_b0(tmp_path: Path, capsys) -> None:
    """The issue's done-when: prune timm:efficientnet_b0 at 50%, export, both exit 0."""
    from pipeline.cli.main import main

    out = tmp_path / "e0"
    args = ["--model", "timm:efficientnet_b0", "--input-shape", "1,3,64,64", "--ratio", "0.5"]
    args += ["--scope", "layer"]  # untrained: its BN importances tie, a global ratio refuses
    assert main(["prune", *args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["after"] < 0.7 * report["params"]["before"]
    assert not report["barriers"]
    assert main(["export", str(out)]) == 0
    assert (out / "model.onnx").stat().st_size > 0
    assert "-> ok" in capsys.readouterr().out
