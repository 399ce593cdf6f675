"""The automatic threshold finds the valley between two modes and refuses everything else.

Each distribution has a known answer: a valley the cut must fall into (between the largest weak
value and the smallest strong value), or a single mode that must be refused.
"""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.prune.threshold import NotBimodalError, auto_threshold, importance_summary


def test_valley_of_a_polarised_distribution():
    rng = np.random.default_rng(0)
    weak = 10 ** rng.uniform(-4, -2.5, 300)
    strong = rng.uniform(0.3, 0.9, 700)
    t = auto_threshold(np.concatenate([weak, strong]))
    assert weak.max() < t.value < strong.min()
    assert t.below == 300 and t.above == 700
    assert t.separation > 2 and t.dip < 0.05
    assert t.gap == pytest.approx(strong.min() - weak.max())


def test_weak_mode_spanning_many_decades_is_cut_at_the_valley():
    # what a receding avalanche leaves: weak channels spread over nine decades. Otsu's split in
    # log space (the previous method) lands inside the weak mode here.
    rng = np.random.default_rng(3)
    weak = 10 ** rng.uniform(-12, -3, 700)
    strong = rng.uniform(0.3, 0.9, 300)
    t = auto_threshold(np.concatenate([weak, strong]))
    assert weak.max() < t.value < strong.min()
    assert t.below == 700


