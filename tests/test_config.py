import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import (
    ConfigError,
    PruneConfig,
    RunConfig,
    TrainConfig,
    dump_config,
    load_config,
    to_dict,
)


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


# --- numbers YAML 1.1 reads as strings, ranges, and a fuzz of the loader -------------------------


def test_scientific_notation_is_a_number_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "train:\n  lr: 1E-3\n  weight_decay: 5e3\n  penalty:\n    strength: 1e-2\n"
        "prune:\n  threshold: 5e-2\nexport:\n  atol: .5\n"
    )
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.penalty.strength) == (1e-3, 5e3, 1e-2)
    assert (cfg.prune.threshold, cfg.export.atol) == (5e-2, 0.5)


def test_scientific_notation_is_a_number_in_set():
    cfg = load_config(
        None, ["train.penalty.strength=1e-2", "train.lr=1E-3", "prune.threshold=5e-2"]
    )
    assert (cfg.train.penalty.strength, cfg.train.lr, cfg.prune.threshold) == (1e-2, 1e-3, 5e-2)
    assert isinstance(cfg.prune.threshold, float)


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=nan",
        "train.lr=inf",
        "train.lr=.nan",
        "train.lr=1e999",
        "train.penalty.bias=.inf",
        "train.penalty.bias=-.inf",
        "model.width=.nan",
        "prune.threshold=.nan",
        "prune.threshold=nan",
        "prune.threshold=-.inf",
    ],
)
def test_non_finite_numbers_are_rejected(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}.*(finite|number)"):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.momentum=1", "in [0, 1)"),
        ("train.momentum=-0.1", "in [0, 1)"),
        ("train.bn_lr_mult=0", "> 0"),
        ("train.weight_decay=-1e-4", ">= 0"),
        ("train.seed=-1", "in [0, 2**32)"),
        ("train.penalty.t=0", "> 0"),
        ("export.atol=0", "> 0"),
        ("bench.warmup=-1", ">= 0"),
        ("bench.threads=0", "in [1, 256]"),
        ("bench.threads=100000", "in [1, 256]"),
        ("export.opset=1000", "in [17, "),
        ("data.eval_batch_size=0", ">= 1"),
        ("data.num_workers=-1", ">= 0"),
        ("data.train_limit=0", "null (all) or >= 1"),
        ("prune.finetune_epochs=-1", ">= 0"),
        ("prune.finetune_lr=0", "> 0"),
        ("prune.threshold=0", "'auto', 'ratio' or a finite number > 0"),
        ("prune.threshold=-1e-2", "'auto', 'ratio' or a finite number > 0"),
        ("model.depth=0", ">= 1"),
    ],
)
def test_out_of_range_names_key_range_and_value(override, expected):
    key, _, raw = override.partition("=")
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert key in message and expected in message, message
    value = float(raw)  # int fields report an int, float fields a float
    assert f"got {value!r}" in message or f"got {int(value)!r}" in message, message


@pytest.mark.parametrize(
    "override", ["train.lr=true", "bench.threads=false", "prune.threshold=true"]
)
def test_bool_is_not_a_number(override):
    with pytest.raises(ConfigError, match=override.partition("=")[0]):
        load_config(None, [override])


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="train.momentum"):
        TrainConfig(momentum=float("nan"))
    with pytest.raises(ConfigError, match="prune.threshold"):
        PruneConfig(threshold=float("nan"))
    with pytest.raises(ConfigError, match="train.epochs expects int"):
        TrainConfig(epochs=True)


def test_set_fills_an_empty_yaml_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n")
    assert load_config(path, ["train.lr=1e-3"]).train.lr == 1e-3


def test_bad_yaml_in_set_and_non_mapping_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--set bench.batches"):
        load_config(None, ["bench.batches=[1, 8"])
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


DOTTED = _dotted_keys(to_dict(RunConfig()))
NAMES = sorted({k.rsplit(".", 1)[-1] for k in DOTTED})
# Each leaf key with its default written as a --set value, e.g. "train.lr" -> "0.05".
DEFAULTS = {
    key: yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    for key, value in _flat(to_dict(RunConfig())).items()
}
NUMBERISH = ["1e-2", "1E-3", ".5", "5e3", "-1", "0", "1", "2", "nan", ".nan", "inf", "-.inf"]
NUMBERISH += ["9" * 400, "1e999"]  # beyond float range: an int and a string
RAW = st.one_of(
    st.sampled_from(NUMBERISH + ["auto", "ratio", "l1", "true", "null", "[1, 8]", "{a: 1}", "["]),
    st.text(max_size=8),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.sampled_from(NUMBERISH + ["auto", "ratio", "max", "receding", "polarization", "cpu"]),
    st.text(max_size=6),
)
# YAML keys need not be strings: 1, null and true are keys too.
KEYS = st.one_of(st.sampled_from(NAMES), st.text(max_size=4), st.integers(-2, 2), st.none())
TREES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(KEYS, children, max_size=4),
    ),
    max_leaves=12,
)
CONFIG_TREES = st.dictionaries(
    st.one_of(
        st.sampled_from(["data", "model", "train", "prune", "export", "bench", "penalty"]), KEYS
    ),
    TREES,
    max_size=4,
)
# A leaf key set to its default, a nearby-looking number or junk: valid configs are common.
PLAUSIBLE_SET = st.sampled_from(sorted(DEFAULTS)).flatmap(
    lambda key: st.one_of(st.just(DEFAULTS[key]), st.sampled_from(NUMBERISH), RAW).map(
        lambda raw: f"{key}={raw}"
    )
)
OVERRIDES = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED), RAW),
        st.text(max_size=12),
    ),
    max_size=4,
)


