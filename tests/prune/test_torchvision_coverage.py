"""Every torchvision classifier with BatchNorm prunes exactly and still exports to ONNX.

For each model: build it untrained, randomise every BN's scale and shift, calibrate its running
statistics on random data (``tests/sensitivity.py``; made-up statistics left mobile nets blind to
their input, so any error passed), trace the channel graph, drop half of the prunable groups at
random, recalibrate the masked model, and check (1) the model pruned from it equals it, in
float64, to ``PRUNE_TOL`` and (2) ONNX Runtime equals PyTorch on the pruned model, in float32,
to ``ONNX_TOL`` or to twice PyTorch's own float32 error against float64, whichever is larger;
both relative to max |output|. The second bound is for the deep random models (efficientnet
b5-b7, v2_m, v2_l) whose calibrated BNs amplify rounding: there PyTorch in float32 is itself
1e-3 away from the exact answer, and ONNX Runtime no further. Each check proves it could fail:
a 1% change of one kept channel (median over live ones) in the first, middle and last third of
the masked model must move its output by more than ``PRUNE_TOL``, and losing one kept channel
(the mistake a pruner or exporter makes) in the first and middle thirds by more than the ONNX
bound.
A fast subset spanning every family runs by default; the rest are
``pytest.mark.slow`` (``make test-slow``). ``benchmarks/coverage_table.py`` runs the same
:func:`check_model` over all of them and writes ``docs/torchvision_coverage.md``.

Each model also goes through the command line untrained, as a new user runs it
(``cli_coverage.cli_untrained``: ``recede prune --scope layer``, then ``recede export``): both
exit 0, or one refuses with exit 2 saying why; never exit 1 and never a traceback (issue 33).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import sensitivity as sensitivity_module
import torch
import torchvision
from cli_coverage import CliResult, cli_untrained  # noqa: F401 (the table reads CliResult)
from sensitivity import calibrate_bn_, channel_sensitivity, randomise_affine_
from torch import nn

from pipeline.core.numerics import rel_err
from pipeline.graph.channel_graph import ChannelGraph, build_channel_graph
from pipeline.prune.stage import SelectionRules, apply_plan_, make_plan, select_groups, zero_groups_

PRUNE_TOL = 1e-9  # pruned vs masked, compared in float64 (errors 1e-15..1e-13)
ONNX_TOL = 1e-4  # ONNX Runtime vs PyTorch in float32 (errors up to 6.5e-5 of the output scale)
NOISE_FACTOR = 2.0  # ONNX Runtime may be as far from float64 as PyTorch's float32: twice apart
RATIO = 0.5
DEFAULT_SIZE = 64
# The smallest input each model accepts. VGG needs 224 only for ONNX: the TorchScript exporter
# supports adaptive_avg_pool2d only when the output size (7) divides the input size.
INPUT_SIZE = {
    "inception_v3": 75,
    "maxvit_t": 224,
    **dict.fromkeys(("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"), 224),
}
BN_MODELS = (
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "efficientnet_v2_l",
    "efficientnet_v2_m",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mnasnet0_75",
    "mnasnet1_0",
    "mnasnet1_3",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "regnet_x_16gf",
    "regnet_x_1_6gf",
    "regnet_x_32gf",
    "regnet_x_3_2gf",
    "regnet_x_400mf",
    "regnet_x_800mf",
    "regnet_x_8gf",
    "regnet_y_128gf",
    "regnet_y_16gf",
    "regnet_y_1_6gf",
    "regnet_y_32gf",
    "regnet_y_3_2gf",
    "regnet_y_400mf",
    "regnet_y_800mf",
    "regnet_y_8gf",
    "resnet101",
    "resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "wide_resnet101_2",
    "wide_resnet50_2",
)
NO_BN_MODELS = (
    "alexnet",
    "convnext_base",
    "convnext_large",
    "convnext_small",
    "convnext_tiny",
    "squeezenet1_0",
    "squeezenet1_1",
    "swin_b",
    "swin_s",
    "swin_t",
    "swin_v2_b",
    "swin_v2_s",
    "swin_v2_t",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "vit_b_16",
    "vit_b_32",
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
)
# One or two per family, chosen by measured time (see docs/torchvision_coverage.md).
FAST = frozenset(
    {
        "resnet18",
        "resnext50_32x4d",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "shufflenet_v2_x0_5",
        "densenet121",
        "googlenet",
        "inception_v3",
        "regnet_x_400mf",
        "regnet_y_400mf",
        "mnasnet0_5",
    }
)


@dataclass(frozen=True)
class CoverageResult:
    """What :func:`check_model` measured for one model."""

    model: str
    input_size: int
    params_before: int
    params_after: int
    groups: int
    prunable: int
    dropped: int
    barriers: int
    prune_rel_err: float
    onnx_rel_err: float
    seconds: float
    sensitivity: tuple[float, float, float]  # output change from a 1% channel change, per third
    loss_sensitivity: tuple[float, float, float]  # ... from losing one channel, per third
    fp32_noise: float  # PyTorch float32 vs float64 on the ONNX check's batches

    def onnx_tolerance(self) -> float:
        """``ONNX_TOL``, or ``NOISE_FACTOR`` times PyTorch's own float32 error if larger."""
        return max(ONNX_TOL, NOISE_FACTOR * self.fp32_noise)

    def failures(self) -> list[str]:
        """The test's assertions that this result breaks (empty: it passes)."""
        tol = self.onnx_tolerance()
        checks = {
            "drops too few groups": self.dropped >= 0.4 * self.prunable > 0,
            "removes no parameter": self.params_after < self.params_before,
            "a 1% channel change is below PRUNE_TOL": min(self.sensitivity) > PRUNE_TOL,
            "a lost channel is below the ONNX bound": min(self.loss_sensitivity[:2]) > tol,
            "pruned differs from masked": self.prune_rel_err <= PRUNE_TOL,
            "ONNX differs from PyTorch": self.onnx_rel_err <= tol,
        }
        return [what for what, ok in checks.items() if not ok]


