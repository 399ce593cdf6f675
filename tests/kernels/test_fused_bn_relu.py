"""Fusing BoundedBatchNorm2d -> nn.ReLU: which pairs fuse, exactness in eval and training
(reference and Triton kernels), the way back, and the refusals."""

import copy

import pytest
import torch
from torch import nn

from pipeline.fold.batchnorm import FoldError, fold_bn_
from pipeline.layers.bn import convert_to_plain_bn_
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.train.fuse_relu import (
    ReLUFusedIntoBN,
    fuse_bn_relu_,
    fused_for_training,
    unfuse_bn_relu_,
)

FP32 = {"rtol": 1e-4, "atol": 1e-4}  # the kernel tests' fp32 tolerance


class Net(nn.Module):
    """Fusable: ``a`` and ``b``. Not: ``c`` (BN output also feeds an add), ``shared`` (one ReLU
    module called twice), ``d`` (no ReLU after it)."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()

        def bn(c: int) -> BoundedBatchNorm2d:
            return BoundedBatchNorm2d(c, shift=True, backend=backend)

        self.a = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1, bias=False), bn(7), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(7, 7, 3, padding=1, bias=False), bn(7), nn.ReLU(True))
        self.conv_c, self.bn_c, self.relu_c = nn.Conv2d(7, 7, 1, bias=False), bn(7), nn.ReLU()
        self.conv_d, self.bn_d = nn.Conv2d(7, 7, 1, bias=False), bn(7)
        self.shared = nn.ReLU()
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(x))
        c = self.bn_c(self.conv_c(x))
        x = self.relu_c(c) + c
        x = self.shared(self.bn_d(self.conv_d(x)))
        x = self.shared(x - 0.1)
        return self.head(x.mean((2, 3)))


def _randomised(backend: str = "auto") -> Net:
    torch.manual_seed(0)
    net = Net(backend)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BoundedBatchNorm2d):
                m.weight.normal_()
                m.bias.normal_(0, 0.5)
    return net


def _step(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net.train()
    out = net(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad for n, p in net.named_parameters()}


def test_fuses_exactly_the_sole_relu_users():
    net = _randomised()
    keys = list(net.state_dict())
    pairs = fuse_bn_relu_(net, torch.randn(2, 3, 8, 8))
    assert pairs == [("a.1", "a.2"), ("b.1", "b.2")]
    assert net.a[1].relu and net.b[1].relu and not net.bn_c.relu and not net.bn_d.relu
    assert isinstance(net.a[2], ReLUFusedIntoBN) and isinstance(net.relu_c, nn.ReLU)
    assert list(net.state_dict()) == keys
    assert "relu=True" in repr(net.a[1])


def _fused_against_unfused(backend: str, device: torch.device, tol: dict) -> None:
    net = _randomised(backend).to(device)
    fused = copy.deepcopy(net)
    x = torch.randn(4, 3, 8, 8, device=device)
    fuse_bn_relu_(fused, x)
    want_out, want_grads = _step(net, x)
    got_out, got_grads = _step(fused, x)
    torch.testing.assert_close(got_out, want_out, **tol)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **tol, msg=name)
    for name, buf in net.named_buffers():
        torch.testing.assert_close(fused.get_buffer(name), buf, **tol, msg=name)


def test_fused_training_step_is_bitwise_on_the_reference():
    _fused_against_unfused("torch", torch.device("cpu"), {"rtol": 0, "atol": 0})


def test_fused_training_step_matches_on_the_kernels(device, triton_backend):
    _fused_against_unfused(triton_backend, device, FP32)


def test_unfuse_restores_relu_modules_and_plain_conversion():
    net = _randomised()
    x = torch.randn(2, 3, 8, 8)
    fuse_bn_relu_(net, x)
    with pytest.raises(ValueError, match=r"'a.1'.*unfuse_bn_relu_"):
        convert_to_plain_bn_(net)
    with pytest.raises(FoldError, match=r"fused ReLU.*unfuse_bn_relu_"):
        fold_bn_(net.eval())  # folding would silently drop the ReLU
    assert unfuse_bn_relu_(net) == 2
    assert type(net.a[2]) is nn.ReLU and type(net.b[2]) is nn.ReLU and net.b[2].inplace
    assert not any(m.relu for m in net.modules() if isinstance(m, BoundedBatchNorm2d))
    assert convert_to_plain_bn_(net) == 4


def test_a_fusion_that_changes_the_output_is_undone(monkeypatch):
    net = _randomised()
    monkeypatch.setattr(ReLUFusedIntoBN, "forward", lambda self, x: x + 1.0)
    with pytest.raises(RuntimeError, match="bitwise equality, so nothing was fused"):
        fuse_bn_relu_(net, torch.randn(2, 3, 8, 8))
    assert not any(isinstance(m, ReLUFusedIntoBN) for m in net.modules())
    assert not any(m.relu for m in net.modules() if isinstance(m, BoundedBatchNorm2d))


def _fused_count(net: nn.Module) -> int:
    return sum(isinstance(m, ReLUFusedIntoBN) for m in net.modules())


def test_training_fusion_is_undone_on_leaving_even_on_error():
    net = _randomised()
    with fused_for_training(net, (3, 8, 8), enabled=True) as pairs:
        assert len(pairs) == 2 and _fused_count(net) == 2
    assert _fused_count(net) == 0 and type(net.a[2]) is nn.ReLU
    with (
        pytest.raises(RuntimeError, match="boom"),
        fused_for_training(net, (3, 8, 8), enabled=True),
    ):
        assert _fused_count(net) == 2
        raise RuntimeError("boom")
    assert _fused_count(net) == 0
    with fused_for_training(net, (3, 8, 8), enabled=False) as pairs:  # the CPU trainer's case
        assert pairs == [] and _fused_count(net) == 0
