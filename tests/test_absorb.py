"""Constant-channel removal is exact on every output element, zero-padded borders included."""

import pytest
import torch
from torch import nn

from pipeline.absorb import CorrectedConv2d, remove_groups
from pipeline.channel_graph import build_channel_graph
from pipeline.fold import fold_bn

REL = 1e-5  # relative to the output scale


class Chain(nn.Module):
    """conv-BN-ReLU -> [pool] -> conv (the reader) -> BN -> depthwise -> BN -> linear head."""

    def __init__(self, pad=1, stride=1, dilation=1, groups=1, avgpool=False, act=nn.ReLU):
        super().__init__()
        self.c1, self.b1, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act()
        self.pool = nn.AvgPool2d(3, 1, 1) if avgpool else nn.Identity()
        self.c2 = nn.Conv2d(8, 8, 3, stride=stride, padding=pad, dilation=dilation, groups=groups)
        self.b2 = nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.pool(self.act(self.b1(self.c1(x))))
        x = torch.relu(self.b3(self.c3(torch.relu(self.b2(self.c2(x))))))
        return self.fc(x.mean((2, 3)))


def _shifted(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.8 + 0.2)  # act(beta) != 0
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


CASES = {
    "padding1": {},
    "padding2": {"pad": 2},
    "stride2": {"stride": 2},
    "dilation2": {"dilation": 2, "pad": 2},
    "grouped": {"groups": 2},
    "avgpool": {"avgpool": True},
    "sigmoid": {"act": nn.Sigmoid},
}


@pytest.mark.parametrize("case", CASES)
def test_removal_equals_zeroed_scales_everywhere(case):
    model = _shifted(Chain(**CASES[case]))
    x = torch.randn(3, 3, 11, 11)
    graph = build_channel_graph(model, x)
    absorbable = [g.id for g in graph.groups if g.absorbable]
    dropped = set(absorbable[::3])
    pruned, _, report = remove_groups(model, graph, dropped, x)
    assert report.absorbed_groups == len(dropped) and report.corrections
    assert report.max_rel_err <= REL
    # and the correction survives folding
    folded, fold = fold_bn(pruned, x)
    assert fold.max_rel_err <= REL


def test_interior_only_bias_reports_the_border_error():
    model = _shifted(Chain(pad=2))
    x = torch.randn(2, 3, 11, 11)
    graph = build_channel_graph(model, x)
    b1 = [g.id for g in graph.groups if g.absorbable and any(n == "b1" for n, _ in g.bn_channels)]
    dropped = set(b1[::2])
    _, _, exact = remove_groups(model, graph, dropped, x)
    _, _, interior = remove_groups(model, graph, dropped, x, exact_borders=False)
    assert exact.max_rel_err <= REL
    assert interior.max_border_err > 0.01 and interior.max_rel_err > 10 * REL


def test_kernel_correction_is_exact_at_other_input_sizes():
    model = _shifted(Chain(pad=1))
    x = torch.randn(2, 3, 11, 11)
    graph = build_channel_graph(model, x)
    b1 = [g.id for g in graph.groups if g.absorbable and any(n == "b1" for n, _ in g.bn_channels)]
    dropped = set(b1[::2])
    pruned, _, report = remove_groups(model, graph, dropped, x)
    assert ("c2", "kernel") in report.corrections
    assert isinstance(dict(pruned.named_modules())["c2"], CorrectedConv2d)
    from pipeline.absorb import zero_scales_

    zero_scales_(model, graph, dropped)
    for size in (7, 16):
        y = torch.randn(2, 3, size, size)
        ref = model(y)
        assert (pruned(y) - ref).abs().max() <= REL * ref.abs().max()


def test_corrected_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from pipeline.export.onnx import export_onnx, verify_onnx

    model = _shifted(Chain(avgpool=True))
    x = torch.randn(4, 3, 11, 11)
    graph = build_channel_graph(model, x)
    pruned, _, _ = remove_groups(
        model, graph, set([g.id for g in graph.groups if g.absorbable][::2]), x
    )
    folded, _ = fold_bn(pruned, x)
    path = export_onnx(folded, x[:2], tmp_path / "m.onnx")
    assert verify_onnx(path, pruned, x, atol=1e-4).passed


def test_ista_zeros_are_removed_exactly():
    """ISTA's exact zeros: shrink some gammas to 0, then removal must match the original model."""
    from kernels.ista_shrink import ista_shrink_

    model = _shifted(Chain())
    gammas = [model.b1.weight, model.b2.weight]
    with torch.no_grad():
        model.b1.weight.copy_(torch.linspace(0.01, 1.0, 8))
    ista_shrink_(gammas, lrs=[1.0, 1.0], lambdas=[1.0, 0.0], rho=0.3, backend="torch")
    assert int((model.b1.weight == 0).sum()) >= 2  # exact zeros
    x = torch.randn(2, 3, 11, 11)
    graph = build_channel_graph(model, x)
    zero = {
        g.id
        for g in graph.groups
        if g.absorbable
        and all(float(model.get_submodule(n).weight[c]) == 0 for n, c in g.bn_channels)
    }
    assert zero
    pruned, _, report = remove_groups(model, graph, zero, x)
    ref = model(x)  # the ORIGINAL model: its zero-gamma channels were already constant
    assert (pruned(x) - ref).abs().max() <= REL * ref.abs().max()
    assert report.zeroing_err == 0.0
