"""`recede export DIR --format ... --out OUT`: a verified, reproducible release, or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pipeline.cli.main import main  # noqa: E402
from pipeline.export.manifest import verify_manifest  # noqa: E402
from pipeline.export.tensorrt import tensorrt_available  # noqa: E402

TINY = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("src") / "pruned"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def release(pruned, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "release"
    assert main(["export", str(pruned), "--format", "all", "--out", str(out)]) == 0
    return out


def test_all_writes_verified_onnx_fp16_and_a_manifest(release, pruned) -> None:
    assert (release / "model.onnx").is_file() and (release / "model.fp16.onnx").is_file()
    assert (release / "model.engine").is_file() == tensorrt_available()
    manifest = json.loads((release / "manifest.json").read_text())
    assert verify_manifest(release / "manifest.json") == []
    assert manifest["artefacts"]["onnx"]["path"] == "model.onnx"  # relative to the folder
    assert manifest["config"]["source"]["path"] == "../../" + "/".join(pruned.parts[-2:])
    assert {"torch", "onnx", "onnxruntime", "tensorrt"} <= set(manifest["versions"])
    export = manifest["export"]
    assert export["opset"] == 17 and export["input"]["shape"] == ["batch", 3, 16, 16]
    assert export["input"]["dtype"]["onnx-fp16"] == "float16"
    by_format = {v["what"]: v for v in export["verification"]}
    assert (
        by_format["onnx"]["precision"] == "fp32" and by_format["onnx-fp16"]["precision"] == "fp16"
    )
    assert all(v["passed"] and v["max_abs_err"] <= v["bound"] for v in by_format.values())


def test_exporting_twice_gives_byte_identical_onnx(release, pruned, tmp_path) -> None:
    again = tmp_path / "again"
    assert main(["export", str(pruned), "--format", "all", "--out", str(again)]) == 0
    for name in ("model.onnx", "model.fp16.onnx"):
        assert (again / name).read_bytes() == (release / name).read_bytes(), name


def test_fp16_graph_really_is_half(release) -> None:
    import onnx

    proto = onnx.load(str(release / "model.fp16.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    weights = [t for t in proto.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


def test_a_failed_verification_exits_1_and_writes_nothing(pruned, tmp_path, monkeypatch, capsys):
    from pipeline.core import tolerance

    monkeypatch.setitem(tolerance.TOLERANCES, "fp16", tolerance.Tolerance(0.0, 0.0, "fp16"))
    monkeypatch.setattr(tolerance, "MEASURED", ())  # no bound scaled by the measured rounding
    out = tmp_path / "release"
    assert main(["export", str(pruned), "--format", "onnx-fp16", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "(model.fp16.onnx) failed verification" in err and "left unchanged" in err
    assert not out.exists() and not list(tmp_path.glob(".release*partial"))


def _refused(argv, capsys, fragment) -> None:
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_out_inside_the_model_folder_is_refused(pruned, capsys) -> None:
    before = sorted(p.name for p in pruned.iterdir())
    _refused(["export", str(pruned), "--out", str(pruned), "--force"], capsys, "would replace")
    assert sorted(p.name for p in pruned.iterdir()) == before


def test_out_that_is_a_file_is_refused(pruned, tmp_path, capsys) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    _refused(["export", str(pruned), "--out", str(target)], capsys, "is an existing file")
    assert target.read_text() == "x"


def test_truncated_weights_are_named_before_any_work(pruned, tmp_path, capsys) -> None:
    import shutil

    src = Path(shutil.copytree(pruned, tmp_path / "model"))
    data = (src / "model.pt").read_bytes()
    (src / "model.pt").write_bytes(data[: len(data) // 2])
    out = tmp_path / "release"
    _refused(["export", str(src), "--format", "all", "--out", str(out)], capsys, "model.pt")
    assert not out.exists()


def test_impossible_batch_range_is_refused(pruned, tmp_path, capsys) -> None:
    argv = ["export", str(pruned), "--out", str(tmp_path / "r"), "--opt-batch", "64"]
    _refused(argv, capsys, "--opt-batch")
    assert not (tmp_path / "r").exists()


def test_tensorrt_without_it_is_refused_before_any_work(pruned, tmp_path, capsys) -> None:
    if tensorrt_available():
        pytest.skip("TensorRT is usable here")
    out = tmp_path / "release"
    argv = ["export", str(pruned), "--format", "tensorrt", "--out", str(out)]
    _refused(argv, capsys, "pip install 'recede[tensorrt]'")
    assert not out.exists()


def test_all_warns_when_it_skips_tensorrt(pruned, tmp_path, capsys, caplog) -> None:
    if tensorrt_available():
        pytest.skip("TensorRT is usable here")
    with caplog.at_level("WARNING"):
        assert main(["export", str(pruned), "--format", "all", "--out", str(tmp_path / "r")]) == 0
    assert "skipping TensorRT" in caplog.text and "recede[tensorrt]" in caplog.text


def test_unwritable_out_is_refused_before_any_work(pruned, tmp_path, capsys, monkeypatch) -> None:
    import pipeline.core.output_folders

    parent = tmp_path / "locked"
    parent.mkdir()
    real = pipeline.core.output_folders._unwritable_reason
    monkeypatch.setattr(  # root writes anywhere: make the folder report itself read-only
        pipeline.core.output_folders,
        "_unwritable_reason",
        lambda folder: "read-only file system" if folder == parent else real(folder),
    )
    argv = ["export", str(pruned), "--format", "all", "--out", str(parent / "release")]
    _refused(argv, capsys, "cannot write in")
    assert list(parent.iterdir()) == []


@pytest.mark.skipif(tensorrt_available(), reason="this machine can build engines")
@pytest.mark.parametrize("fmt", ["all", "onnx"])
def test_require_tensorrt_is_refused_up_front_where_no_engine_can_be_built(
    pruned, tmp_path, capsys, fmt
) -> None:
    out = tmp_path / "release"
    assert (
        main(["export", str(pruned), "--format", fmt, "--require", "tensorrt", "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert "--require tensorrt" in err and ("TensorRT" in err or "builds none" in err)
    assert not out.exists() and not list(tmp_path.glob(".*"))
