"""The prune plan (``pipeline.prune.plan``): ties at the cut are found, warned about or refused."""

from __future__ import annotations

import logging

import pytest

from pipeline.prune.plan import TiedImportanceError, check_ranking_signal, tie_at_cut


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
    with caplog.at_level(logging.WARNING, logger="pipeline.prune.plan"):
        check_ranking_signal(dict(enumerate(values)), 0.5)
    assert "splits 2 groups of equal importance" in caplog.text


def test_a_wide_tie_at_zero_is_dead_channels_not_missing_signal(caplog) -> None:
    values = [0.0] * 60 + [float(v) for v in range(1, 41)]  # 60 groups receded to exactly 0
    with caplog.at_level(logging.WARNING, logger="pipeline.prune.plan"):
        check_ranking_signal(dict(enumerate(values)), 0.5)
    assert "splits 60 groups of equal importance 0" in caplog.text
    with pytest.raises(TiedImportanceError):  # the same run at a live value is refused
        check_ranking_signal(dict(enumerate(v or 0.5 for v in values)), 0.5)
