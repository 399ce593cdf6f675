"""ONNX export: parity with PyTorch, dynamic batch, tamper detection, opset and mode handling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pipeline.export.onnx import export_onnx, verify_onnx  # noqa: E402

ATOL = 1e-4


class TinyNet(nn.Module):
    """Residual add, concat, depthwise and grouped conv, SE gate, per-position buffer, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1), nn.Sigmoid())
        self.register_buffer("position", torch.randn(16, 8, 8))
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.depthwise(x) + x  # residual
        x = torch.cat([x, self.grouped(x)], dim=1) + self.position  # [N, 16, 8, 8]
        x = x * self.se(x)
        x = torch.relu(self.down(x))
        return self.head(x.mean(dim=(2, 3)))


def _trained_net() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics, so eval differs from train mode
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyNet, object]:
    net = _trained_net().train()
    path = export_onnx(net, torch.randn(2, 3, 8, 8), tmp_path_factory.mktemp("onnx") / "m.onnx")
    return net, path


def test_parity_and_dynamic_batch(exported: tuple[TinyNet, object]) -> None:
    net, path = exported
    for batch in (1, 5):
        inputs = torch.randn(batch, 3, 8, 8)
        result = verify_onnx(path, net, inputs, atol=ATOL)
        assert result.passed, result
        assert result.max_abs_err <= ATOL
        assert result.batch_sizes == (batch, batch + 1)
        assert result.opset == 17
        with torch.no_grad():
            scale = net.eval()(inputs).abs().max().item()
        net.train()
        assert result.max_rel_err == pytest.approx(result.max_abs_err / scale, rel=0.5)


def test_graph_interface_and_opset(exported: tuple[TinyNet, object]) -> None:
    _, path = exported
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}


def test_export_restores_callers_mode(exported: tuple[TinyNet, object]) -> None:
    net, path = exported
    assert net.training and all(m.training for m in net.modules())
    verify_onnx(path, net, torch.randn(2, 3, 8, 8))
    assert net.training and all(m.training for m in net.modules())


def test_tampered_initializer_fails(exported: tuple[TinyNet, object], tmp_path) -> None:
    net, path = exported
    proto = onnx.load(str(path))
    weight = max(proto.graph.initializer, key=lambda t: onnx.numpy_helper.to_array(t).size)
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    result = verify_onnx(tampered, net, torch.randn(3, 3, 8, 8), atol=ATOL)
    assert not result.passed
    assert result.max_abs_err > ATOL


def test_bad_simplification_is_discarded(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    onnxslim = pytest.importorskip("onnxslim")

    def corrupting_slim(proto):  # a "simplifier" that changes the numbers
        bias = next(t for t in proto.graph.initializer if len(t.dims) == 1)
        array = onnx.numpy_helper.to_array(bias) + 1.0
        bias.CopyFrom(onnx.numpy_helper.from_array(array, bias.name))
        return proto

    monkeypatch.setattr(onnxslim, "slim", corrupting_slim)
    net = _trained_net()
    path = export_onnx(net, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", simplify=True)
    assert verify_onnx(path, net, torch.randn(2, 3, 8, 8), atol=ATOL).passed


def test_static_batch_runs_one_batch(tmp_path) -> None:
    net = _trained_net()
    path = export_onnx(net, torch.randn(2, 3, 8, 8), tmp_path / "static.onnx",
                       dynamic_batch=False, simplify=False)  # fmt: skip
    result = verify_onnx(path, net, torch.randn(2, 3, 8, 8))
    assert result.passed and result.batch_sizes == (2,)


def test_low_opset_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="opset must be >= 17"):
        export_onnx(_trained_net(), torch.randn(2, 3, 8, 8), tmp_path / "x.onnx", opset=13)
    assert not (tmp_path / "x.onnx").exists()


def test_missing_onnx_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'recede\[onnx\]'"):
        export_onnx(_trained_net(), torch.randn(2, 3, 8, 8), tmp_path / "x.onnx")


def test_slimming_is_not_trusted_without_onnxruntime(monkeypatch, caplog):
    """With onnxruntime missing, a simplified graph cannot be checked, so it must not be used."""
    import types

    import pipeline.export.onnx as onnx_export

    def missing():
        raise ImportError("ONNX verification needs the 'onnxruntime' package (test)")

    wrong = onnx.ModelProto()  # what a faulty simplifier might return
    monkeypatch.setitem(
        __import__("sys").modules, "onnxslim", types.SimpleNamespace(slim=lambda p: wrong)
    )
    monkeypatch.setattr(onnx_export, "_import_onnxruntime", missing)
    proto = onnx.ModelProto()
    proto.graph.name = "original"
    example = torch.randn(1, 3, 8, 8)
    with pytest.raises(ImportError, match="onnxruntime"):
        onnx_export._same_outputs(proto, wrong, example)
    with caplog.at_level("WARNING"):
        kept = onnx_export._slimmed_or_original(proto, example)
    assert kept is proto and kept.graph.name == "original"
    assert "onnxruntime" in caplog.text
