import torch

from pipeline.config import ModelConfig, PenaltyConfig
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.graph.costs import layer_costs
from pipeline.models.zoo import build_model
from pipeline.train.ista import rescale_gamma_
from pipeline.train.penalties import make_penalty


def _vgg():
    return build_model(ModelConfig(name="vgg", width=0.125), num_classes=10, in_channels=3).eval()


def test_costs_are_normalised_and_favour_big_layers():
    model, x = _vgg(), torch.randn(2, 3, 32, 32)
    graph = build_channel_graph(model, x)
    for form in ("memory", "flops"):
        costs = layer_costs(model, graph, x, form)
        assert len(costs) == 8 and abs(sum(costs.values()) / len(costs) - 1) < 1e-9
        first, last = costs["features.1"], costs["features.26"]
        assert (
            first > last
        )  # the 32x32 layer costs more activation memory/MACs per channel than a 2x2 one


def test_rescaling_preserves_function_and_undoes():
    model, x = _vgg(), torch.randn(2, 3, 32, 32)
    graph = build_channel_graph(model, x)
    before = model(x)
    gamma = model.features[1].weight.clone()
    done = rescale_gamma_(model, graph, x, 0.1)
    assert len(done) == 8
    assert torch.allclose(model.features[1].weight, gamma * 0.1)
    assert torch.allclose(model(x), before, atol=1e-5)
    rescale_gamma_(model, graph, x, 10.0, only=done)
    assert torch.allclose(model.features[1].weight, gamma, atol=1e-6)


def test_ista_penalty_shrinks_to_exact_zeros_after_step():
    model, x = _vgg(), torch.randn(2, 3, 32, 32)
    penalty = make_penalty(
        PenaltyConfig(method="ista", strength=1.0), model, example=x, backend="torch"
    )
    assert len(penalty.params) == len(penalty.lambdas) == 8
    assert float(penalty.apply_()) == 0.0  # no gradient term
    penalty.after_step_(lr=1e4)
    assert all(
        int((p == 0).sum()) == p.numel() for p in penalty.params
    )  # gamma=1 shrunk by lr*rho*lambda_l >= 1 in every layer


class _DenseBlock(torch.nn.Module):
    """DenseNet-style: a pre-activation BN reads a concat, so no conv directly precedes it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.out = torch.nn.Conv2d(8, 6, 1, bias=False)
        self.bn_out = torch.nn.BatchNorm2d(6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = torch.relu(self.bn_out(self.out(y)))
        return self.head(y.mean((2, 3)))


def test_every_affine_bn_gets_a_cost_even_after_a_concat():
    model, x = _DenseBlock().eval(), torch.randn(2, 3, 8, 8)
    costs = layer_costs(model, build_channel_graph(model, x), x, "memory")
    assert set(costs) == {"bn", "bn_out"}
    assert all(v > 0 for v in costs.values())


def test_memory_cost_divides_the_feature_map_by_the_image_area():
    # Ye et al.: (k^2 c_in + sum readers k'^2 c' + H W) / (I_w I_h). The old code added H W
    # unnormalised, so it was > 99% of every lambda and the first layer cost ~ 256x the last.
    model, x = _vgg(), torch.randn(2, 3, 32, 32)
    costs = layer_costs(model, build_channel_graph(model, x), x, "memory")
    assert costs["features.1"] / costs["features.26"] < 20


def test_ista_gamma_is_plain_sgd_so_a_zeroed_gamma_stays_zero():
    from pipeline.config import TrainConfig
    from pipeline.train.loop import make_optimizer
    from pipeline.train.polarise import Polariser

    model, x = _vgg(), torch.randn(2, 3, 32, 32)
    cfg = TrainConfig(momentum=0.9, penalty=PenaltyConfig(method="ista", strength=0.1))
    pol = Polariser.prepare(model, x, cfg, total_steps=100, backend="torch")
    opt = make_optimizer(model, cfg, 0.1, pol)
    gamma_group = [
        g for g in opt.param_groups if any(p is pol.penalty.params[0] for p in g["params"])
    ]
    assert len(gamma_group) == 1 and gamma_group[0]["momentum"] == 0.0
    first = pol.penalty.params[0]
    threshold = gamma_group[0]["lr"] * 0.1 * pol.penalty.lambdas[0]
    with torch.no_grad():
        first.zero_()
    nonzero_steps = 0
    for _ in range(100):  # a constant pull half the shrink threshold, as from a loss gradient
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        first.grad.fill_(-0.5 * threshold / gamma_group[0]["lr"])
        pol.before_step()
        opt.step()
        pol.after_step(opt)
        nonzero_steps += int((first != 0).any())
    assert nonzero_steps == 0  # with momentum 0.9 the buffer pushed it off zero on 98 of 100


class _ClippedVgg(torch.nn.Module):
    """conv-BN-ReLU6-conv: dividing by alpha before ReLU6 is exact only below the clip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.bn(self.conv(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.head(y.mean((2, 3)))


def test_rescaling_skips_a_bn_behind_a_clipping_activation():
    import copy

    model, small = _ClippedVgg().eval(), 0.01 * torch.randn(2, 3, 8, 8)
    original = copy.deepcopy(model)
    done = rescale_gamma_(model, build_channel_graph(model, small), small, 0.1)
    assert done == ["bn2"]  # bn (before ReLU6) would pass a numeric check at this tiny scale
    big = 30 * torch.randn(4, 3, 8, 8)
    ref = original(big)
    assert float((model(big) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
