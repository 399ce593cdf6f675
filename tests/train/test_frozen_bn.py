"""A frozen BN (requires_grad False) is never penalised, never counted toward the budget and never
replaced by a trainable one, whenever it was frozen, under every method; warned about once.

Issue 31 item 7: frozen before ``Polariser.prepare``, the default receding method replaced it by
a fresh trainable bounded BN whose logit then moved 5e5 in 20 steps; frozen after ``prepare``
it was still penalised (receding 7.7e5, l1 0.5, ista 0.5).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.config import PenaltyConfig, TrainConfig
from pipeline.layers.bn import bn_modules
from pipeline.layers.bounded_bn import BoundedBatchNorm2d
from pipeline.train.polarise import Polariser
from tests.conftest import TinyNet

METHODS = ("receding", "l1", "polarization", "ista")
STEPS = 3


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@torch.no_grad()
def _freeze_receded_(bn: torch.nn.Module) -> None:
    """Give ``bn`` a receded-looking scale, then freeze it: a budget must still not count it."""
    bn.weight.fill_(-10.0 if isinstance(bn, BoundedBatchNorm2d) else 1e-3)
    bn.requires_grad_(False)


def _share_ignores(pol: Polariser, frozen: dict) -> bool:
    """Whether the receded share is the same with the frozen scales made large."""
    before = pol.tracker.share(pol.cfg.receded_below)
    saved = {n: bn.weight.detach().clone() for n, bn in frozen.items()}
    with torch.no_grad():
        for bn in frozen.values():
            bn.weight.fill_(10.0)
    after = pol.tracker.share(pol.cfg.receded_below)
    with torch.no_grad():
        for n, bn in frozen.items():
            bn.weight.copy_(saved[n])
    return before == after


def _steps(model: torch.nn.Module, pol: Polariser, x: torch.Tensor, y: torch.Tensor) -> None:
    """``STEPS`` SGD steps of the polarised loop (penalty after backward, clamp/shrink after)."""
    opt = torch.optim.SGD(pol.param_groups(0.5, 5e-4), lr=0.5, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pol.before_step()
        opt.step()
        pol.after_step(opt)


def _train(method: str, when: str, picks: list[bool], target: float | None):
    torch.manual_seed(0)
    model = TinyNet()  # five BNs, one behind an SE gate; a residual add, a concat
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    cfg = TrainConfig(target=target, bn_shift=True, penalty=PenaltyConfig(method, strength=1.0))
    names = list(bn_modules(model))
    chosen = [n for n, pick in zip(names, picks, strict=False) if pick] or names[:1]
    warnings = _Warnings()
    logging.getLogger("pipeline.train").addHandler(warnings)
    try:
        if when == "before":
            for n in chosen:
                _freeze_receded_(model.get_submodule(n))
        frozen = {n: model.get_submodule(n) for n in chosen}
        pol = Polariser.prepare(model, x[:2], cfg, total_steps=STEPS)
        if when == "after":
            frozen = {n: model.get_submodule(n) for n in chosen}
            for bn in frozen.values():
                _freeze_receded_(bn)
        snapshot = {n: [p.detach().clone() for p in bn.parameters()] for n, bn in frozen.items()}
        _steps(model, pol, x, y)
        pol.finish_()
    finally:
        logging.getLogger("pipeline.train").removeHandler(warnings)
    return model, pol, frozen, snapshot, warnings.lines


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(METHODS),
    st.sampled_from(["before", "after"]),
    st.lists(st.booleans(), min_size=5, max_size=5),
    st.sampled_from([None, 0.5]),
)
@example("receding", "before", [True, False, False, False, False], None)  # the reported cases
@example("receding", "after", [True, False, False, False, False], None)
@example("l1", "after", [True, False, False, False, False], None)
@example("ista", "after", [True, False, False, False, False], 0.5)
@example("receding", "before", [True] * 5, None)  # every BN frozen: nothing to train bounded
def test_a_frozen_bn_is_never_penalised_counted_or_replaced(method, when, picks, target):
    if when == "before" and all(picks) and PenaltyConfig(method, strength=1.0).bounded:
        with pytest.raises(ValueError, match="unfreeze a BN"):  # refused, never replaced
            _train(method, when, picks, target)
        return
    model, pol, frozen, snapshot, warnings = _train(method, when, picks, target)
    for name, bn in frozen.items():
        assert model.get_submodule(name) is bn, f"{method}: {name} frozen {when} was replaced"
        now = list(bn.parameters())
        assert all(not p.requires_grad for p in now), f"{name} was unfrozen"
        for p, p0 in zip(now, snapshot[name], strict=True):
            assert torch.equal(p.detach(), p0), f"{method}: {name} frozen {when} moved"
    every = pol.tracker.select(pol.tracker.group_importance(), 1.0)
    masks = pol.tracker.channel_masks(every)
    assert not any(bool(masks[n].any()) for n in frozen)  # never in the penalised set
    assert _share_ignores(pol, frozen), "a frozen BN's scale counted toward the budget"
    assert sum("frozen scale" in line for line in warnings) == 1, warnings


def test_the_frozen_stem_would_move_if_it_were_not_frozen():
    """The checks above can fail: the same training moves an unfrozen BN's scale."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    cfg = TrainConfig(penalty=PenaltyConfig("receding", strength=1.0))
    pol = Polariser.prepare(model, x[:2], cfg, total_steps=STEPS)
    stem = next(iter(bn_modules(model).values()))
    before = stem.weight.detach().clone()
    _steps(model, pol, x, y)
    assert not torch.equal(stem.weight.detach(), before)


def test_frozen_before_prepare_the_reported_example():
    """Receding, the stem frozen before prepare: it stays the same plain BN, unmoved."""
    model, _, frozen, snapshot, _ = _train("receding", "before", [True] + [False] * 4, None)
    ((name, bn),) = frozen.items()
    assert type(bn) is torch.nn.BatchNorm2d and model.get_submodule(name) is bn
    assert torch.equal(bn.weight.detach(), snapshot[name][0])