def build_untrained(name: str) -> nn.Module:
    """The torchvision model in eval mode, skipping the slow init where the builder allows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception warn about the init default
        try:
            model = torchvision.models.get_model(name, init_weights=False)
        except TypeError as err:
            if "init_weights" not in str(err):
                raise
            model = torchvision.models.get_model(name)
    return model.eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return rel_err(got, want, floor=1e-30)


def onnx_rel_err(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[float, float]:
    """Export with recede's exporter; (ONNX Runtime vs PyTorch, PyTorch float32 vs float64).

    Both relative to the output scale, as maxima over the batches ``verify_onnx`` runs (the
    example and, the batch axis being dynamic, one sample more): dividing by the example's scale
    alone once made efficientnet_b1 fail at 1.9e-3, when its extra sample's output was 50 times
    larger (true error 3.9e-5).
    """
    from pipeline.export.onnx import export_onnx, verify_onnx

    export_onnx(model, example, path)
    onnx_err = verify_onnx(path, model, example, atol=0.0).max_rel_err
    batches = [example, torch.cat([example, example[:1].flip(-1)])]  # as verify_onnx runs them
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        pairs = [(model(b).double(), exact(b.double())) for b in batches]
    noise = max(float((a - e).abs().max()) for a, e in pairs)
    return onnx_err, noise / max(float(e.abs().max()) for _, e in pairs)


def prepared(name: str, gen: torch.Generator) -> tuple[nn.Module, int]:
    """The untrained model with random BN affine terms and calibrated statistics, and its size."""
    model = randomise_affine_(build_untrained(name), gen)
    size = INPUT_SIZE.get(name, DEFAULT_SIZE)
    return calibrate_bn_(model, (8, 3, size, size), gen), size


def _removed(graph: ChannelGraph, dropped: set[int]) -> frozenset[tuple[str, int]]:
    return frozenset(bc for g in graph.groups if g.id in dropped for bc in g.bn_channels)


def check_model(name: str, workdir: Path, seed: int = 0) -> CoverageResult:
    """Prune half of ``name``'s prunable groups at random; measure pruned-vs-masked and ONNX."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, size = prepared(name, gen)
    x = torch.randn(4, 3, size, size, generator=gen)  # the graph traces x[:1]
    graph = build_channel_graph(model, x)
    params_before = _params(model)
    importance = {g.id: float(torch.rand((), generator=gen)) for g in graph.prunable_groups}
    dropped = select_groups(importance, graph, ratio=RATIO, rules=SelectionRules(min_channels=1))
    # recalibrated once masked, so the kept channels still matter; pruned from the masked model
    masked = calibrate_bn_(
        zero_groups_(model, graph, dropped, shifts=dropped), (8, 3, size, size), gen
    )
    pruned = apply_plan_(copy.deepcopy(masked), make_plan(graph, dropped))
    sensitivity = channel_sensitivity(masked, x[:2], _removed(graph, dropped))
    with mock.patch.object(sensitivity_module, "PERTURBATION", -1.0):  # the channel is lost
        loss_sensitivity = channel_sensitivity(masked, x[:2], _removed(graph, dropped))
    with torch.no_grad():  # in float64, so rounding (1e-5 in fp32) cannot hide a wrong channel
        prune_err = _rel_err(pruned.double()(x.double()), masked.double()(x.double()))
    del masked, model
    pruned.float()
    example = torch.randn(2, 3, size, size, generator=gen)  # batch 2: nothing size-1 baked in
    onnx_err, noise = onnx_rel_err(pruned, example, workdir / f"{name}.onnx")
    (workdir / f"{name}.onnx").unlink()
    return CoverageResult(
        name,
        size,
        params_before,
        _params(pruned),
        len(graph.groups),
        len(graph.prunable_groups),
        len(dropped),
        len(graph.barriers),
        prune_err,
        onnx_err,
        time.perf_counter() - start,
        sensitivity,
        loss_sensitivity,
        noise,
    )


