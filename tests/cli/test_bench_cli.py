"""`recede bench MODEL...`: the tables and files it writes, and every bad input exiting 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.cli.main import main

TINY = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]
QUICK = ["--batches", "1", "2", "--runs", "50", "--warmup", "1", "--threads", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A pruned TinyNet folder with model.pt, shapes.json and a verified model.onnx."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("src") / "pruned"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    assert main(["export", str(out)]) == 0
    return out


@pytest.fixture
def model_dir(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "model"))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


def contradictions(argv: list[str], message: str) -> list[str]:
    """The fixes ``message`` offers that the flags in ``argv`` already apply: ``add X`` or
    ``pass --flag V`` where ``argv`` holds X (as a value) or ``--flag V``."""
    given = {" ".join(argv[i : i + 2]) for i in range(len(argv))} | set(argv)
    offered = re.findall(r"\badd (--[\w-]+ [\w.-]+)", message)
    for words in re.findall(r"\badd ([\w.-]+(?: (?:or|and) [\w.-]+)*)", message):
        offered += re.split(r" (?:or|and) ", words)
    offered += re.findall(r"\b(?:pass|use) (--[\w-]+ [\w.-]+)", message)
    return [fix for fix in offered if fix in given]


def refused(tmp_path: Path, capsys, argv: list[str], fragment: str) -> str:
    before = snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before
    assert contradictions(argv, err) == [], err  # a fix the user already applied is no fix
    return err


def test_the_contradiction_check_catches_the_reported_message() -> None:
    said = "nothing to time: ... an .onnx file); add torch or onnxruntime"
    assert contradictions(["bench", "m", "--backends", "onnxruntime"], said) == ["onnxruntime"]
    assert contradictions(["bench", "m", "--batches", "1"], "pass --batches 1") == ["--batches 1"]
    assert contradictions(["bench", "m", "--batches", "1"], "pass --batches 4") == []


def test_bench_folder_and_onnx_file_with_every_output(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["bench", str(model_dir), str(model_dir / "model.onnx"), *QUICK]
    argv += ["--json", str(out / "b.json"), "--markdown", str(out / "b.md")]
    assert main([*argv, "--plot", str(out / "b.png")]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "b.json").read_text())
    assert (out / "b.md").read_text() in text + "\n"
    assert (out / "b.png").read_bytes().startswith(PNG_MAGIC)
    rows = [(r["backend"], r["model"], r["batch"]) for r in report["rows"] if r["device"] == "cpu"]
    both = ["dense", "model"]  # the dense reference, rebuilt from the prune folder's spec
    assert rows == [
        (backend, model, batch)
        for batch in (1, 2)
        for backend, models in (("torch", both), ("onnxruntime", [*both, "model-2"]))
        for model in models
    ]
    dense, pruned, onnx_only = report["models"]
    assert dense["source"].startswith("rebuilt from") and dense["macs"] > pruned["macs"] > 0
    assert onnx_only["macs"] == pruned["macs"]  # counted on its graph (bench/onnx_macs.py)
    assert all(r["threads"] == 1 and r["runs"] == 50 and r["warmup"] == 1 for r in report["rows"])
    assert "| onnxruntime | cpu | model-2 | fp32 | 2 | 1 |" in text
    assert ("## GPU vs CPU" in text) == torch.cuda.is_available()


def test_bench_a_run_folder_gives_dense_and_pruned(model_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    for sub, label in (("trained", "dense"), ("pruned", "pruned")):
        shutil.copytree(model_dir, run / sub)
        shutil.move(run / sub / "model.onnx", run / f"{label}.onnx")
    argv = ["bench", str(run), "--backends", "onnxruntime", "--batches", "1", "--warmup", "0"]
    assert main([*argv, "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [m["label"] for m in report["models"]] == ["dense", "pruned"]
    assert report["models"][0]["onnx"] == str(run / "dense.onnx")
    assert {r["backend"] for r in report["rows"]} == {"onnxruntime"}
    assert "speed-up is against dense" in capsys.readouterr().out


def test_plot_without_matplotlib_is_skipped_with_a_message(
    model_dir, tmp_path, capsys, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    argv = ["bench", str(model_dir), "--backends", "torch", "--batches", "1", "--warmup", "0"]
    assert main([*argv, "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert f"--plot {tmp_path / 'p.png'}: skipped, matplotlib is not installed" in out
    assert not (tmp_path / "p.png").exists()


def _truncate(folder: Path) -> None:
    data = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(data[: len(data) // 2])


def _fixed_batch_onnx(folder: Path) -> None:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"))
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(graph, str(folder / "model.onnx"))


BAD = {
    "missing_path": (None, ["{tmp}/nothing"], "MODEL {tmp}/nothing: no such file or folder"),
    "garbage_onnx_in_folder": (
        lambda f: (f / "model.onnx").write_bytes(b"not an onnx graph"),
        ["{dir}"],
        "model.onnx is not a valid ONNX model",
    ),
    "garbage_onnx_file": (
        lambda f: (f / "model.onnx").write_bytes(b"\x08\x07garbage"),
        ["{dir}/model.onnx"],
        "model.onnx is not a valid ONNX model",
    ),
    "not_onnx_file": (None, ["{dir}/shapes.json"], "a file, but not .onnx"),
    "truncated_weights": (_truncate, ["{dir}"], "model.pt"),
    "unknown_backend": (None, ["{dir}", "--backends", "tflite"], "invalid choice: 'tflite'"),
    "unknown_device": (None, ["{dir}", "--devices", "tpu"], "argument --devices"),
    "negative_warmup": (None, ["{dir}", "--warmup", "-1"], "--warmup: expected an integer in [0"),
    "runs_too_few": (None, ["{dir}", "--runs", "4"], "--runs: expected an integer in [5"),
    "json_is_a_folder": (None, ["{dir}", "--json", "{tmp}"], "--json {tmp}: a folder"),
    "fixed_batch": (_fixed_batch_onnx, ["{dir}", "--batches", "1"], "has a fixed batch of 4"),
    "nothing_runs": (None, ["{dir}/model.onnx", "--backends", "torch"], "nothing to time"),
    "cpu_clock_threads": (None, ["{dir}", "--clock", "cpu", "--threads", "2"], "needs threads=1"),
    "slowdown_no_compare": (None, ["{dir}", "--max-slowdown", "2"], "no --compare was given"),
    "allow_no_compare": (None, ["{dir}", "--allow-other-model"], "no --compare was given"),
    "slowdown_at_1": (None, ["{dir}", "--max-slowdown", "1"], "--max-slowdown: expected"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bench_bad_input_exits_2(case, model_dir, tmp_path, capsys) -> None:
    damage, args, fragment = BAD[case]
    if damage is not None:
        damage(model_dir)
        args = [*args, "--force"]  # past the folder index, to the loader's own check
    fill = {"dir": str(model_dir), "tmp": str(tmp_path)}
    argv = ["bench", *(a.format(**fill) for a in args)]
    refused(tmp_path, capsys, argv, fragment.format(**fill))


def test_bench_refuses_a_damaged_folder_before_loading_it(model_dir, tmp_path, capsys) -> None:
    (model_dir / "model.onnx").write_bytes(b"not an onnx graph")
    err = refused(tmp_path, capsys, ["bench", str(model_dir)], "was changed after recede wrote it")
    assert "model.onnx" in err and "--force" in err


def test_bench_cuda_without_gpu_is_refused(model_dir, tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    refused(
        tmp_path, capsys, ["bench", str(model_dir), "--devices", "cuda"], "--devices cuda needs"
    )


def test_bench_tensorrt_only_without_tensorrt_is_refused(model_dir, tmp_path, capsys) -> None:
    from pipeline.export.tensorrt import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is usable here")
    refused(
        tmp_path, capsys, ["bench", str(model_dir), "--backends", "tensorrt"], "nothing to time"
    )


# --- every refusal says something the flags given do not contradict (issue 31 item 13) ---------


def test_onnxruntime_on_a_folder_without_onnx_is_not_told_to_add_onnxruntime(
    exported, tmp_path, capsys
) -> None:
    # The reported case: "add torch or onnxruntime" to a user who passed --backends onnxruntime.
    folder = Path(
        shutil.copytree(exported, tmp_path / "model", ignore=shutil.ignore_patterns("*.onnx"))
    )
    argv = [
        "bench",
        str(folder),
        "--backends",
        "onnxruntime",
        "--force",
    ]  # the index lists the ONNX
    err = refused(tmp_path, capsys, argv, "nothing to time: --backends onnxruntime")
    assert "onnxruntime needs an .onnx file" in err and "recede export MODEL" in err
    assert "add torch to --backends (--backends onnxruntime torch)" in err
    assert "add torch or onnxruntime" not in err


def _kinds():
    from hypothesis import strategies as st

    return st.lists(st.sampled_from(["model", "onnx", "both"]), min_size=1, max_size=3)


def _artefacts(kinds: list[str]):
    from pipeline.bench.artefacts import Artefact

    return [
        Artefact(
            f"m{i}",
            "src",
            (3, 8, 8),
            torch.nn.Identity() if kind in ("model", "both") else None,
            Path(f"m{i}.onnx") if kind in ("onnx", "both") else None,
        )
        for i, kind in enumerate(kinds)
    ]


def test_the_nothing_to_time_refusal_never_contradicts_the_flags_given() -> None:
    from hypothesis import assume, given, settings
    from hypothesis import strategies as st

    from pipeline.bench.sweep import BACKENDS, available_settings, runnable
    from pipeline.cli.bench import nothing_to_time

    devices_ = st.sampled_from([None, ["cpu"], ["cuda"], ["cpu", "cuda"]])
    backends_ = st.lists(st.sampled_from(BACKENDS), min_size=1, max_size=3, unique=True)

    @settings(max_examples=150, deadline=None)
    @given(backends=backends_, devices=devices_, kinds=_kinds())
    def check(backends, devices, kinds) -> None:
        artefacts = _artefacts(kinds)
        plan = available_settings(backends=backends, devices=devices or ("cpu", "cuda"))
        assume(not any(runnable(a, s) for a in artefacts for s in plan))
        text = nothing_to_time(backends, devices, artefacts, plan)
        assert text.startswith(f"nothing to time: --backends {' '.join(backends)} on --devices ")
        reasons = text.split("cannot run on these MODELs here: ", 1)[1]
        assert all(f"{b} " in reasons for b in backends)  # each backend given, with its reason
        if "add " in reasons:
            added = reasons.split("; add ", 1)[1].split(" to --backends")[0].split()
            assert added and not set(added) & set(backends), text  # never one already given
            for b in added:  # and each one would time something here
                more = available_settings(backends=[b], devices=devices or ("cpu", "cuda"))
                assert any(runnable(a, s) for a in artefacts for s in more), text
        else:
            assert "pass a MODEL that has what they need" in text
        assert "add torch or onnxruntime" not in text

    check()
