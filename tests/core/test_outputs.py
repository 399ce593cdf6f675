"""Outputs as trees (``pipeline.core.outputs``) and one verdict over several outputs
(``pipeline.core.output_checks``): names, round trips, refusals, per-output scales, the worst
output deciding and named."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.checks import judge
from pipeline.core.numerics import rel_err
from pipeline.core.output_checks import judge_outputs, judge_trees
from pipeline.core.outputs import (
    OutputError,
    as_arrays,
    batch_axes,
    flatten,
    map_leaves,
    structure,
    unflatten,
)
from pipeline.core.tolerance import Tolerance

Pair = namedtuple("Pair", ["logits", "boxes"])
TOL = Tolerance(1e-4, 0.0, "fp32")


def _tensor(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))


def trees(depth: int = 3):
    """Random trees of tensors: dicts (string keys), tuples, lists, namedtuples, None."""
    leaf = st.integers(0, 10_000).map(_tensor)
    key = st.text("abcxyz_", min_size=1, max_size=4)

    def extend(children):
        return st.one_of(
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.lists(children, min_size=1, max_size=3),
            st.dictionaries(key, children, min_size=1, max_size=3),
            st.dictionaries(key, children, min_size=1, max_size=3).map(OrderedDict),
            st.tuples(children, children).map(lambda p: Pair(*p)),
        )

    return st.recursive(st.one_of(leaf, st.none()), extend, max_leaves=8)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if a is None or b is None:
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))


@settings(max_examples=200, deadline=None)
@given(trees())
def test_unflatten_of_flatten_is_the_tree_with_its_types(tree):
    try:
        leaves = flatten(tree)
    except OutputError as err:  # no tensor at all, or two keys that join to one name
        assert "no tensor" in str(err) or "both be named" in str(err)
        return
    assert _same(unflatten(structure(tree), leaves), tree)
    assert len(set(leaves)) == len(leaves)
    assert all(isinstance(t, torch.Tensor) for t in leaves.values())


def test_leaf_names_are_paths():
    t = torch.zeros(2, 1)
    assert list(flatten(t)) == ["output"]
    assert list(flatten(OrderedDict(out=t, aux=None))) == ["out"]
    assert list(flatten((t, [t, {"feat": t}]))) == ["output.0", "output.1.0", "output.1.1.feat"]
    assert list(flatten({"heads": [t, t], 3: t})) == ["heads.0", "heads.1", "output.3"]
    assert list(flatten(Pair(t, t))) == ["logits", "boxes"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"logits": torch.zeros(1), "note": "x"}, "output 'note' is a str, not a tensor"),
        ((torch.zeros(1), 0.5), "output 'output.1' is a float"),
        ({"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}}, "both be named 'a.b'"),
        ({"input": torch.zeros(1)}, "both be named 'input'"),
        ((None, []), "returned no tensor"),
        (object(), "the model's output is a object"),
    ],
)
def test_what_is_not_a_tree_of_tensors_is_refused_naming_it(value, message):
    with pytest.raises(OutputError, match=message):
        flatten(value)


def test_batch_axes_and_map_leaves():
    tree = {"a": torch.zeros(2, 3), "b": torch.zeros(5), "c": torch.zeros(())}
    assert batch_axes(tree, 2) == {"a": True, "b": False, "c": False}
    doubled = map_leaves(lambda t: t.double(), tree)
    assert {n: t.dtype for n, t in flatten(doubled).items()} == dict.fromkeys("abc", torch.float64)


def test_rel_err_takes_each_output_against_its_own_scale():
    big, small = torch.full((2, 2), 1000.0), torch.full((2, 2), 0.01)
    want = {"boxes": big, "scores": small}
    got = {"boxes": big, "scores": small + 0.01}  # 100% off, 1e-5 of the boxes' scale
    assert rel_err(got, want) == pytest.approx(1.0)
    assert rel_err({"boxes": big}, want) == float("inf")  # an output missing
    assert rel_err(big, big + 1) == pytest.approx(1 / 1001, rel=1e-6)  # a tensor as before


def _moving(seed: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 3)) * scale


def test_one_output_is_judged_exactly_as_before():
    ref = _moving(0)
    got = ref + 1e-6
    assert judge_outputs("onnx", [({"output": ref}, {"output": got})], TOL) == judge(
        "onnx", [(ref, got)], TOL
    )


def test_the_worst_output_decides_and_is_named():
    boxes, scores = _moving(0, 800.0), _moving(1, 0.5)
    want = {"boxes": boxes, "scores": scores}
    ok = judge_outputs("onnx", [(want, dict(want))], TOL)
    assert ok.verdict == "ok" and set(ok.outputs) == {"boxes", "scores"}
    # A scores error far below the boxes' scale, far above the scores' own bound: caught.
    bad = judge_outputs("onnx", [(want, {"boxes": boxes, "scores": scores + 1e-2})], TOL)
    assert bad.verdict == "failed" and bad.output == "scores"
    assert bad.cause.startswith("output 'scores':") and "output 'scores' (worst of 2)" in bad.line()
    assert bad.outputs["boxes"]["verdict"] == "ok"


def test_an_output_that_ignores_the_input_makes_the_verdict_insensitive():
    constant = np.ones((4, 3))  # a head that answers the same for every sample
    want = {"moving": _moving(0), "constant": constant}
    check = judge_outputs("onnx", [(want, dict(want))], TOL)
    assert check.verdict == "insensitive" and check.output == "constant"


def test_outputs_that_differ_fail_naming_both_sets():
    check = judge_outputs("onnx", [({"a": _moving(0)}, {"b": _moving(0)})], TOL)
    assert check.verdict == "failed" and "['a']" in check.cause and "['b']" in check.cause


def test_judge_trees_compares_torch_trees():
    ref = {"x": torch.randn(4, 3, dtype=torch.float64), "y": [torch.randn(4, 2)]}
    assert judge_trees("fold", [(ref, ref)], TOL).verdict == "ok"
    moved = {"x": ref["x"], "y": [ref["y"][0] + 1.0]}
    check = judge_trees("fold", [(ref, moved)], TOL)
    assert check.verdict == "failed" and check.output == "y.0"
    assert set(as_arrays(ref)) == {"x", "y.0"}
