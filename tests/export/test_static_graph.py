"""Static pruned graphs: constant-channel corrections cost nothing per call, in eager and ONNX."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pipeline.config import ModelConfig, PruneConfig
from pipeline.fold.batchnorm import FoldError, fold_bn, fold_corrections_
from pipeline.layers.corrected_conv import CorrectedConv2d
from pipeline.models.zoo import build_model
from pipeline.prune.stage import prune_model

REL = 1e-5


def _shifted_demo_vgg() -> nn.Module:
    """configs/demo.yaml's model (VGG-11 w0.5 on 1x32x32 digits) with non-zero BN shifts."""
    model = build_model(ModelConfig(name="vgg", depth=11, width=0.5), num_classes=10, in_channels=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.8 + 0.2)  # act(beta) != 0
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def demo_pruned() -> tuple[nn.Module, torch.Tensor]:
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    result = prune_model(
        _shifted_demo_vgg(), x, PruneConfig(threshold="ratio", max_layer_ratio=0.5)
    )
    assert sum(form == "kernel" for _, form in result.removal.corrections) >= 3
    assert result.removal.check.verdict == "ok"  # float64: sensitive where fp32 ONNX is not
    return result.model, x


class CountConvs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += "conv2d" in getattr(func, "__name__", "")
        return func(*args, **(kwargs or {}))


def _conv_calls(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), CountConvs() as mode:
        model(x)
    return mode.calls


def test_eager_pays_the_correction_once_per_size(demo_pruned) -> None:
    model, x = demo_pruned
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    kernels = sum(getattr(m, "const_kernel", None) is not None for m in model.modules())
    for m in model.modules():
        m.__dict__.pop("_correction_cache", None)
    assert _conv_calls(model, x) == convs + kernels  # the counter sees the corrections
    assert _conv_calls(model, x) == convs  # cached: one conv per layer
    assert _conv_calls(model, x[:3]) == convs  # the batch size does not matter
    assert _conv_calls(model, torch.randn(2, 1, 48, 48)) == convs + kernels  # a new size


def _fresh(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The kernel form computed from scratch, as before the cache existed."""
    ones = torch.ones_like(x[:1, :1])
    extra = nn.functional.conv2d(
        ones, conv.const_kernel, None, conv.stride, conv.padding, conv.dilation
    )
    return conv._conv_forward(x, conv.weight, conv.bias) + extra


def test_cache_follows_the_kernel_and_stays_out_of_the_state_dict(demo_pruned) -> None:
    model, _ = demo_pruned
    conv = next(m for m in model.modules() if getattr(m, "const_kernel", None) is not None)
    assert not any("cache" in k for k in model.state_dict())
    x = torch.randn(2, conv.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(conv(x), _fresh(conv, x))
        conv.const_kernel.mul_(2.0)  # in place, as convert.py rescales
        assert torch.equal(conv(x), _fresh(conv, x))
        conv.const_kernel = conv.const_kernel / 2.0  # replaced, as fold_bn does
        assert torch.equal(conv(x), _fresh(conv, x))
        assert not torch.equal(_fresh(conv, x), conv._conv_forward(x, conv.weight, conv.bias))


def test_folded_corrections_match_the_kernel_form_at_the_example_size(demo_pruned) -> None:
    model, x = demo_pruned
    folded, _ = fold_bn(model, x)
    ref = folded(x)
    report = fold_corrections_(folded, x)
    assert report.maps and report.max_rel_err <= REL
    assert not any(getattr(m, "const_kernel", None) is not None for m in folded.modules())
    assert (folded(x) - ref).abs().max() <= REL * ref.abs().max()
    with pytest.raises(RuntimeError, match="prune again with an example"):
        folded(torch.randn(1, 1, 48, 48))  # a map holds for its size only


def test_a_uniform_correction_becomes_a_plain_bias() -> None:
    conv = nn.Conv2d(4, 3, 3, padding=1)
    ref = nn.Sequential(nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), conv).eval()
    from pipeline.layers.corrected_conv import make_corrected_

    make_corrected_(conv, kernel=torch.randn(3, 1, 3, 3))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = ref(x)
        report = fold_corrections_(ref, x)  # a 1x1 input: the window sees only its centre
    assert report.biases == ("2",) and not report.maps
    assert type(ref[2]) is nn.Conv2d and "const_kernel" not in ref[2].state_dict()
    assert torch.allclose(ref(x), want, rtol=0, atol=1e-6)


def test_a_wrong_static_value_is_caught(demo_pruned, monkeypatch) -> None:
    import pipeline.fold.batchnorm as fold

    model, x = demo_pruned
    folded, _ = fold_bn(model, x)
    real = fold._to_constant_
    monkeypatch.setattr(fold, "_to_constant_", lambda conv, value: real(conv, value * 1.01))
    with pytest.raises(FoldError, match="static corrections differ"):
        fold_corrections_(folded, x)


def test_pruned_onnx_has_one_conv_per_conv_and_no_correction_nodes(demo_pruned, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from pipeline.export.onnx import export_onnx, verify_onnx

    model, x = demo_pruned
    folded, _ = fold_bn(model, x)
    path = export_onnx(folded, x[:2], tmp_path / "pruned.onnx", simplify=False)
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["Conv"] == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert not {"Shape", "Slice", "ConstantOfShape", "Constant"} & set(ops)
    maps = sum(isinstance(m, CorrectedConv2d) for m in model.modules())
    # A VGG chain: every border correction becomes a channel, except on readers whose width is
    # already a multiple of 8 (ONNX Runtime's blocked convolutions): those keep their Add
    from pipeline.fold.ones_channel import candidates

    good, kept = candidates(folded, x[:2])
    aligned = [r for r, why in kept.items() if "multiple of 8" in why]
    assert maps >= 3 and len(good) + len(aligned) == maps
    assert ops["Add"] == len(aligned)
    check = verify_onnx(path, model, x)
    # This random VGG's output moves by only ~2e-5 of its scale between inputs, below the fp32
    # bound, so the ONNX check is honestly `insensitive` here: it bounds the error, and the
    # evidence of exactness is the float64 removal check (sensitive, see demo_pruned).
    assert check.verdict == "insensitive" and check.max_abs_err <= check.bound
