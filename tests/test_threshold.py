import numpy as np
import pytest

from pipeline.threshold import NotBimodalError, auto_threshold, importance_summary


def test_valley_of_a_polarised_distribution():
    rng = np.random.default_rng(0)
    weak = 10 ** rng.uniform(-4, -2.5, 300)
    strong = rng.uniform(0.3, 0.9, 700)
    t = auto_threshold(np.concatenate([weak, strong]))
    assert weak.max() < t.value < strong.min()
    assert t.below == 300 and t.above == 700
    assert t.bimodality > 0.6 and t.separation > 2
    assert t.gap == pytest.approx(strong.min() - weak.max())


def test_unimodal_is_refused_with_advice():
    rng = np.random.default_rng(1)
    with pytest.raises(NotBimodalError, match="prune.threshold=ratio"):
        auto_threshold(rng.uniform(0.4, 0.6, 500))
    with pytest.raises(NotBimodalError, match="not bimodal"):
        auto_threshold(np.exp(rng.normal(-1, 0.3, 500)))


def test_summary_fractions():
    s = importance_summary([0.01, 0.02, 0.6, 0.7])
    assert s["below_0.05"] == 0.5 and s["above_0.5"] == 0.5


def test_close_modes_are_refused():
    rng = np.random.default_rng(2)
    close = np.concatenate([rng.normal(0.50, 0.002, 400), rng.normal(0.515, 0.003, 200)])
    with pytest.raises(NotBimodalError, match="decades apart"):
        auto_threshold(close)
