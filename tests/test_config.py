import pytest

from pipeline.config import ConfigError, RunConfig, dump_config, load_config


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prune:\n  ratio: 0.3\nbench:\n  batches: [1, 8]\n")
    cfg = load_config(path, ["prune.ratio=0.6", "train.penalty.method=l1"])
    assert cfg.prune.ratio == 0.6
    assert cfg.bench.batches == (1, 8)
    assert cfg.train.penalty.method == "l1"
    assert cfg.train.epochs == RunConfig().train.epochs


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: prune.threshold, prune.ratio"):
        load_config(None, ["prune.bogus=1"])


def test_bad_values_are_rejected_with_the_value():
    with pytest.raises(ConfigError, match="got 1.5"):
        load_config(None, ["prune.ratio=1.5"])
    with pytest.raises(ConfigError, match="bench.runs must be >= 50"):
        load_config(None, ["bench.runs=10"])
    with pytest.raises(ConfigError, match="expects int"):
        load_config(None, ["train.epochs=many"])


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["prune.threshold=0.2", "data.image_size=16"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_demo_config_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.train.penalty.method == "receding"
