"""timm's BatchNorm CNN families prune at 50% and export to verified ONNX, beside Torch-Pruning.

For each model: build it untrained (``timm.create_model(name, pretrained=False)``), randomise
every BN's scale and shift and calibrate its statistics on random data (``tests/sensitivity.py``,
so the check can see a wrong channel), then

- recede: ``prune_model`` with ``PruneConfig(threshold="ratio", ratio=0.5, scope="layer",
  allow_approximate=True)`` (what ``recede prune --ratio 0.5 --scope layer --allow-approximate``
  runs; the opt-in zeroes the random shifts that gates read, see ``prune.allow_approximate``;
  every layer loses half its channel groups, Torch-Pruning's default uniform ratio; the BN importances of an untrained model are
  random, so a global ranking of them would decide nothing), ``fold_bn``, ``export_onnx``, and
  ONNX Runtime on the folded export against the unfolded pruned model in PyTorch;
- Torch-Pruning 1.6.1: ``MagnitudePruner`` (L2 magnitude, ``pruning_ratio=0.5``, the last linear
  ignored), ``torch.onnx.export`` (TorchScript exporter, opset 17), ONNX Runtime parity.

Errors are relative to the output scale: ``max |a - b| / max |reference|`` (an untrained
inception gives logits of order 1e10, where any absolute tolerance is meaningless) and must be
at most ``ONNX_TOL``. The check proves it can fail: losing one kept channel (its BN output
zeroed: the mistake a pruner makes when it drops or swaps the wrong channel; median over the
live ones of ten channels) in the first and middle third of the pruned model must move its
output by more than ``ONNX_TOL``. Smaller changes are too small for random deep nets: a 10%
change of one channel moved untrained regnetz_b16, efficientnetv2_rw_t and tinynet_a by only
1e-5 to 5e-5 of their output. Layer scales are drawn like BN scales (timm starts them at 1e-5,
which makes a block nearly the identity). A representative handful runs by default; every
family runs under ``pytest -m slow`` and ``python benchmarks/coverage_table.py --timm`` writes
the table.

Each model also goes through the command line untrained, as a new user runs it
(``cli_coverage.cli_untrained``: ``recede prune --scope layer``, then ``recede export``): both
exit 0, or one refuses with exit 2 saying why; never exit 1 and never a traceback (issue 33).
"""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import sensitivity
import torch
from cli_coverage import CliResult, cli_untrained  # noqa: F401 (the table reads CliResult)
from sensitivity import calibrate_bn_, channel_sensitivity, randomise_affine_
from torch import nn

timm = pytest.importorskip("timm")

ONNX_TOL = 1e-4  # relative to max |output|, float32
RATIO = 0.5
MIN_PARAMS_REMOVED = 0.30  # the goal: at least 30% of the parameters go
PERTURBATION = -1.0  # the channel is lost: scaled by 1 + PERTURBATION = 0
DEFAULT_SIZE = 64
# One small model per family of timm's BatchNorm CNNs (timm.list_models, 1.0.31).
FAMILIES = {
    "resnet": "resnet18",
    "resnet-d / SE": "seresnext26d_32x4d",
    "resnetv2 (pre-act)": "resnetv2_50",
    "efficientnet": "efficientnet_b0",
    "efficientnetv2": "efficientnetv2_rw_t",
    "mobilenetv2": "mobilenetv2_100",
    "mobilenetv3": "mobilenetv3_large_100",
    "mobilenetv4": "mobilenetv4_conv_small",
    "mnasnet": "mnasnet_100",
    "fbnet": "fbnetc_100",
    "mixnet": "mixnet_s",
    "tinynet": "tinynet_a",
    "lcnet": "lcnet_050",
    "hardcorenas": "hardcorenas_a",
    "regnetx": "regnetx_002",
    "regnety": "regnety_008",
    "regnetz (byobnet)": "regnetz_b16",
    "repvgg (byobnet)": "repvgg_a0",
    "mobileone (byobnet)": "mobileone_s0",
    "gernet (byobnet)": "gernet_s",
    "efficientvit (mit)": "efficientvit_b0",
    "vgg": "vgg11_bn",
    "inception_v3": "inception_v3",
    "densenet": "densenet121",
    "dla": "dla34",
    "dpn": "dpn68",
    "cspnet": "cspresnet50",
    "cspdarknet": "cspdarknet53",
    "cs3darknet": "cs3darknet_s",
    "darknet": "darknet53",
    "ghostnet": "ghostnet_100",
    "ghostnetv2": "ghostnetv2_100",
    "repghost": "repghostnet_050",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42b",
    "vovnet": "ese_vovnet19b_dw",
    "res2net": "res2net50_26w_4s",
    "resnest": "resnest14d",
    "sknet": "skresnet18",
    "xception": "xception41",
    "legacy senet": "legacy_seresnet18",
    "hrnet": "hrnet_w18_small",
    "inception_v4": "inception_v4",
    "hgnet": "hgnet_tiny",
    "hgnetv2": "hgnetv2_b0",
    "repvit": "repvit_m0_9",
    "fastvit": "fastvit_t8",
    "starnet": "starnet_s1",
}
INPUT_SIZE = {"inception_v3": 75, "inception_v4": 75, "vgg11_bn": 224, "xception41": 71}
# The default handful (efficientnet_b0 runs through the CLI in test_timm_layers.py): lcnet_050
# needs weight-gated groups (its conv_head has no BN), efficientvit_b0 tracing with values,
# skresnet18 the paths axis tied by its softmax and sum.
FAST = (
    "mobilenetv3_large_100",
    "regnety_008",
    "gernet_s",
    "lcnet_050",
    "efficientvit_b0",
    "skresnet18",
)
# Goal misses measured in benchmarks/results/timm_coverage.md, marked strict xfail so that a fix
# shows; none in the last table run.
KNOWN_MISSES: dict[str, str] = {}


