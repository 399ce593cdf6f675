"""Every config value that would only fail after training (or after data loading) is refused
before any work: exit 2 naming the key, no data loaded, no training step, nothing on disk.

``--set bench.batches=[1000000]`` trained for minutes, then died allocating (a traceback, exit 1,
``.partial`` left). The class is every value first used late; each key of the config is listed
below with where it is checked, so a new key must be placed in the class or out of it.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pipeline.cli.preflight as preflight
from pipeline.config import ConfigError, RunConfig, to_dict
from tests.cli.test_cli_bad_inputs import SMALL, assert_refused


def no_batchnorm(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, num_classes),
    )  # fmt: skip


def frozen_batchnorm(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """BatchNorm whose scale is frozen: recede leaves it alone, so nothing could recede."""
    model = nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )  # fmt: skip
    model[1].requires_grad_(False)
    return model


class _Branchy(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = y.relu()
        return self.head(y.mean((2, 3)))


def data_dependent(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _Branchy(num_classes, in_channels)


# Every key, and where a bad value of it is refused: "load" (the config's own validation, before
# anything runs), "pre-flight" (pipeline.cli.preflight, before data or training), or why it
# cannot fail late.
WHERE_CHECKED = {
    "data.name": "load",
    "data.root": "before training: load_data reads it first",
    "data.image_size": "pre-flight (the model must take it) and load (> 0)",
    "data.batch_size": "load, and the first training step uses it",
    "data.eval_batch_size": "load; evaluation stops at the test set's size",
    "data.num_workers": "load",
    "data.train_limit": "load",
    "data.skip_unreadable": "load",
    "model.name": "pre-flight (builds, has BatchNorm, traces)",
    "model.width": "load and pre-flight (feasibility: parameter count)",
    "model.depth": "load",
    "train.device": "pre-flight",
    "train.compile": "load; used from the first step",
    "train.penalty": "load",
    "train.target_latency_ms": "load (> 0, and set exactly when target_cost is latency)",
    "train.latency": "load (every train.latency key; int8 and tensorrt refused) and before "
    "training (cuda needs a GPU: pipeline.cli.latency); the cut re-measures what it predicts",
    "prune.threshold": "load; `auto` on a unimodal model keeps the trained model to resume",
    "prune.min_channels": "load; a floor above a layer's width keeps the layer whole",
    "prune.round_to": "load; rounding never exceeds a layer's width",
    "export.opset": "load (against this torch's exporter)",
    "export.int8": "load (every export.int8 key); sample counts are capped by what the splits "
    "hold, and an INT8 check that fails is a verdict (exit 1), not bad input",
    "bench.batches": "pre-flight (memory) and load (>= 1)",
    "bench.threads": "load",
    "bench.clock": "load (cpu needs threads 1)",
}
ALSO_LOAD_ONLY = {  # validated on load; no value that passes can fail later
    "train": ["epochs", "lr", "momentum", "weight_decay", "bn_lr_mult", "bn_shift",
              "bn_init_logit", "bn_init", "schedule", "seed", "target", "target_cost",
              "target_ramp", "target_delay", "receded_below", "penalise", "strength_rate"],
    "prune": ["ratio", "scope", "aggregate", "max_layer_ratio", "finetune_epochs",
              "exact_borders", "recalibrate", "finetune_lr", "allow_approximate"],
    "export": ["atol", "tensorrt", "fp16", "accept_insensitive", "allow_slower"],
    "bench": ["runs", "warmup"],
}  # fmt: skip


def test_every_config_key_is_placed_in_the_class_or_out_of_it():
    keys = {f"{section}.{key}" for section, tree in to_dict(RunConfig()).items() for key in tree}
    placed = set(WHERE_CHECKED) | {f"{s}.{k}" for s, ks in ALSO_LOAD_ONLY.items() for k in ks}
    assert keys == placed, (sorted(keys - placed), sorted(placed - keys))


LATE = {
    "bench_batches_beyond_memory": (
        ["run"], ["--set", "bench.batches=[1, 1000000000]"], "bench.batches=[1, 1000000000]"
    ),
    "image_size_the_model_shrinks_to_nothing": (
        ["run", "train"], ["--set", "data.image_size=8"], "data.image_size=8: model.name=vgg"
    ),
    "model_without_batchnorm": (
        ["run", "train"], ["--set", f"model.name={__name__}:no_batchnorm"], "has no BatchNorm"
    ),
    "model_with_every_batchnorm_frozen": (
        ["run", "train"], ["--set", f"model.name={__name__}:frozen_batchnorm"], "scale is frozen"
    ),
    "model_torch_fx_cannot_trace": (
        ["run", "train"], ["--set", f"model.name={__name__}:data_dependent"], "could not trace"
    ),
}  # fmt: skip
if not torch.cuda.is_available():
    LATE["device_cuda_without_a_gpu"] = (["run", "train"], ["--set", "train.device=cuda"], "cuda")


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if data is loaded or a model trained."""
    import pipeline.train.stage

    def forbidden(*args, **kwargs):
        raise AssertionError("work began before the bad value was refused")

    monkeypatch.setattr(pipeline.train.stage, "load_data", forbidden)
    monkeypatch.setattr(pipeline.train.stage, "build_and_train", forbidden)


