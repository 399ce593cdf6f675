"""One verification policy for every check, over random small CNNs (issue 31 items 10 and 11,
issue 32 item 13, issue 33 item 3).

The models are ``tests/prune/test_prune_property.py``'s random CNNs (residual adds, concats,
depthwise and grouped convs, SE gates, channel shuffles, pools, linear and MLP heads), in two
states: **calibrated** (BN statistics of a random batch, as a trained net's respond to its
input) and **untrained** (BN statistics at their initial values and convs drawn at 1e-2, as
googlenet's and inception's initialisers do: their outputs barely depend on the input, so each
check is decided on the calibrated twin). For each check (removal, fold, ONNX, fp16 ONNX):

- the correct transform is ``ok`` or ``twin-ok``;
- the transform with its stem conv scaled by ``1 + d`` is ``failed`` (or raises the check's
  ``VerificationError``), never ``insensitive``. ``d`` is chosen from the bound of the check
  that decides (the model's own, or its twin's): the amount that moves that check's reference
  output by 4x its bound. The perturbation is made inside the transform, so the twin's
  transform is wrong in the same way.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("onnxruntime")

import pipeline.export.onnx as onnx_export  # noqa: E402
import pipeline.fold.batchnorm as batchnorm  # noqa: E402
import pipeline.prune.remove as remove  # noqa: E402
from pipeline.config import PruneConfig  # noqa: E402
from pipeline.core.checks import Check, VerificationError, calibrated_twin  # noqa: E402
from pipeline.export.verify import export_checked  # noqa: E402
from pipeline.fold.batchnorm import fold_bn  # noqa: E402
from pipeline.prune.stage import prune_model, zero_groups_  # noqa: E402


def _random_cnns():
    """``build_model`` and the ``cases`` strategy of the pruning property test (one builder)."""
    path = Path(__file__).resolve().parents[1] / "prune" / "test_prune_property.py"
    spec = importlib.util.spec_from_file_location("random_cnns", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


RANDOM = _random_cnns()
STEM = "0.0"  # the first conv of every random CNN, and of its pruned and folded copies
BN = nn.modules.batchnorm._BatchNorm


def _model(case: dict, state: str) -> tuple[nn.Module, torch.Tensor]:
    """The drawn CNN in ``state`` (calibrated or untrained) and a verification batch of 4."""
    model = RANDOM.build_model(
        case["specs"], case["head"], case["width"], case["size"], case["seed"]
    )
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(4, 3, case["size"], case["size"], generator=gen)
    if state == "calibrated":
        return calibrated_twin(model, torch.randn(8, *x.shape[1:], generator=gen)), x
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN):
                m.reset_running_stats()
            elif isinstance(m, nn.Conv2d):
                m.weight.mul_(1e-2)
    return model, x


def _scale_stem_(model: nn.Module, delta: float) -> nn.Module:
    with torch.no_grad():
        model.get_submodule(STEM).weight.mul_(1 + delta)
    return model


@torch.no_grad()
def _delta(reference: nn.Module, x: torch.Tensor, bound: float) -> float:
    """The stem scaling that moves ``reference``'s output (float64) by about 4x ``bound``."""
    ref = reference.double()
    want = ref(x.double())
    delta = 1e-3
    for _ in range(3):  # the output is piecewise linear in delta: two corrections suffice
        moved = float((_scale_stem_(copy.deepcopy(ref), delta)(x.double()) - want).abs().max())
        if moved == 0:
            return 0.0
        delta *= 4 * bound / moved
    moved = float((_scale_stem_(copy.deepcopy(ref), delta)(x.double()) - want).abs().max())
    return delta if moved > 2 * bound else 0.0


def _deciding(
    check: Check, model: nn.Module, x: torch.Tensor, seen: Counter
) -> tuple[nn.Module, float]:
    """The model whose check decided the verdict (the model, or its twin) and its bound.

    A correct transform is ``ok`` or ``twin-ok``, unless the model is blind by nature: a random
    CNN whose calibrated output does not depend on its input (dead ReLUs, a saturated gate) is
    honestly ``insensitive``; such draws are skipped and counted.
    """
    seen[check.verdict] += 1
    assume(check.verdict != "insensitive")
    assert check.passed, check.line()
    if check.verdict == "twin-ok":
        return calibrated_twin(model, x), check.twin["bound"]
    return model, check.bound


