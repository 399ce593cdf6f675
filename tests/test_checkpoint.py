import torch

from pipeline.channel_graph import build_channel_graph
from pipeline.checkpoint import load_pruned, save_pruned
from pipeline.config import ModelConfig
from pipeline.models import build_model
from pipeline.prune import apply_plan_, make_plan, select_groups


def test_pruned_model_round_trips_through_manifest(tmp_path):
    model = build_model(
        ModelConfig(name="resnet20", width=0.5), num_classes=10, in_channels=3
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = build_channel_graph(model, x)
    importance = {g.id: float(i) for i, g in enumerate(graph.prunable_groups)}
    apply_plan_(model, make_plan(graph, select_groups(importance, graph, ratio=0.5)))
    spec = {
        "model": {"name": "resnet20", "width": 0.5, "depth": 11},
        "num_classes": 10,
        "in_channels": 3,
        "bounded_bn": False,
        "input_shape": [3, 16, 16],
    }
    save_pruned(model, tmp_path, spec=spec)
    loaded, loaded_spec = load_pruned(tmp_path)
    assert loaded_spec == spec
    assert torch.equal(loaded(x), model(x))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