@dataclass
class Side:
    """One tool's result on one model; ``error`` is set when it failed."""

    params_after: int = 0
    onnx_rel_err: float = float("nan")
    seconds: float = 0.0
    error: str = ""

    def verified(self) -> bool:
        return not self.error and self.onnx_rel_err <= ONNX_TOL


@dataclass
class TimmResult:
    """recede and Torch-Pruning on one timm model."""

    model: str
    input_size: int
    params_before: int
    recede: Side
    torch_pruning: Side
    barriers: tuple[str, ...] = ()
    sensitivity: tuple[float, float, float] = (float("nan"),) * 3
    groups: tuple[int, int, int] = (0, 0, 0)  # total, prunable, dropped
    notes: list[str] = field(default_factory=list)

    def removed(self, side: Side) -> float:
        return 1.0 - side.params_after / self.params_before if side.params_after else 0.0

    def sensitive(self) -> bool:
        return min(self.sensitivity[:2]) > ONNX_TOL

    def passes(self) -> bool:
        """Goal: >= 30% of the parameters removed, ONNX verified, and the check could fail."""
        ok = self.recede.verified() and self.sensitive()
        return ok and self.removed(self.recede) >= MIN_PARAMS_REMOVED


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    from pipeline.core.numerics import rel_err

    return rel_err(got, want, floor=1e-30)


def randomise_layer_scales_(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Draw timm's layer scales (``LayerScale``, ``LayerScale2d``) like BN scales.

    timm initialises them at 1e-5 (FastViT and other ViT-style CNN blocks), which makes every
    block nearly the identity: losing a whole channel inside one moved untrained ``fastvit_t8``
    by 3e-6 of its output, so no check could see an error there. Trained layer scales are not
    that small.
    """
    with torch.no_grad():
        for m in model.modules():
            gamma = getattr(m, "gamma", None)
            if "LayerScale" in type(m).__name__ and isinstance(gamma, nn.Parameter):
                sign = torch.where(torch.rand(gamma.shape, generator=gen) < 0.5, -1.0, 1.0)
                gamma.copy_(sign * (torch.rand(gamma.shape, generator=gen) + 0.5))
    return model


def prepared(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Untrained ``name`` with random BN affine and layer scales, calibrated BN statistics, and
    a batch of 2."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    size = INPUT_SIZE.get(name, DEFAULT_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False).eval()
    model = randomise_layer_scales_(randomise_affine_(model, gen), gen)
    model = calibrate_bn_(model, (8, 3, size, size), gen)
    return model, torch.randn(2, 3, size, size, generator=gen)


def _ort_rel_err(path: Path, reference: nn.Module, x: torch.Tensor) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    with torch.no_grad():
        want = reference(x)
    return _rel_err(torch.from_numpy(session.run(None, feed)[0]), want)


def run_recede(model: nn.Module, x: torch.Tensor, workdir: Path) -> tuple[Side, object]:
    """recede prune at 50%, fold, export; ONNX Runtime vs the pruned model in PyTorch."""
    from pipeline.config import PruneConfig
    from pipeline.export.onnx import export_onnx
    from pipeline.fold.batchnorm import fold_bn
    from pipeline.prune.stage import prune_model

    start = time.perf_counter()
    # the randomised shifts behind SE/SK gates cannot be absorbed: this checks removal and
    # export mechanics, so it opts in to zeroing them (a trained model would not need to)
    cfg = PruneConfig(threshold="ratio", ratio=RATIO, scope="layer", allow_approximate=True)
    pruned = prune_model(model, x, cfg)
    folded, _ = fold_bn(pruned.model, x)
    path = export_onnx(folded, x, workdir / "recede.onnx")
    err = _ort_rel_err(path, pruned.model, x)
    path.unlink()
    side = Side(_params(pruned.model), err, time.perf_counter() - start)
    return side, pruned


TP_TIMEOUT_S = 300  # Torch-Pruning ran for over 10 minutes on rexnet_100 without finishing


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (no limit off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):  # noqa: ANN001, ARG001
        raise TimeoutError(f"did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_torch_pruning(model: nn.Module, x: torch.Tensor, workdir: Path) -> Side:
    """Torch-Pruning 1.6 MagnitudePruner at 50%, torch.onnx export, ONNX Runtime parity."""
    import torch_pruning as tp

    start = time.perf_counter()
    model = copy.deepcopy(model).eval()
    try:
        with _time_limit(TP_TIMEOUT_S):
            return _torch_pruning(tp, model, x, workdir, start)
    except Exception as error:  # noqa: BLE001 - a failed baseline is a table entry
        first = (str(error).strip().splitlines() or [""])[0][:160]
        return Side(error=f"{type(error).__name__}: {first}", seconds=time.perf_counter() - start)


def _torch_pruning(tp, model: nn.Module, x: torch.Tensor, workdir: Path, start: float) -> Side:  # noqa: ANN001
    """The Torch-Pruning run itself; ``tp`` is the imported module."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(
        model,
        x[:1],
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=RATIO,
        ignored_layers=head,
    )
    pruner.step()
    with torch.no_grad():
        model(x)
    path = workdir / "tp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False)
    err = _ort_rel_err(path, model, x)
    path.unlink()
    return Side(_params(model), err, time.perf_counter() - start)


