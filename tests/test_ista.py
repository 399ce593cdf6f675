import torch

from pipeline.channel_graph import build_channel_graph
from pipeline.config import ModelConfig, PenaltyConfig
from pipeline.ista import layer_costs, rescale_gamma_
from pipeline.models import build_model
from pipeline.penalties import make_penalty


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
