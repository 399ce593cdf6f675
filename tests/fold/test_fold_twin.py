"""The fold check of an untrained model runs on its calibrated twin, as the export check does
(issue 31 item 11, issue 33 item 3): `twin-ok` for a correct fold, `FoldError` for a wrong one."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import pipeline.fold.batchnorm as batchnorm
from pipeline.fold.batchnorm import FOLD_RTOL, FoldError, fold_bn


def untrained_blind() -> nn.Module:
    """Untrained BNs (mean 0, var 1) over convs whose outputs are ~1e-3 of their input: the
    signal fades to ~1e-6 by the head, whose bias then dominates, as in an untrained googlenet
    (its fold check moved by 0.004x its bound between inputs). Calibrated, every BN
    normalises its input again and the output depends on the input."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for conv in (net[0], net[3]):
            conv.weight.mul_(1e-3)
            conv.bias.mul_(1e-3)
    return net


def _perturbing(delta: float, kind: type[nn.Module] = nn.Conv2d):
    """``fold_bn_`` that also scales the weights of the first layer of ``kind`` by ``1 + delta``."""
    fold = batchnorm.fold_bn_

    def wrong(model: nn.Module):
        report = fold(model)
        first = next(m for m in model.modules() if isinstance(m, kind))
        with torch.no_grad():
            first.weight.mul_(1 + delta)
        return report

    return mock.patch.object(batchnorm, "fold_bn_", wrong)


def test_an_untrained_models_fold_is_verified_on_its_twin() -> None:
    """Reported: googlenet, inception_v3, shufflenet_v2, repvgg_a0, xception41, efficientvit_b0
    exported exit 1 `insensitive` on the fold alone, while their ONNX check said `twin-ok`."""
    net, x = untrained_blind(), torch.randn(4, 3, 8, 8)
    _, report = fold_bn(net, x)
    assert report.check.verdict == "twin-ok" and report.check.passed
    assert report.check.twin["verdict"] == "ok" and report.check.twin["sensitivity"] > 10
    assert report.check.sensitivity < 2  # the model itself could not see a wrong fold
    assert torch.equal(net[1].running_var, torch.ones(8))  # the model is not calibrated


def test_a_wrong_fold_the_untrained_model_cannot_see_fails_on_its_twin() -> None:
    """A 1% change of one folded layer (100x the fold bound) moves the untrained model's output
    by less than its bound: only the twin sees it, and the verdict is `failed`, not
    `insensitive`."""
    net, x = untrained_blind(), torch.randn(4, 3, 8, 8)
    delta = 100 * FOLD_RTOL
    with _perturbing(delta):
        alone = batchnorm._folded_and_checked(net, x, FOLD_RTOL)[2]
        assert alone.verdict == "insensitive"  # the model itself passes the wrong fold
        with pytest.raises(FoldError, match="on its BN-calibrated twin"):
            fold_bn(net, x)


def test_a_trained_models_fold_gets_no_twin(tiny_net) -> None:
    x = torch.randn(4, 3, 16, 16)
    _, report = fold_bn(tiny_net, x)
    assert report.check.verdict == "ok" and report.check.twin is None
    with _perturbing(100 * FOLD_RTOL, nn.Linear), pytest.raises(FoldError, match="above the bound"):
        fold_bn(tiny_net, x)