def _removed_channels(pruned) -> frozenset[tuple[str, int]]:
    dropped = set(pruned.plan.dropped_groups)
    return frozenset(bc for g in pruned.graph.groups if g.id in dropped for bc in g.bn_channels)


def check_timm(name: str, workdir: Path, *, with_torch_pruning: bool = True) -> TimmResult:
    """recede (and Torch-Pruning) on ``name``; a recede failure is recorded, not raised."""
    model, x = prepared(name)
    result = TimmResult(name, x.shape[-1], _params(model), Side(), Side(error="not run"))
    try:
        result.recede, pruned = run_recede(model, x, workdir)
        result.barriers = tuple(f"{b.op} at {b.module}" for b in pruned.graph.barriers)
        result.groups = (
            len(pruned.graph.groups),
            len(pruned.graph.prunable_groups),
            len(pruned.plan.dropped_groups),
        )
        with mock.patch.object(sensitivity, "PERTURBATION", PERTURBATION):
            result.sensitivity = channel_sensitivity(pruned.model, x)
    except Exception as error:  # noqa: BLE001 - the table reports every model
        first = (str(error).strip().splitlines() or [""])[0][:200]
        result.recede = Side(error=f"{type(error).__name__}: {first}")
    if with_torch_pruning:
        result.torch_pruning = run_torch_pruning(model, x, workdir)
    return result


def test_family_list_names_real_models() -> None:
    missing = sorted(set(FAMILIES.values()) - set(timm.list_models()))
    assert not missing, f"not in timm {timm.__version__}: {missing}"
    assert set(FAST) <= set(FAMILIES.values())


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            marks=(() if n in FAST else (pytest.mark.slow,))
            + (
                (pytest.mark.xfail(reason=KNOWN_MISSES[n], strict=True),)
                if n in KNOWN_MISSES
                else ()
            ),
        )
        for n in sorted(set(FAMILIES.values()))
    ],
)
def test_timm_model_prunes_and_exports(name: str, tmp_path: Path) -> None:
    result = check_timm(name, tmp_path, with_torch_pruning=False)
    assert not result.recede.error, result.recede.error
    assert result.sensitive(), f"losing one channel moves the output by {result.sensitivity}"
    assert result.recede.onnx_rel_err <= ONNX_TOL
    assert result.removed(result.recede) >= MIN_PARAMS_REMOVED, result.barriers


# Reported (issue 31 item 11): repvgg_a0, xception41 and efficientvit_b0 exited 1 `insensitive`
# on their fold check, which was not run on the calibrated twin their ONNX check used. A minute
# each on the 2 shared cores, so all run under -m slow and in the table; the class is covered by
# tests/fold/test_fold_twin.py, and googlenet runs by default in test_torchvision_coverage.py.
CLI_FAST: frozenset[str] = frozenset()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=() if n in CLI_FAST else pytest.mark.slow)
        for n in sorted(set(FAMILIES.values()))
    ],
)
def test_untrained_model_prunes_and_exports_through_the_cli(name: str, tmp_path: Path) -> None:
    result = cli_untrained(f"timm:{name}", INPUT_SIZE.get(name, DEFAULT_SIZE), tmp_path)
    assert result.ok(), result.cell()
