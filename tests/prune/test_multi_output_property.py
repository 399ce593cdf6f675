"""Models with several outputs through removal, folding, ONNX export and ONNX Runtime verification.

The class: any model returning a tree of tensors (tuple, list, dict, namedtuple, nested) from a
shared trunk, with or without an FPN-like top-down path (upsample-and-add), with heads on any
level. Before outputs were trees, ``remove_groups`` crashed on them
(``'tuple' object has no attribute 'numpy'``). Each check is also shown to fail on a model whose
one output is perturbed, and to name that output.
"""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from pipeline.config import PruneConfig
from pipeline.core.outputs import flatten, structure
from pipeline.export.onnx import export_onnx, verify_onnx
from pipeline.fold import batchnorm
from pipeline.fold.batchnorm import FoldError, fold_bn
from pipeline.prune import remove
from pipeline.prune.remove import ExactnessError
from pipeline.prune.stage import prune_model
from tests.core.multi_output_models import RETURNS, Arch, build

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@st.composite
def archs(draw) -> Arch:
    levels = draw(st.integers(1, 3))
    widths = tuple(draw(st.sampled_from((6, 8, 12, 16))) for _ in range(levels))
    heads = tuple(
        (draw(st.integers(0, levels - 1)), draw(st.integers(1, 5)))
        for _ in range(draw(st.integers(1, 3)))
    )
    kinds = RETURNS if len(heads) > 1 else tuple(r for r in RETURNS if r != "namedtuple")
    return Arch(
        widths, draw(st.sampled_from((0, 8))), heads, draw(st.sampled_from(kinds)),
        draw(st.integers(0, 99)),
    )  # fmt: skip


class Perturbed(torch.nn.Module):
    """``model`` with one output moved by its own scale: what a wrong transform of that head
    would give."""

    def __init__(self, model: torch.nn.Module, leaf: str) -> None:
        super().__init__()
        self.model, self.leaf = model, leaf

    def forward(self, x):
        out = self.model(x)
        leaf = flatten(out)[self.leaf]
        leaf.add_(leaf.abs().amax() + 1.0)  # in place: the tree keeps its structure
        return out


def _perturb_head_(model: torch.nn.Module, head: int) -> torch.nn.Module:
    with torch.no_grad():
        model.get_submodule(f"heads.{head}.1").bias.add_(1.0)
    return model


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(arch=archs(), pick=st.integers(0, 2))
def test_every_output_is_removed_folded_exported_and_verified(arch, pick, tmp_path_factory):
    model = build(arch)
    note(repr(arch))
    leaves = flatten(model(X))
    pruned = prune_model(model, X, PruneConfig(threshold="ratio", ratio=0.3, scope="layer"))
    assert pruned.removal.check.verdict == "ok", pruned.removal.check.line()
    assert pruned.removal.max_rel_err <= 1e-6
    with torch.no_grad():
        after = pruned.model(X)
    assert structure(after) == structure(model(X))  # same tree, same names
    folded, fold = fold_bn(pruned.model, X)
    assert fold.check.verdict == "ok", fold.check.line()
    several = len(leaves) > 1  # one output: the check it always was, with no output name
    assert set(fold.check.outputs or ()) == (set(leaves) if several else set())
    path = export_onnx(folded, X[:2], tmp_path_factory.mktemp("onnx") / "m.onnx")
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == list(leaves)
    assert all(o.type.tensor_type.shape.dim[0].dim_param == "batch" for o in graph.output)
    check = verify_onnx(path, pruned.model, X)
    assert check.verdict == "ok", check.line()

    # The same checks on a model with one output moved fail, naming that output.
    head = pick % len(arch.heads)
    leaf = model.head_leaves()[head]
    if not leaf:  # this head's tensor is not returned
        return
    wrong = verify_onnx(path, Perturbed(copy.deepcopy(pruned.model), leaf), X)
    assert wrong.verdict == "failed"
    assert wrong.output == (leaf if several else ""), wrong.line()


def _patched(monkeypatch, module, name: str, head: int) -> None:
    original = getattr(module, name)

    def wrong(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        _perturb_head_(model, head)
        return result

    monkeypatch.setattr(module, name, wrong)


@pytest.mark.parametrize("returns", ["dict", "nested", "tuple"])
def test_a_wrong_removal_or_fold_of_one_head_fails_naming_its_output(monkeypatch, returns):
    arch = Arch(heads=((0, 4), (1, 2), (2, 3)), returns=returns)
    model = build(arch)
    leaf = model.head_leaves()[1]
    with monkeypatch.context() as m:
        _patched(m, remove, "apply_plan_", 1)
        with pytest.raises(ExactnessError, match=f"output '{leaf}'"):
            prune_model(model, X, PruneConfig(threshold="ratio", ratio=0.3, scope="layer"))
    with monkeypatch.context() as m:
        _patched(m, batchnorm, "fold_bn_", 1)
        with pytest.raises(FoldError, match=f"output '{leaf}'"):
            fold_bn(model, X)
