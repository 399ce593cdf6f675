"""No silent ties: a global ratio cut inside a wide run of equal importances is refused (exit 2)."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.cli import main
from pipeline.config import PruneConfig
from pipeline.plan import TiedImportanceError, check_ranking_signal, tie_at_cut
from pipeline.prune import prune_model
from tests.conftest import TinyNet, randomise_bn_

TINY = ["--model", "tests.conftest:TinyNet", "--input-shape", "1,3,16,16", "--num-classes", "5"]


def test_cut_between_distinct_values_is_no_tie() -> None:
    assert tie_at_cut({g: float(g) for g in range(10)}, 0.5) is None
    assert tie_at_cut({g: 1.0 for g in range(10)}, 0.0) is None  # nothing is cut


def test_all_equal_is_one_run_and_wide() -> None:
    tie = tie_at_cut({g: 1.0 for g in range(10)}, 0.5)
    assert (tie.start, tie.stop, tie.cut, tie.total, tie.wide) == (0, 10, 5, 10, True)


def test_run_is_located_among_distinct_values() -> None:
    values = [0.1, 0.2, 0.5, 0.5, 0.5, 0.5, 0.9, 1.0]  # the cut at 4 splits ranks 2..5
    tie = tie_at_cut(dict(enumerate(values)), 0.5)
    assert (tie.value, tie.start, tie.stop, tie.width) == (0.5, 2, 6, 4)


def test_wide_tie_refused_with_the_way_out() -> None:
    values = [0.1] * 2 + [0.5] * 6 + [0.9] * 2
    with pytest.raises(TiedImportanceError, match="--scope layer") as info:
        check_ranking_signal(dict(enumerate(values)), 0.5)
    # ratios outside the run [2, 8) of 10: floor(r * 10) <= 2 or >= 8
    assert "below 0.3" in str(info.value) and "0.8 or more" in str(info.value)


def test_narrow_tie_is_warned_not_silent(caplog) -> None:
    values = [float(v) for v in range(200)]
    values[99] = values[100] = 99.0  # the cut at 100 splits two equal groups
    with caplog.at_level(logging.WARNING, logger="pipeline.plan"):
        check_ranking_signal(dict(enumerate(values)), 0.5)
    assert "splits 2 groups of equal importance" in caplog.text


def test_a_wide_tie_at_zero_is_dead_channels_not_missing_signal(caplog) -> None:
    values = [0.0] * 60 + [float(v) for v in range(1, 41)]  # 60 groups receded to exactly 0
    with caplog.at_level(logging.WARNING, logger="pipeline.plan"):
        check_ranking_signal(dict(enumerate(values)), 0.5)
    assert "splits 60 groups of equal importance 0" in caplog.text
    with pytest.raises(TiedImportanceError):  # the same run at a live value is refused
        check_ranking_signal(dict(enumerate(v or 0.5 for v in values)), 0.5)


def test_python_api_refuses_an_untrained_model_and_layer_scope_prunes_it() -> None:
    model, x = TinyNet().eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(TiedImportanceError, match="prune.scope: layer"):
        prune_model(model, x, PruneConfig(threshold="ratio", ratio=0.5))
    layered = prune_model(model, x, PruneConfig(threshold="ratio", ratio=0.5, scope="layer"))
    assert layered.plan.dropped_groups
    trained_like = randomise_bn_(TinyNet()).eval()  # distinct importances: the ranking decides
    assert prune_model(trained_like, x, PruneConfig(threshold="ratio", ratio=0.5)).plan.layers


def test_cli_untrained_global_ratio_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "pruned"
    assert main(["prune", *TINY, "--ratio", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--scope layer" in err and "no ranking signal" in err
    assert list(tmp_path.iterdir()) == []  # no --out, no .partial staging folder
    assert main(["prune", *TINY, "--ratio", "0.5", "--scope", "layer", "--out", str(out)]) == 0
