"""The release gate: slowdowns beyond the noise, the repeat before failing, exit codes, outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import pipeline.bench.sweep
from pipeline.bench.latency_gate import BaselineError, compare_rows, load_baseline
from pipeline.bench.timing import LatencyRow
from pipeline.cli.main import main

TINY = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]
FAST = ["--batches", "1", "--runs", "5", "--warmup", "1", "--threads", "1"]


def _row(model: str, blocks: list[float], **kw) -> dict:
    labels = {"backend": "torch", "device": "cpu", "model": model, "batch": 1, "threads": 1}
    return LatencyRow.from_blocks([[b] for b in blocks], **{**labels, **kw}).to_dict()


def test_a_slowdown_fails_only_beyond_both_spreads() -> None:
    old = [_row("m", [1.0, 1.0, 1.0, 1.0, 1.0])]
    assert compare_rows([_row("m", [1.1] * 5)], old, 1.2) == ([], 1)
    failing, compared = compare_rows([_row("m", [3.0] * 5)], old, 1.2)
    assert compared == 1 and len(failing) == 1
    assert failing[0].ratio == pytest.approx(3.0) and failing[0].beyond_noise == pytest.approx(3.0)
    assert "1.000 -> 3.000 ms" in failing[0].describe()
    # A 1.5x slower median, but the baseline's own blocks spread from 1.0 to 2.0: not beyond it.
    noisy_old = [_row("m", [1.0, 1.0, 1.5, 2.0, 2.0])]
    assert compare_rows([_row("m", [1.5, 1.5, 2.2, 2.2, 2.2])], noisy_old, 1.2)[0] == []
    # One outlier block in the new measurement does not fake a regression.
    assert compare_rows([_row("m", [1.0, 1.0, 1.0, 1.0, 50.0])], old, 1.2)[0] == []


def test_rows_are_matched_by_identity_and_a_baseline_sharing_none_is_refused() -> None:
    old = [_row("m", [1.0] * 5), _row("other", [1.0] * 5)]
    with pytest.raises(BaselineError, match="none of the 1 new rows matches"):
        compare_rows([_row("m", [5.0] * 5, threads=2)], old, 1.2)
    assert compare_rows([_row("other", [5.0] * 5)], old, 1.2)[1] == 1


@pytest.mark.parametrize(
    ("text", "fragment"),
    [(None, "no such file"), ("{", "expected a bench report"), ('{"rows": [{}]}', "list of")],
)
def test_a_bad_baseline_file_names_itself(tmp_path: Path, text: str | None, fragment: str) -> None:
    path = tmp_path / "base.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(BaselineError, match=fragment) as err:
        load_baseline(path)
    assert str(path) in str(err.value) and "--save-baseline" in str(err.value)


class FakeSweep:
    """Replaces ``pipeline.bench.sweep.sweep``: the n-th call's rows take ``ms[n]`` per run."""

    def __init__(self, *ms: float) -> None:
        self.ms, self.calls = list(ms), 0

    def __call__(self, artefacts, settings, cfg, *args, **kwargs) -> list[LatencyRow]:
        ms = self.ms[min(self.calls, len(self.ms) - 1)]
        self.calls += 1
        return [
            LatencyRow.from_blocks(
                [[ms]] * cfg.runs,
                backend="torch",
                device="cpu",
                model=a.label,
                batch=1,
                threads=cfg.threads,
            )
            for a in artefacts
        ]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gate") / "pruned"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    ("later", "code", "calls"),
    [
        ((1.0,), 0, 1),  # as fast as the baseline: one measurement
        ((3.0, 1.0), 0, 2),  # slow once, then not: the repeat clears it
        ((3.0, 3.0), 1, 2),  # slow twice: exit 1
    ],
)
def test_the_gate_repeats_before_failing(
    pruned, tmp_path, monkeypatch, capsys, later, code, calls
) -> None:
    base = tmp_path / "base" / "bench.json"
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", FakeSweep(1.0))
    argv = ["bench", str(pruned), *FAST, "--backends", "torch"]
    assert main([*argv, "--save-baseline", str(base)]) == 0
    fake = FakeSweep(*later)
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", fake)
    out = tmp_path / "new.json"
    assert main([*argv, "--compare", str(base), "--json", str(out)]) == code
    assert fake.calls == calls
    gate = json.loads(out.read_text())["gate"]
    assert gate["compared"] == 2 and gate["repeated"] == (calls == 2)
    assert len(gate["failing"]) == (2 if code else 0)
    streams = capsys.readouterr()
    if code:
        assert "verification failed: 2 of 2 rows slower than 1.2x" in streams.err
    else:
        assert "latency gate: 2 rows compared" in streams.out


def test_gate_and_outputs_refuse_bad_input_before_timing(pruned, tmp_path, capsys) -> None:
    argv = ["bench", str(pruned), *FAST, "--backends", "torch"]
    assert main([*argv, "--compare", str(tmp_path / "missing.json")]) == 2
    assert "--compare" in capsys.readouterr().err
    released = tmp_path / "rel"
    assert main(["export", str(pruned), "--out", str(released)]) == 0
    before = sorted(p.name for p in released.iterdir())
    for flag in ("--json", "--save-baseline", "--markdown", "--plot"):
        assert main([*argv, flag, str(released / "bench.out")]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {released / 'bench.out'}: inside {released}" in err
    assert sorted(p.name for p in released.iterdir()) == before
    assert main(["bench", str(released), *FAST]) == 0  # still benches: nothing was added


def test_a_run_folders_pruned_is_timed_against_its_trained_dense_model(
    pruned, tmp_path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(pruned, run / "pruned")
    assert main(["prune", *TINY, "--ratio", "0.01", "--out", str(tmp_path / "dense")]) == 0
    shutil.copytree(tmp_path / "dense", run / "trained")
    out = tmp_path / "r.json"
    assert (
        main(["bench", str(run / "pruned"), *FAST, "--backends", "torch", "--json", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert [m["label"] for m in report["models"]] == ["dense", "pruned"]
    assert report["models"][0]["source"] == str(run / "trained")
    row = report["rows"][1]
    assert (
        row["speedup"] is not None and row["speedup_low"] <= row["speedup"] <= row["speedup_high"]
    )
    assert "quick" in row["flags"]
    explicit = tmp_path / "e.json"
    argv = ["bench", str(run / "pruned"), *FAST, "--backends", "torch", "--json", str(explicit)]
    assert main([*argv, "--reference", str(pruned)]) == 0
    assert [m["label"] for m in json.loads(explicit.read_text())["models"]] == [
        "pruned",
        "pruned-2",
    ]
