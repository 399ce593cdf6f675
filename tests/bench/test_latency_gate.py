"""The release gate: slowdowns beyond the noise, the repeat before failing, exit codes, outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import pipeline.bench.sweep
from pipeline.bench.baseline import load_baseline
from pipeline.bench.latency_gate import BaselineError, compare_rows
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
    [
        (None, "no such file"),
        ("{", "expected a bench report"),
        ('{"rows": [{}]}', "missing model, backend"),
    ],
)
def test_a_bad_baseline_file_names_itself(tmp_path: Path, text: str | None, fragment: str) -> None:
    path = tmp_path / "base.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(BaselineError, match=fragment) as err:
        load_baseline(path)
    assert str(path) in str(err.value) and "--save-baseline" in str(err.value)


class FakeSweep:
    """Replaces ``pipeline.bench.sweep.sweep``: the n-th call's rows take ``ms[n]`` per run (a
    number, or the block medians themselves), one row per model and batch."""

    def __init__(self, *ms) -> None:
        self.ms, self.calls = list(ms), 0

    def __call__(self, artefacts, settings, cfg, *args, **kwargs) -> list[LatencyRow]:
        ms = self.ms[min(self.calls, len(self.ms) - 1)]
        self.calls += 1
        blocks = [[b] for b in ms] if isinstance(ms, tuple) else [[ms]] * cfg.runs
        return [
            LatencyRow.from_blocks(
                blocks,
                backend="torch",
                device="cpu",
                model=a.label,
                batch=batch,
                threads=cfg.threads,
            )
            for batch in cfg.batches
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


# --- the gate's inputs: issue 32 items 1-4, issue 31 item 2 ---------------------------------------


def _save(monkeypatch, pruned: Path, base: Path, *extra: str, ms=1.0) -> list[str]:
    """Save a baseline of ``pruned`` with a fake sweep; returns the argv to bench it again."""
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", FakeSweep(ms))
    argv = ["bench", str(pruned), *FAST, "--backends", "torch", *extra]
    assert main([*argv, "--save-baseline", str(base)]) == 0
    return argv


def test_a_failing_gate_never_writes_a_baseline(pruned, tmp_path, monkeypatch, capsys) -> None:
    base = tmp_path / "base.json"
    argv = _save(monkeypatch, pruned, base)
    saved = base.read_bytes()
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", FakeSweep(3.0))
    assert main([*argv, "--compare", str(base), "--save-baseline", str(base)]) == 1
    assert base.read_bytes() == saved  # the next build still gates against the fast figures
    err = capsys.readouterr().err
    assert f"--save-baseline {base} not written: the gate failed" in err
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", FakeSweep(1.1))  # passes: a new baseline
    assert main([*argv, "--compare", str(base), "--save-baseline", str(base)]) == 0
    assert json.loads(base.read_text())["rows"][0]["p50_ms"] == pytest.approx(1.1)


BAD_ROWS = {
    "p50_zero": ("p50_ms", 0),
    "p50_null": ("p50_ms", None),
    "p50_string": ("p50_ms", "fast"),
    "block_zero": ("blocks_ms", [1.0, 0.0, 1.0, 1.0, 1.0]),
    "no_blocks_value": ("blocks_ms", None),
    "batch_zero": ("batch", 0),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_an_invalid_baseline_is_refused_before_timing(
    case, pruned, tmp_path, monkeypatch, capsys
) -> None:
    base = tmp_path / "base.json"
    argv = _save(monkeypatch, pruned, base)
    report = json.loads(base.read_text())
    field, value = BAD_ROWS[case]
    report["rows"][1][field] = value
    base.write_text(json.dumps(report))
    fake = FakeSweep(1.0)
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", fake)
    capsys.readouterr()
    assert main([*argv, "--compare", str(base)]) == 2
    err = capsys.readouterr().err
    assert f"--compare {base}: not a bench baseline: row 1: invalid {field}=" in err
    assert fake.calls == 0 and "Traceback" not in err


def test_a_baseline_from_another_machine_is_refused_unless_allowed(
    pruned, tmp_path, monkeypatch, capsys
) -> None:
    base = tmp_path / "base.json"
    argv = _save(monkeypatch, pruned, base)
    report = json.loads(base.read_text())
    report["machine"]["cpu"] = "Some Other CPU @ 5.0GHz"
    base.write_text(json.dumps(report))
    fake = FakeSweep(1.0)
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", fake)
    capsys.readouterr()
    assert main([*argv, "--compare", str(base)]) == 2 and fake.calls == 0
    err = capsys.readouterr().err
    assert f"--compare {base}: measured on another machine (cpu 'Some Other CPU" in err
    assert "--allow-other-machine" in err
    out = tmp_path / "gate.json"
    assert main([*argv, "--compare", str(base), "--allow-other-machine", "--json", str(out)]) == 0
    assert "compared anyway: machine: cpu 'Some Other CPU" in capsys.readouterr().err
    assert json.loads(out.read_text())["gate"]["allowed"][0].startswith("machine: cpu")


def test_a_baseline_of_another_model_under_the_same_label_is_refused(
    pruned, tmp_path, monkeypatch, capsys
) -> None:
    base = tmp_path / "base.json"
    argv = _save(monkeypatch, pruned, base)
    other = tmp_path / "other" / "pruned"  # same label "pruned", other widths
    argv_other = ["prune", *TINY, "--ratio", "0.8", "--min-channels", "1"]
    assert main([*argv_other, "--out", str(other)]) == 0
    fake = FakeSweep(1.0)
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", fake)
    capsys.readouterr()
    again = [str(other) if a == str(pruned) else a for a in argv]
    assert main([*again, "--compare", str(base)]) == 2 and fake.calls == 0
    err = capsys.readouterr().err
    assert "1 of the 2 rows shared with the baseline timed another model" in err
    assert "pruned torch cpu eager fp32 batch 1 threads 1: sha256" in err
    assert "dense torch" not in err  # the dense model, rebuilt from the same spec, matches
    assert main([*again, "--compare", str(base), "--allow-other-model"]) == 0
    assert "compared anyway: model: pruned torch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags", [["--max-slowdown", "1.5"], ["--allow-other-machine"], ["--allow-other-model"]]
)
def test_gate_flags_without_compare_are_refused(pruned, tmp_path, monkeypatch, capsys, flags):
    fake = FakeSweep(1.0)
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", fake)
    assert main(["bench", str(pruned), *FAST, *flags]) == 2 and fake.calls == 0
    err = capsys.readouterr().err
    assert f"{flags[0]} only apply to the --compare gate, but no --compare was given" in err
    assert f"drop {flags[0]}" in err


def test_a_noisy_measurement_is_no_baseline_and_a_noisy_baseline_is_refused(
    pruned, tmp_path, monkeypatch, capsys
) -> None:
    base = tmp_path / "base.json"
    noisy = (1.0, 1.0, 1.4, 1.9, 2.0)  # the middle half of the blocks spans 64% of the median
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", FakeSweep(noisy))
    argv = ["bench", str(pruned), *FAST, "--backends", "torch"]
    assert main([*argv, "--save-baseline", str(base)]) == 1
    assert not base.exists()
    assert f"--save-baseline {base} not written: 2 of 2 rows are noisy" in capsys.readouterr().err
    _save(monkeypatch, pruned, base)
    report = json.loads(base.read_text())  # the reported case: a hand-made noisy baseline
    report["rows"][0]["blocks_ms"] = list(noisy)
    base.write_text(json.dumps(report))
    fake = FakeSweep(2.0)
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", fake)
    assert main([*argv, "--compare", str(base)]) == 2 and fake.calls == 0
    err = capsys.readouterr().err
    assert "1 of 2 baseline rows measured the machine's load" in err and "noise 64%" in err


def test_rows_missing_from_either_side_are_reported(pruned, tmp_path, monkeypatch, capsys):
    base = tmp_path / "base.json"
    argv = _save(monkeypatch, pruned, base)  # batch 1
    two = [*argv, "--batches", "1", "2"]  # the last --batches wins
    out = tmp_path / "gate.json"
    assert main([*two, "--compare", str(base), "--json", str(out)]) == 0
    gate = json.loads(out.read_text())["gate"]
    assert gate["compared"] == 2
    assert gate["missing_in_baseline"] == [
        f"{m} torch cpu eager fp32 batch 2 threads 1" for m in ("dense", "pruned")
    ]
    assert gate["missing_in_measurement"] == []
    assert "2 rows timed have no row in the baseline" in capsys.readouterr().err
    report = json.loads(base.read_text())
    report["rows"].append({**report["rows"][0], "batch": 8})
    base.write_text(json.dumps(report))
    assert main([*argv, "--compare", str(base), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["gate"]["missing_in_measurement"] == [
        "dense torch cpu eager fp32 batch 8 threads 1"
    ]
    assert "1 baseline rows were not timed (not gated)" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_a_report_over_the_baseline_is_refused(flag, pruned, tmp_path, monkeypatch, capsys):
    # --compare B --json B would replace the baseline with a failing measurement.
    base = tmp_path / "base.json"
    argv = _save(monkeypatch, pruned, base)
    saved = base.read_bytes()
    fake = FakeSweep(3.0)
    monkeypatch.setattr(pipeline.bench.sweep, "sweep", fake)
    assert main([*argv, "--compare", str(base), flag, str(base)]) == 2 and fake.calls == 0
    assert f"{flag} {base} is the --compare baseline" in capsys.readouterr().err
    assert base.read_bytes() == saved