@contextlib.contextmanager
def _wrong(target, name: str, delta: float) -> Iterator[None]:
    """``target.name`` (a transform) that also scales the stem of the model it returns or writes."""
    real = getattr(target, name)

    def transform(model: nn.Module, *args, **kwargs):
        if target is onnx_export:  # export_onnx(model, ...): export a wrong copy
            return real(_scale_stem_(copy.deepcopy(model), delta), *args, **kwargs)
        result = real(model, *args, **kwargs)
        _scale_stem_(result if isinstance(result, nn.Module) else model, delta)
        return result

    with mock.patch.object(target, name, transform):
        yield


def _failed(run: Callable[[], Check | None]) -> bool:
    """Whether the wrong transform is reported ``failed``; an insensitive verdict is a bug."""
    try:
        check = run()
    except VerificationError:
        return True
    assert check is not None
    assert check.verdict != "insensitive", (
        f"a failed comparison reported insensitive: {check.line()}"
    )
    return check.verdict == "failed"


def _property(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,  # fixed draws: the property is a statement about these transforms
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each draw exports models
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def _exercised(seen: Counter) -> None:
    """Both verdicts were reached, blind models were a minority of the draws, and most draws
    had their wrong transform judged."""
    verdicts = seen["ok"] + seen["twin-ok"] + seen["insensitive"]
    assert seen["ok"] > 0 and seen["twin-ok"] > 0, seen
    assert seen["insensitive"] <= 0.3 * verdicts and seen["caught"] >= 0.6 * verdicts, seen


STATES = st.sampled_from(["calibrated", "untrained"])
CONFIG = PruneConfig(threshold="ratio", ratio=0.5, scope="layer", min_channels=1)


def test_removal_check() -> None:
    seen: Counter[str] = Counter()

    @given(case=RANDOM.cases(), state=STATES)
    @_property(24)
    def check_one(case: dict, state: str) -> None:
        model, x = _model(case, state)
        result = prune_model(model, x, CONFIG)
        check = result.removal.check
        deciding, bound = _deciding(check, model, x, seen)
        by_id = {g.id: g for g in result.graph.groups}
        dropped = set(result.plan.dropped_groups)
        approximate = {g for g in dropped if not by_id[g].absorbable}
        reference = zero_groups_(copy.deepcopy(deciding), result.graph, dropped, shifts=approximate)
        delta = _delta(reference, x, bound)
        assume(delta > 0)  # a dead stem (every kept channel zeroed by the cut) cannot be perturbed
        note(f"{check.verdict}, stem scaled by 1 + {delta:.2e}")
        with _wrong(remove, "apply_plan_", delta):
            assert _failed(lambda: prune_model(model, x, CONFIG).removal.check)
            seen["caught"] += 1

    check_one()
    _exercised(seen)


def test_fold_check() -> None:
    seen: Counter[str] = Counter()

    @given(case=RANDOM.cases(), state=STATES)
    @_property(24)
    def check_one(case: dict, state: str) -> None:
        model, x = _model(case, state)
        check = fold_bn(model, x)[1].check
        deciding, bound = _deciding(check, model, x, seen)
        delta = _delta(copy.deepcopy(deciding), x, bound)
        assume(delta > 0)
        note(f"{check.verdict}, stem scaled by 1 + {delta:.2e}")
        with _wrong(batchnorm, "fold_bn_", delta):
            assert _failed(lambda: fold_bn(model, x)[1].check)
            seen["caught"] += 1

    check_one()
    _exercised(seen)


@pytest.mark.parametrize("half", [False, True], ids=["onnx", "onnx-fp16"])
def test_export_check(half: bool) -> None:
    seen: Counter[str] = Counter()

    @given(case=RANDOM.cases(), state=STATES)
    @_property(8)
    def check_one(case: dict, state: str) -> None:
        model, x = _model(case, state)
        folded = fold_bn(model, x)[0]
        with tempfile.TemporaryDirectory() as tmp:

            def export() -> Check:
                path = Path(tmp, "m.onnx")
                return export_checked(
                    folded, model, x, path, opset=17, what="onnx", half=half, simplify=False
                )

            try:
                check = export()
            except torch.onnx.errors.OnnxExporterError:  # e.g. an adaptive pool of odd size
                seen["not exportable"] += 1
                assume(False)
            deciding, bound = _deciding(check, model, x, seen)
            delta = _delta(copy.deepcopy(deciding), x, bound)
            assume(delta > 0)
            note(f"{check.verdict}, stem scaled by 1 + {delta:.2e}")
            with _wrong(onnx_export, "export_onnx", delta):
                assert _failed(export)
                seen["caught"] += 1

    check_one()
    _exercised(seen)