@contextlib.contextmanager
def _no_init():
    """Skip weight initialisation (``torch.nn.init``) while building models for their shapes."""
    with contextlib.ExitStack() as stack:
        for fn in [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]:
            stack.enter_context(mock.patch.object(nn.init, fn, lambda t, *a, **k: t))
        yield


def has_batchnorm(name: str) -> bool:
    """Whether the model holds an ``nn.BatchNorm2d``, without initialising its weights."""
    try:
        with torch.device("meta"):
            model = build_untrained(name)
    except NotImplementedError:  # regnet computes its widths with tensors
        with _no_init():
            model = build_untrained(name)
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_model_lists_cover_torchvision() -> None:
    """A new torchvision classifier must be sorted into BN_MODELS or NO_BN_MODELS."""
    listed = set(torchvision.models.list_models(module=torchvision.models))
    assert len(BN_MODELS) == 58
    assert not set(BN_MODELS) & set(NO_BN_MODELS)
    unsorted = listed - set(BN_MODELS) - set(NO_BN_MODELS)
    assert not unsorted, f"new torchvision models {sorted(unsorted)}: add them to a list above"
    assert set(BN_MODELS) | set(NO_BN_MODELS) == listed
    assert set(BN_MODELS) >= FAST


@pytest.mark.slow
def test_bn_models_are_exactly_those_with_batchnorm() -> None:
    names = torchvision.models.list_models(module=torchvision.models)
    assert tuple(n for n in names if has_batchnorm(n)) == BN_MODELS


@pytest.fixture
def fair_share_of_threads() -> Iterator[None]:
    """One worker's share of the cores: oversubscribed OpenMP spins and runs several times slower."""
    threads = torch.get_num_threads()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    yield
    torch.set_num_threads(threads)


# Measured misses (docs/torchvision_coverage.md), strict xfail so that a fix shows. Both are
# random models too ill-conditioned for a float32 check: recalibrated after masking, their BNs
# amplify rounding layer after layer.
KNOWN_MISSES = {
    "efficientnet_b7": "ONNX Runtime 8.1e-3 from PyTorch, whose own float32 error is 1.5e-3",
    "efficientnet_v2_l": "PyTorch's own float32 error is 0.2 of the output: nothing verifiable",
}


def _marks(name: str) -> tuple:
    miss = KNOWN_MISSES.get(name)
    return (() if name in FAST else (pytest.mark.slow,)) + (
        (pytest.mark.xfail(reason=miss, strict=True),) if miss else ()
    )


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in BN_MODELS])
@pytest.mark.usefixtures("fair_share_of_threads")
def test_prunes_exactly_and_exports_to_onnx(name: str, tmp_path: Path) -> None:
    result = check_model(name, tmp_path)
    assert not result.failures(), (result.failures(), result)


# Reported (issue 33): googlenet exited 1 `insensitive` on its fold check, which was not run on
# the calibrated twin its ONNX check used. The rest of the zoo runs under -m slow and in the table.
CLI_FAST = frozenset({"googlenet"})


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in CLI_FAST else pytest.mark.slow) for n in BN_MODELS]
)
@pytest.mark.usefixtures("fair_share_of_threads")
def test_untrained_model_prunes_and_exports_through_the_cli(name: str, tmp_path: Path) -> None:
    result = cli_untrained(f"torchvision:{name}", INPUT_SIZE.get(name, DEFAULT_SIZE), tmp_path)
    assert result.ok(), result.cell()