def _assert_valid_and_round_trips(cfg: RunConfig, folder) -> None:
    assert isinstance(cfg, RunConfig)
    floats = [v for v in _leaves(to_dict(cfg)) if isinstance(v, float)]
    assert all(math.isfinite(v) for v in floats)
    path = folder / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def _leaves(tree):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        elif isinstance(value, list):
            yield from value
        else:
            yield value


@settings(max_examples=300, deadline=None)
@given(data=CONFIG_TREES, overrides=OVERRIDES)
def test_fuzz_loader_gives_a_valid_config_or_config_error(tmp_path_factory, data, overrides):
    folder = tmp_path_factory.mktemp("fuzz", numbered=True)
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        cfg = load_config(path, overrides)
    except ConfigError:
        return
    _assert_valid_and_round_trips(cfg, folder)


@settings(max_examples=300, deadline=None)
@given(overrides=st.lists(PLAUSIBLE_SET, max_size=6))
def test_fuzz_set_strings_give_a_valid_config_or_config_error(tmp_path_factory, overrides):
    folder = tmp_path_factory.mktemp("fuzz_set", numbered=True)
    try:
        cfg = load_config(None, overrides)
    except ConfigError:
        return
    _assert_valid_and_round_trips(cfg, folder)


# --- a key given twice, a file that is not UTF-8 (both silently wrong or unnamed before) --------


def _yaml_lines(tree: dict, indent: int = 0) -> list[tuple[int, str, object]]:
    """Block-style YAML of ``tree``, one (indent, key, value) per line; a mapping value is
    written as its own lines below its key."""
    lines = []
    for key, value in tree.items():
        if isinstance(value, dict):
            lines.append((indent, key, None))
            lines += _yaml_lines(value, indent + 2)
        else:
            lines.append((indent, key, value))
    return lines


def _render(lines) -> str:
    def scalar(value):
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()

    return "".join(
        f"{' ' * i}{k}:\n" if v is None else f"{' ' * i}{k}: {scalar(v)}\n" for i, k, v in lines
    )


SECTIONS = st.lists(st.sampled_from(sorted(to_dict(RunConfig()))), min_size=1, unique=True)


@settings(max_examples=150, deadline=None)
@given(sections=SECTIONS, data=st.data())
def test_a_key_given_twice_at_any_depth_is_refused_naming_the_file(tmp_path_factory, sections, data):
    """PyYAML keeps the last of two equal keys: a second ``train:`` dropped the first silently.
    Any key repeated in one mapping, at any depth, is refused naming the file, key and lines."""
    defaults = to_dict(RunConfig())
    lines = _yaml_lines({s: defaults[s] for s in sections})
    at = data.draw(st.integers(0, len(lines) - 1), label="line to repeat")
    indent, key, _ = lines[at]
    end = next((j for j in range(at + 1, len(lines)) if lines[j][0] < indent), len(lines))
    repeated = [*lines[:end], (indent, key, "0"), *lines[end:]]  # same mapping, after its block
    folder = tmp_path_factory.mktemp("dup", numbered=True)
    path = folder / "c.yaml"
    path.write_text(_render(lines))
    load_config(path)  # the file without the repeat is a valid config
    path.write_text(_render(repeated))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"config file {str(path)!r}: key {key!r} appears twice" in str(err.value)
    assert f"(lines {at + 1} and {end + 1})" in str(err.value)


def test_two_train_sections_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 1\nprune:\n  ratio: 0.3\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice in one mapping \(lines 1 and 5\)"):
        load_config(path)


def test_a_key_given_twice_in_a_set_value_is_refused():
    with pytest.raises(ConfigError, match=r"--set train.penalty: key 'bias' appears twice"):
        load_config(None, ["train.penalty={bias: 1, bias: 2}"])


def test_a_yaml_merge_key_still_overrides(tmp_path):
    """``<<: *base`` then a key of the base is YAML's override, not a repeat."""
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lr: 0.1, epochs: 2}\n")
    text = "train:\n  <<: {lr: 0.1, epochs: 2}\n  lr: 0.2\n"
    path.write_text(text)
    assert load_config(path).train.lr == 0.2 and load_config(path).train.epochs == 2


@pytest.mark.parametrize(
    "raw", [b"train:\n  epochs: 1 \xff\xfe\n", "prune:\n  ratio: 0.3  # caf\u00e9\n".encode("latin-1")]
)
def test_a_config_that_is_not_utf8_names_the_file(tmp_path, raw):
    path = tmp_path / "latin.yaml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match=rf"config file '{path}' is not UTF-8 text \(byte 0x"):
        load_config(path)
