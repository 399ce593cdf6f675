"""The command line never says `ok` for a check that could not have seen a wrong model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pipeline.cli.main import main  # noqa: E402
from pipeline.export.onnx import export_onnx, verify_onnx  # noqa: E402
from pipeline.fold.batchnorm import fold_bn  # noqa: E402

NEAR = ["--model", "tests.conftest:NearConstantNet", "--input-shape", "1,3,16,16"]


@pytest.fixture(scope="module")
def near_constant(tmp_path_factory):
    out = tmp_path_factory.mktemp("near") / "pruned"
    argv = ["prune", *NEAR, "--ratio", "0.25", "--out", str(out), "--accept-insensitive"]
    assert main(argv) == 0  # its removal check is insensitive too, and must be accepted
    return out


def test_a_near_constant_net_is_insensitive_and_exits_1_writing_nothing(
    near_constant, tmp_path, capsys
) -> None:
    out = tmp_path / "release"
    assert main(["export", str(near_constant), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "-> ok" not in captured.out.replace("fold: fp64", "")  # the fp64 fold check may be ok
    assert "model.onnx: fp32" in captured.out and "-> insensitive" in captured.out
    assert "--accept-insensitive" in captured.err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_accepting_an_insensitive_export_records_the_verdict(near_constant, tmp_path) -> None:
    out = tmp_path / "release"
    assert main(["export", str(near_constant), "--out", str(out), "--accept-insensitive"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (onnx,) = manifest["export"]["verification"]
    assert onnx["verdict"] == "insensitive" and onnx["sensitivity"] < 2
    assert manifest["metrics"]["onnx"]["verdict"] == "insensitive"


def test_untrained_mobilenet_fp16_never_prints_ok(tmp_path, capsys) -> None:
    """The reported case: fp16 outputs of an untrained net (~1e-11) round to zero, a relative
    error of 1.0 that an absolute floor of 1e-4 used to accept."""
    pytest.importorskip("torchvision")
    pruned, release = tmp_path / "pruned", tmp_path / "release"
    model = ["--model", "torchvision:mobilenet_v3_small", "--input-shape", "1,3,64,64"]
    args = [*model, "--num-classes", "10", "--ratio", "0.5", "--scope", "layer"]
    assert main(["prune", *args, "--out", str(pruned)]) == 0
    capsys.readouterr()
    assert main(["export", str(pruned), "--format", "all", "--out", str(release)]) == 1
    lines = capsys.readouterr().out.splitlines()
    fp16 = next(line for line in lines if "model.fp16.onnx: fp16" in line)
    fp32 = next(line for line in lines if "model.onnx: fp32" in line)
    assert fp16.endswith("-> failed: error is 1.00 of the output scale (never allowed above 0.5)")
    assert "-> twin-ok" in fp32  # fp32 is checked on the BN-calibrated twin, and says so
    assert not release.exists()


def test_a_sensitive_check_catches_one_zeroed_channel(tmp_path) -> None:
    """The perturbation a passing check must catch: one kept channel zeroed before export."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip
    net[1].running_var.fill_(2.0)
    x = torch.randn(4, 3, 8, 8)
    good = verify_onnx(export_onnx(fold_bn(net, x)[0], x[:2], tmp_path / "good.onnx"), net, x)
    assert good.verdict == "ok"
    wrong = fold_bn(net, x)[0]
    with torch.no_grad():
        wrong[0].weight[3] = 0.0
        wrong[0].bias[3] = 0.0
    bad = verify_onnx(export_onnx(wrong, x[:2], tmp_path / "bad.onnx"), net, x)
    assert bad.verdict == "failed" and bad.max_abs_err > good.bound
