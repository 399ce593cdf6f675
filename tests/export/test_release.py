"""pipeline.export.release: a verified release folder, its options and its format choice."""

from __future__ import annotations

import pytest
import torch

from pipeline.export.release import (
    FILES,
    FORMATS,
    ReleaseOptions,
    export_release,
    resolve_formats,
    verification_input,
)
from tests.conftest import tiny_net_random_bn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SHAPE = (3, 16, 16)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"formats": ("onnx", "coreml")}, "formats must be some of"),
        ({"formats": ()}, "formats must be some of"),
        ({"trt_precision": "int4"}, "trt_precision must be one of"),
        ({"opt_batch": 0}, "opt_batch <= max_batch"),
        ({"opt_batch": 8, "max_batch": 4}, "opt_batch <= max_batch"),
        ({"verify_batch": 32, "max_batch": 32}, "verify_batch < max_batch"),
    ],
)
def test_options_are_refused_on_construction(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        ReleaseOptions(**options)


def test_format_all_skips_only_what_cannot_be_made_and_says_why() -> None:
    assert resolve_formats("all", None) == (FORMATS, [])
    formats, warnings = resolve_formats("all", "no CUDA GPU")
    assert formats == ("onnx", "onnx-fp16", "onnx-int8")
    assert warnings == ["skipping TensorRT: no CUDA GPU"]
    formats, warnings = resolve_formats("all", "no CUDA GPU", "no calibration data")
    assert formats == ("onnx", "onnx-fp16") and len(warnings) == 2
    assert "skipping onnx-int8 (INT8 ONNX): no calibration data" in warnings
    assert resolve_formats("onnx-fp16", "no CUDA GPU") == (("onnx-fp16",), [])
    with pytest.raises(ValueError, match="--format tensorrt cannot run: no CUDA GPU"):
        resolve_formats("tensorrt", "no CUDA GPU")
    with pytest.raises(ValueError, match="--format onnx-int8 cannot run: no data"):
        resolve_formats("onnx-int8", None, "no data")
    with pytest.raises(ValueError, match="--format must be one of"):
        resolve_formats("onnx32", None)


def test_a_release_writes_and_verifies_every_onnx_format(tmp_path) -> None:
    model = tiny_net_random_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = ReleaseOptions(formats=("onnx", "onnx-fp16"), simplify=False)
    release = export_release(model, SHAPE, tmp_path, options)

    assert release.files == {"onnx": FILES["onnx"], "onnx-fp16": FILES["onnx-fp16"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(release.files.values())
    assert [c.what for c in release.all_checks()] == ["fold", "onnx", "onnx-fp16"]
    assert release.passed and all(c.verdict == "ok" for c in release.all_checks())
    assert all(c.sensitivity >= 2 for c in release.checks)  # each could have failed
    assert release.details["input"]["shape"] == ["batch", *SHAPE]
    assert release.details["input"]["dtype"] == {"onnx": "float32", "onnx-fp16": "float16"}
    assert release.details["verification"] == [c.to_dict() for c in release.checks]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model unchanged


def test_the_same_model_exports_the_same_bytes_twice(tmp_path) -> None:
    model, options = tiny_net_random_bn(), ReleaseOptions(simplify=False)
    export_release(model, SHAPE, tmp_path / "a", options)
    export_release(model, SHAPE, tmp_path / "b", options)
    a, b = (tmp_path / d / FILES["onnx"] for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(verification_input(SHAPE, 4), verification_input(SHAPE, 4))


def test_a_release_and_a_run_judge_the_same_model_alike(tmp_path) -> None:
    # `recede export` (export_release) and `recede run` (export_checked) share one check path
    from pipeline.export.verify import export_checked
    from pipeline.fold.batchnorm import fold_bn

    model = tiny_net_random_bn()
    release = export_release(model, SHAPE, tmp_path / "rel", ReleaseOptions(simplify=False))
    batch = verification_input(SHAPE, 4)
    run = export_checked(
        fold_bn(model, batch)[0], model, batch, tmp_path / "run.onnx", opset=17, what="onnx",
        simplify=False,
    )  # fmt: skip
    exported = release.checks[0].to_dict()
    assert {**exported, "path": None} == {**run.to_dict(), "path": None}


@pytest.mark.parametrize(
    "options",
    [ReleaseOptions(formats=("tensorrt",), trt_precision="int8"),
     ReleaseOptions(formats=("onnx", "onnx-int8"))],
)  # fmt: skip
def test_int8_without_calibration_is_refused_before_writing(tmp_path, options) -> None:
    with pytest.raises(ValueError, match="needs calibration samples"):
        export_release(tiny_net_random_bn(), SHAPE, tmp_path, options)
    assert not any(tmp_path.iterdir())