@settings(max_examples=300, deadline=None)
@given(
    weak_share=st.floats(0.1, 0.9),
    weak_centre=st.floats(-8, -2.5),
    weak_width=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
@example(weak_share=0.875, weak_centre=-3.0, weak_width=0.25, seed=0)  # noise in 125 strong ones
def test_valley_found_for_random_polarised_mixtures(weak_share, weak_centre, weak_width, seed):
    rng = np.random.default_rng(seed)
    n_weak = int(1000 * weak_share)
    weak = 10 ** rng.normal(weak_centre, weak_width / 4, n_weak).clip(-30, -1.5)
    strong = rng.uniform(0.2, 0.95, 1000 - n_weak)
    t = auto_threshold(np.concatenate([weak, strong]))
    assert weak.max() < t.value < strong.min()


@pytest.mark.parametrize(
    "name, values",
    [
        ("uniform", np.random.default_rng(1).uniform(0.4, 0.6, 500)),
        ("lognormal", np.exp(np.random.default_rng(1).normal(-1, 0.3, 500))),
        # one skewed mode: a long weak tail, no dip (the previous method accepted it)
        ("sigmoid of N(0, 3)", 1 / (1 + np.exp(-np.random.default_rng(4).normal(0, 3, 2000)))),
        ("log-uniform", 10 ** np.random.default_rng(5).uniform(-6, 0, 2000)),
    ],
)
def test_single_modes_are_refused_with_advice(name, values):
    with pytest.raises(NotBimodalError, match="not bimodal.*prune.threshold=ratio"):
        auto_threshold(values)


def _accepted(draw, n: int, draws: int = 100) -> int:
    """How many of ``draws`` seeded samples of ``n`` importances the threshold accepts."""
    accepted = 0
    for seed in range(draws):
        try:
            auto_threshold(draw(np.random.default_rng(seed), n))
            accepted += 1
        except NotBimodalError:
            pass
    return accepted


@pytest.mark.parametrize("n", [100, 300, 1000])
@pytest.mark.parametrize(
    "draw",
    [
        # 1% of 100 groups is one sample: a lone sample of the sparse weak tail made a "mode"
        # (with the 1% share alone, 38 of 100 draws were accepted at n=100 and 5 at n=300)
        pytest.param(lambda rng, n: np.abs(rng.normal(0.5, 0.3, n)), id="|N(0.5, 0.3)|"),
        pytest.param(lambda rng, n: np.abs(rng.normal(0, 1, n)), id="|N(0, 1)|"),
        pytest.param(lambda rng, n: np.exp(rng.normal(-1, 1, n)), id="log-normal"),
        pytest.param(lambda rng, n: np.exp(rng.normal(-1, 2, n)), id="wide log-normal"),
    ],
)
def test_a_single_mode_is_refused_at_small_sizes(draw, n):
    assert _accepted(draw, n) <= 1


@pytest.mark.parametrize("n", [100, 300, 1000])
def test_two_modes_are_accepted_at_small_sizes(n):
    def draw(rng, n):
        weak = 10 ** rng.uniform(-4, -2.5, int(0.3 * n))
        return np.concatenate([weak, rng.uniform(0.3, 0.9, n - weak.size)])

    cuts = [auto_threshold(draw(np.random.default_rng(seed), n)) for seed in range(100)]
    assert all(t.below == int(0.3 * n) for t in cuts)


def test_close_modes_are_refused():
    rng = np.random.default_rng(2)
    close = np.concatenate([rng.normal(0.40, 0.01, 400), rng.normal(0.70, 0.01, 200)])
    with pytest.raises(NotBimodalError, match="decades apart"):
        auto_threshold(close)


def test_a_handful_of_outliers_is_not_a_mode():
    rng = np.random.default_rng(6)
    values = np.concatenate([rng.uniform(0.3, 0.9, 2000), [1e-6, 2e-6, 3e-6]])
    with pytest.raises(NotBimodalError, match="hold 1% of the groups"):
        auto_threshold(values)


def test_a_split_weak_side_stays_below_the_cut():
    # polarization and ISTA leave exact zeros AND tiny non-zero scales: the tallest peak is the
    # zeros, and anchoring on it (the previous rule) cut between the zeros and the tiny ones
    rng = np.random.default_rng(7)
    zeros = np.zeros(500)
    tiny = 10 ** rng.uniform(-4, -2.2, 400)
    strong = rng.uniform(0.3, 0.9, 100)
    t = auto_threshold(np.concatenate([zeros, tiny, strong]))
    assert tiny.max() < t.value < strong.min()
    assert t.below == 900


def test_summary_fractions():
    s = importance_summary([0.01, 0.02, 0.6, 0.7])
    assert s["below_0.05"] == 0.5 and s["above_0.5"] == 0.5


@pytest.mark.parametrize("seed", range(4))
def test_a_small_strong_cluster_over_the_bulk_is_refused(seed):
    # L1-trained plain BN: the bulk at |gamma| ~ 0.03 has not receded, one layer (3%) sits at
    # 1.5; the valley between them removed 97% of the network in 4 of 4 draws
    rng = np.random.default_rng(seed)
    bulk, strong = np.abs(rng.normal(0.03, 0.01, 970)), rng.normal(1.5, 0.1, 30)
    with pytest.raises(NotBimodalError, match=r"drop the largest mode .*prune.threshold=ratio"):
        auto_threshold(np.concatenate([bulk, strong]))


def _receded_middle_strong(n: int = 1000) -> np.ndarray:
    """15% receded to 1e-4, 30% in a middle mode at ~0.005, 55% strong at ~0.5."""
    rng = np.random.default_rng(8)
    receded = 10 ** rng.normal(-4, 0.1, int(0.15 * n))
    middle = 10 ** rng.normal(-2.3, 0.1, int(0.30 * n))
    return np.concatenate([receded, middle, 10 ** rng.normal(-0.3, 0.1, n - 450 * n // 1000)])


def test_a_cut_far_from_what_training_receded_is_refused():
    values = _receded_middle_strong()
    assert auto_threshold(values).below == 450  # unknown training: the valley under the top
    assert auto_threshold(values, receded_below=0.01).below == 450  # training receded 45%
    with pytest.raises(NotBimodalError, match=r"drop 450 of 1000 groups, but training receded 150"):
        auto_threshold(values, receded_below=0.001)  # training receded only the lowest 15%


def test_prune_model_checks_the_cut_against_what_training_receded():
    import torch
    from torch import nn

    from pipeline.config import PruneConfig
    from pipeline.prune.stage import prune_model

    model = nn.Sequential(
        *(m for c in (3, 50, 50, 50) for m in (nn.Conv2d(c, 50, 3, padding=1), nn.BatchNorm2d(50))),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(50, 2),
    )  # fmt: skip
    gammas = np.random.default_rng(0).permutation(_receded_middle_strong(200))
    bns = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for i, bn in enumerate(bns):
            bn.weight.copy_(torch.from_numpy(gammas[50 * i : 50 * (i + 1)]))
    x, cfg = torch.randn(1, 3, 8, 8), PruneConfig(threshold="auto", min_channels=1)
    assert len(prune_model(model.eval(), x, cfg).plan.dropped_groups) == 90
    with pytest.raises(NotBimodalError, match="training receded 30"):
        prune_model(model.eval(), x, cfg, receded_below=0.001)
