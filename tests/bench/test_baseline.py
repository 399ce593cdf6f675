"""A --compare baseline is checked before timing: its JSON, every row's values, its noise, its
machine and its models; anything wrong is a BaselineError naming --compare and the file."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.bench.baseline import check_against, load_baseline, machine, weights_sha256
from pipeline.bench.latency_gate import BaselineError, row_key
from pipeline.bench.timing import NOISE_LIMIT, LatencyRow

SHA = "a" * 64


def _row(model: str = "pruned", blocks=(1.0, 1.0, 1.0, 1.0, 1.0), **kw) -> dict:
    labels = {"backend": "torch", "device": "cpu", "model": model, "batch": 1, "threads": 1}
    row = LatencyRow.from_blocks([[b] for b in blocks], **{**labels, **kw}).to_dict()
    return {**row, "model_sha256": SHA, "input_shape": [1, 16, 16]}


def _baseline(*rows: dict) -> dict:
    return {"rows": list(rows) or [_row("dense"), _row("pruned")], "machine": machine()}


def _write(tmp_path: Path, report) -> Path:
    path = tmp_path / "base.json"
    path.write_text(json.dumps(report))
    return path


def _refused(path: Path, fragment: str) -> str:
    with pytest.raises(BaselineError) as err:
        load_baseline(path)
    text = str(err.value)
    assert text.startswith(f"--compare {path}: "), text
    assert fragment in text, text
    return text


def test_a_valid_baseline_loads(tmp_path) -> None:
    report = _baseline()
    assert load_baseline(_write(tmp_path, report)) == report


BAD_VALUES = [0, -1.0, None, "1.0", math.inf, math.nan, True, [], {}, 10**400]
FIELDS = ["p50_ms", "p90_ms", "p99_ms", "batch", "threads", "wall_p50_ms", "cpu_p50_ms"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    field=st.sampled_from(
        [*FIELDS, "blocks_ms", "input_shape", "model_sha256", "backend", "clock"]
    ),
    value=st.sampled_from(BAD_VALUES),
    which=st.integers(0, 1),
)
def test_every_invalid_row_value_is_refused_naming_the_field(tmp_path, field, value, which) -> None:
    report = _baseline()
    row = report["rows"][which]
    if field == "blocks_ms":  # one block of the list, as a zero block made a ZeroDivisionError
        row[field][2] = value
    elif field == "input_shape":
        row[field] = [1, value, 16]
    elif field in ("model_sha256", "backend", "clock"):
        if isinstance(value, str):
            return  # a string is a valid type here; wrong strings are covered below
        row[field] = value
    else:
        row[field] = value
    if field in ("wall_p50_ms", "cpu_p50_ms") and value is None:
        assert load_baseline(_write(tmp_path, report))  # null: a row timed with threads > 1
        return
    _refused(_write(tmp_path, report), f"row {which}: invalid {field}=")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda r: r.update(rows=[]), "non-empty list 'rows'"),
        (lambda r: r.update(rows={"a": 1}), "non-empty list 'rows'"),
        (lambda r: r.pop("machine"), "no 'machine' object"),
        (lambda r: r["machine"].update(cores=0), "'machine' with invalid cores"),
        (lambda r: r["rows"][0].pop("p50_ms"), "row 0: missing p50_ms"),
        (lambda r: r["rows"][1].pop("model_sha256"), "row 1: missing model_sha256"),
        (lambda r: r["rows"][0].update(backend="tflite"), "row 0: invalid backend='tflite'"),
        (lambda r: r["rows"][0].update(clock="tsc"), "row 0: invalid clock='tsc'"),
        (lambda r: r["rows"][0].update(p90_ms=0.5), "p90_ms 0.5 below p50_ms 1.0"),
        (lambda r: r["rows"].append(copy.deepcopy(r["rows"][0])), "rows measured twice"),
    ],
)
def test_a_baseline_that_is_not_a_bench_report_is_refused(tmp_path, edit, fragment) -> None:
    report = _baseline()
    edit(report)
    _refused(_write(tmp_path, report), fragment)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "no such file"), (b"{", "expected a bench report"), (b"\xff\xfe", "UTF-8")],
)
def test_an_unreadable_baseline_names_itself(tmp_path, content, fragment) -> None:
    path = tmp_path / "base.json"
    if content is not None:
        path.write_bytes(content)
    text = _refused(path, fragment)
    assert "--save-baseline" in text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=json_values, at=st.sampled_from(["top", "row", "machine"]))
def test_no_json_makes_the_baseline_reader_raise_anything_but_baseline_error(tmp_path, junk, at):
    report = _baseline()
    if at == "top":
        report = junk
    elif at == "row":
        report["rows"][0] = junk if not isinstance(junk, dict) else {**report["rows"][0], **junk}
    else:
        report["machine"] = junk
    path = tmp_path / "base.json"
    path.write_text(json.dumps(report, allow_nan=True))
    try:
        load_baseline(path)
    except BaselineError as err:
        assert str(err).startswith(f"--compare {path}: ")


def test_a_noisy_baseline_row_is_refused_and_one_within_the_bound_is_not(tmp_path) -> None:
    # The reported case: rows whose block medians spread 73%.
    noisy = _row("pruned", blocks=(1.0, 1.0, 1.4, 1.9, 2.0))
    assert noisy["noise"] == pytest.approx(0.9 / 1.4) and noisy["noise"] > NOISE_LIMIT
    _refused(_write(tmp_path, _baseline(_row("dense"), noisy)), "noise 64%")
    calm = _row("pruned", blocks=(1.0, 1.0, 1.05, 1.1, 1.2))
    assert calm["noise"] <= NOISE_LIMIT
    assert load_baseline(_write(tmp_path, _baseline(_row("dense"), calm)))
    recorded = {**calm, "noise": 0.73}  # a recorded noise counts even if the blocks were edited
    _refused(_write(tmp_path, _baseline(_row("dense"), recorded)), "noise 73%")


def test_a_preempted_baseline_row_is_refused(tmp_path) -> None:
    waited = _row("pruned", wall_p50_ms=3.0, cpu_p50_ms=1.0)
    assert waited["preempted"]
    text = _refused(_write(tmp_path, _baseline(waited)), "preempted")
    assert "--threads 1 --clock cpu" in text
    on_the_cpu_clock = _row("pruned", clock="cpu", wall_p50_ms=3.0, cpu_p50_ms=1.0)
    assert load_baseline(_write(tmp_path, _baseline(on_the_cpu_clock)))


def _planned(*rows: dict) -> list[dict]:
    keys = ("model", "backend", "device", "mode", "precision", "batch", "threads", "clock")
    return [{k: r[k] for k in (*keys, "model_sha256", "input_shape")} for r in rows]


def test_another_machine_is_refused_unless_allowed_and_then_said(tmp_path) -> None:
    base = _baseline()
    base["machine"] = {**base["machine"], "cpu": "Another CPU", "cores": 64}
    planned = _planned(*base["rows"])
    with pytest.raises(BaselineError, match="measured on another machine") as err:
        check_against(base, planned, "b.json")
    assert "cpu 'Another CPU' there" in str(err.value) and "--allow-other-machine" in str(err.value)
    allowed = check_against(base, planned, "b.json", allow_machine=True)
    assert len(allowed) == 1 and allowed[0].startswith("machine: cpu 'Another CPU' there")
    assert check_against(_baseline(), planned, "b.json") == []  # the same machine: nothing said


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            {"model_sha256": "b" * 64},
            "sha256 aaaaaaaaaaaa… input [1, 16, 16] in the baseline, bbbbbbbbbbbb…",
        ),
        ({"input_shape": [3, 224, 224]}, "input [3, 224, 224] now"),
    ],
)
def test_another_model_under_the_same_label_is_refused_unless_allowed(change, fragment) -> None:
    base = _baseline()
    planned = _planned(base["rows"][0], {**base["rows"][1], **change})
    with pytest.raises(
        BaselineError, match="1 of the 2 rows shared with the baseline timed another model"
    ) as err:
        check_against(base, planned, "b.json")
    assert fragment in str(err.value) and row_key(base["rows"][1]) in str(err.value)
    assert "--allow-other-model" in str(err.value)
    allowed = check_against(base, planned, "b.json", allow_model=True)
    assert allowed == [f"model: {str(err.value).split('label: ')[1].split('; a label')[0]}"]


def test_a_baseline_sharing_no_row_says_what_differs() -> None:
    base = _baseline()
    planned = _planned(*[{**r, "threads": 2} for r in base["rows"]])
    with pytest.raises(BaselineError, match="none of the 2 rows this bench times") as err:
        check_against(base, planned, "b.json")
    assert "threads 1, clock wall; this bench times" in str(err.value)
    assert "threads 2" in str(err.value)


def test_weights_sha256_sees_one_weight_and_the_architecture() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
    same = copy.deepcopy(net)
    assert weights_sha256(net) == weights_sha256(same)
    with torch.no_grad():
        same[0].weight[0, 0, 0, 0] = torch.nextafter(same[0].weight[0, 0, 0, 0], torch.tensor(9.0))
    assert weights_sha256(net) != weights_sha256(same)
    other_activation = copy.deepcopy(net)
    other_activation[1] = nn.GELU()
    assert weights_sha256(net) != weights_sha256(other_activation)
