"""Every malformed field of a model folder's ``shapes.json`` is refused naming the file and the
key, before anything is built at that size (``input_shape [3, 0, 0]`` named neither before)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli.main import main
from pipeline.models.checkpoint import CheckpointError, load_pruned
from tests.cli.test_cli_bad_inputs import TINY, assert_refused


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A pruned model folder (TinyNet: convs, a grouped and a depthwise conv, BN, a linear head)."""
    out = tmp_path_factory.mktemp("saved") / "model"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    return out


NOT_COUNTS = [0, -1, 1.5, 2.0, True, False, "3", None, [], {}]  # int 3 as 3.0 or "3" is not int
SPEC_BAD = {
    "num_classes": NOT_COUNTS,
    "in_channels": NOT_COUNTS,
    "input_shape": [[3, 0, 0], [3, -1, 16], [3, 16.0, 16], [3, True, 16], [], "3,16,16", None,
                    [1, 16, 16]],  # the last: not spec.in_channels (3)
    "bounded_bn": ["false", 0, 1, None],
    "bn_shift": ["yes", 1],
    "model": ["resnet20", None, {"name": "vgg", "width": -1}, {"name": 3}],
}  # fmt: skip
LAYER_BAD = [*NOT_COUNTS, 10**9]  # 10**9: wider than any layer the spec builds
BAD_ENTRIES = [None, 3, "Conv2d", {"type": "Conv3d"}, {}]


def _edits(saved: Path):
    """Every (key as the message names it, edit of the manifest) of the classes above."""
    manifest = json.loads((saved / "shapes.json").read_text())
    edits = []
    for key, values in SPEC_BAD.items():
        for value in values:
            edits.append((f"spec.{key}", lambda m, k=key, v=value: m["spec"].__setitem__(k, v)))
    for layer, entry in manifest["shapes"].items():
        for field in (f for f in entry if f not in ("type", "bias", "corrections")):
            for value in LAYER_BAD:
                edits.append((
                    f"shapes.{layer}.{field}",
                    lambda m, l=layer, f=field, v=value: m["shapes"][l].__setitem__(f, v),
                ))  # fmt: skip
        for value in BAD_ENTRIES:
            edits.append(
                (f"shapes.{layer}", lambda m, l=layer, v=value: m["shapes"].__setitem__(l, v))
            )
        edits.append(
            (f"shapes.{layer}.bias", lambda m, l=layer: m["shapes"][l].__setitem__("bias", "no"))
        )
    edits.append(("shapes.nosuch", lambda m: m["shapes"].__setitem__("nosuch", {"type": "Linear"})))
    return manifest, edits


def test_the_class_is_large_enough_to_mean_something(saved):
    _, edits = _edits(saved)
    assert len({key for key, _ in edits}) >= 20 and len(edits) >= 150


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_every_malformed_field_names_shapes_json_and_the_key(saved, tmp_path_factory, data):
    manifest, edits = _edits(saved)
    key, edit = data.draw(st.sampled_from(edits), label="edit")
    folder = Path(shutil.copytree(saved, tmp_path_factory.mktemp("bad", numbered=True) / "m"))
    broken = copy.deepcopy(manifest)
    edit(broken)
    (folder / "shapes.json").write_text(json.dumps(broken))
    with pytest.raises(CheckpointError) as err:
        load_pruned(folder)
    assert f"{folder / 'shapes.json'}: key '{key}" in str(err.value), (key, str(err.value))


def test_the_intact_folder_loads(saved):
    model, spec = load_pruned(saved)
    assert spec.input_shape == (3, 16, 16)


@pytest.mark.parametrize("command", ["prune", "export", "bench", "inspect"])
def test_the_reported_input_shape_names_shapes_json(command, saved, tmp_path, capsys):
    """``input_shape [3, 0, 0]`` exited 2 naming neither the file nor the key (export and bench
    traced back); every command that loads the folder names both now."""
    folder = Path(shutil.copytree(saved, tmp_path / "m"))
    manifest = json.loads((folder / "shapes.json").read_text())
    manifest["spec"]["input_shape"] = [3, 0, 0]
    (folder / "shapes.json").write_text(json.dumps(manifest))
    argv = {
        "prune": ["prune", str(folder), "--out", str(tmp_path / "o")],
        "export": ["export", str(folder)],
        "bench": ["bench", str(folder), "--batches", "1", "--force"],
        "inspect": ["inspect", str(folder)],
    }[command]
    expected = f"{folder / 'shapes.json'}: key 'spec.input_shape' must be one example's shape"
    assert_refused(tmp_path, capsys, argv, expected)


def test_a_well_formed_input_shape_the_model_cannot_take_names_shapes_json(tmp_path):
    """VGG-11's four pools take 8 px to nothing: a shape of the right form, refused naming it."""
    from pipeline.models.checkpoint import save_pruned
    from pipeline.models.zoo import VGG

    spec = {"model": {"name": "vgg", "width": 0.125}, "num_classes": 10, "in_channels": 3,
            "input_shape": [3, 8, 8]}  # fmt: skip
    save_pruned(VGG(11, 10, 3, 0.125), tmp_path, spec=spec)
    with pytest.raises(
        CheckpointError,
        match=r"shapes.json: key 'spec.input_shape' \[3, 8, 8\]: "
        "the model cannot take an input of that shape",
    ):
        load_pruned(tmp_path)
