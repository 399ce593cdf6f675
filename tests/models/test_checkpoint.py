import json

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.models.checkpoint import load_pruned, save_pruned
from pipeline.models.zoo import build_model
from pipeline.prune.stage import apply_plan_, make_plan, select_groups


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
    assert loaded_spec.to_dict() == {**spec, "bn_shift": False}  # the defaults spelled out
    assert torch.equal(loaded(x), model(x))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_folder_saved_before_shapes_json_still_loads(tmp_path, tiny_net):
    spec = {"model": {"name": "tests.conftest:TinyNet"}, "num_classes": 5, "in_channels": 3,
            "bounded_bn": False, "input_shape": [3, 8, 8]}  # fmt: skip
    save_pruned(tiny_net, tmp_path, spec=spec)
    (tmp_path / "shapes.json").rename(tmp_path / "manifest.json")  # the old name
    loaded, _ = load_pruned(tmp_path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), tiny_net(x))


def test_model_folder_finds_train_and_run_models(tmp_path, tiny_net):
    from pipeline.models.checkpoint import CheckpointError, model_folder

    save_pruned(tiny_net, tmp_path / "train" / "model", spec={})
    save_pruned(tiny_net, tmp_path / "run" / "trained", spec={})
    assert model_folder(tmp_path / "train") == tmp_path / "train" / "model"
    assert model_folder(tmp_path / "run") == tmp_path / "run" / "trained"
    with pytest.raises(CheckpointError, match="holds no saved model"):
        model_folder(tmp_path)


def test_model_spec_round_trips_and_reads_older_specs():
    from pipeline.models.zoo import ModelSpec

    spec = ModelSpec(ModelConfig(name="resnet20", width=0.5), 10, 3, (3, 16, 16), True, True)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    old = {"model": {"name": "vgg"}, "num_classes": 5, "in_channels": 1, "input_shape": [1, 8, 8]}
    read = ModelSpec.from_dict(old)  # written before bounded_bn/bn_shift were recorded
    assert (read.bounded_bn, read.bn_shift, read.input_shape) == (False, False, (1, 8, 8))
    assert read.model == ModelConfig(name="vgg")


def test_saved_model_spec_loads_back_as_the_same_spec(tmp_path, tiny_net):
    from pipeline.models.zoo import ModelSpec

    spec = ModelSpec(ModelConfig(name="tests.conftest:TinyNet"), 5, 3, (3, 8, 8))
    save_pruned(tiny_net, tmp_path, spec=spec)
    loaded, saved = load_pruned(tmp_path)
    assert saved == spec
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), tiny_net(x))