CASES = [(case, command) for case, (commands, _, _) in sorted(LATE.items()) for command in commands]


@pytest.mark.parametrize(("case", "command"), CASES)
def test_a_value_that_fails_late_is_refused_first(case, command, tmp_path, capsys, no_work):
    _, extra, fragment = LATE[case]
    argv = [command, "-c", "configs/demo.yaml", *SMALL, *extra, "--out", str(tmp_path / "o")]
    assert_refused(tmp_path, capsys, argv, fragment)


def test_the_reported_batch_is_refused_where_memory_is_short(
    tmp_path, capsys, no_work, monkeypatch
):
    """The report's --set bench.batches=[1000000], on a machine with 8 GiB free."""
    monkeypatch.setattr(preflight, "available_memory", lambda: 8 * 2**30)
    argv = ["run", "-c", "configs/demo.yaml", *SMALL, "--set", "bench.batches=[1000000]",
            "--out", str(tmp_path / "o")]  # fmt: skip
    err = assert_refused(tmp_path, capsys, argv, "bench.batches=[1000000]: batch 1000000 needs")
    assert "this machine's memory has 8 GiB free" in err and "--set bench.batches=" in err


@pytest.mark.parametrize("factory", ["no_batchnorm", "frozen_batchnorm"])
def test_a_model_without_batchnorm_gets_command_line_advice(factory, tmp_path, capsys, no_work):
    """It used to say "pass convert=True or convert with pipeline.train.convert first"; a
    model whose BNs are all frozen reached the same Python-API advice."""
    argv = ["run", *SMALL, "--set", f"model.name={__name__}:{factory}", "--out",
            str(tmp_path / "o")]  # fmt: skip
    err = assert_refused(tmp_path, capsys, argv, "--set model.name=resnet20")
    assert "convert" not in err


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(st.integers(1, 10**7), min_size=1, max_size=4).map(tuple),
    peak=st.integers(1, 10**7),
    free=st.integers(1, 2**40),
)
def test_bench_batches_are_refused_exactly_when_the_floor_exceeds_free_memory(batches, peak, free):
    """Never a batch that fits: refused iff the largest batch times the per-sample floor is
    more than the free memory."""
    import unittest.mock

    with unittest.mock.patch.object(preflight, "_device_memory", lambda: [("memory", free)]):
        try:
            preflight.check_bench_batches(batches, peak)
            refused = False
        except ConfigError as err:
            refused = True
            assert f"batch {max(batches)} needs" in str(err)
            # the advised example differs from the value refused, and passes this same check;
            # where not even one sample fits, no batches are advised
            advice = re.search(r"--set bench.batches=\[([0-9,]+)\]", str(err))
            assert (advice is None) == (peak > free), str(err)
            if advice is not None:
                example = tuple(int(b) for b in advice.group(1).split(","))
                assert example != tuple(sorted(set(batches))), str(err)
                preflight.check_bench_batches(example, peak)
    assert refused == (max(batches) * peak > free)


def test_the_gpu_memory_bounds_the_batches_too(monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda: 2**40)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (2**30, 2**34))
    with pytest.raises(ConfigError, match="the GPU's memory has 1 GiB free"):
        preflight.check_bench_batches((1, 4096), 2**20)


@settings(max_examples=25, deadline=None)
@given(
    width=st.sampled_from([0.125, 0.25]),
    size=st.sampled_from([16, 24, 32]),
    batch=st.integers(1, 9),
)
def test_the_per_sample_floor_is_one_layer_s_input_and_output(width, size, batch):
    """The floor scales with the batch and is what a real forward's largest layer holds."""
    from pipeline.models.zoo import VGG

    model = VGG(11, 10, 1, width).eval()
    one = preflight.layer_peak_bytes(model, torch.randn(1, 1, size, size))
    many = preflight.layer_peak_bytes(model, torch.randn(batch, 1, size, size))
    first_conv = max(1, round(64 * width)) * size * size * 4  # its output, the widest map
    assert many == batch * one and one >= first_conv + size * size * 4
