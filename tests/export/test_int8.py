"""pipeline.export.int8*: QDQ quantization, the agreement check and its sensitivity, the
sensitive-layer fallback, and byte-identical re-export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pipeline.core.checks import MIN_SENSITIVITY  # noqa: E402
from pipeline.data.calibration import from_datasets  # noqa: E402
from pipeline.export.int8 import Int8Options, cpu_int8_support  # noqa: E402
from pipeline.export.int8_check import (  # noqa: E402
    Agreement,
    agreement,
    corrupt_weight_scales,
    judge_int8,
)
from pipeline.export.int8_export import Int8Settings, export_int8  # noqa: E402
from pipeline.export.int8_outputs import verify_int8  # noqa: E402
from pipeline.export.onnx import export_onnx  # noqa: E402
from tests.export.int8_models import (  # noqa: E402
    SHAPE,
    blind_digits_net,
    digits,
    outlier_net,
    trained_digits_net,
)


def _samples(calibration: int = 256):
    data = digits()
    return from_datasets(
        data.train.dataset, data.test.dataset, calibration=calibration, validation=192,
        heldout=360, seed=0, name="digits",
    )  # fmt: skip


def _fp32(net, path):
    return export_onnx(net, torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0)),
                       path)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    net, _ = trained_digits_net()
    fp32 = _fp32(net, tmp / "m.onnx")
    done = export_int8(fp32, tmp / "m.int8.onnx", _samples(), Int8Settings())
    return fp32, done


def test_a_trained_model_passes_and_a_wrong_int8_model_would_not(trained) -> None:
    _, done = trained
    check = done.check
    assert check.verdict == "ok", check.line()
    assert check.measured.labelled and check.measured.samples == 360
    assert check.measured.fp32_accuracy > 80  # the check runs on a model that decides
    assert abs(check.measured.drop) <= 0.5 and check.measured.agreement > 97
    # the injected fault costs far more than the bound on these samples: an ok is evidence
    assert check.wrong.drop >= MIN_SENSITIVITY * check.bound and check.sensitivity > 10


def test_a_corrupted_int8_graph_fails(trained, tmp_path) -> None:
    fp32, done = trained
    wrong = tmp_path / "wrong.int8.onnx"
    corrupt_weight_scales(done.path, wrong)
    data = _samples()
    check = verify_int8(wrong, fp32, data.heldout, data.heldout_labels, max_drop=0.5)
    assert check.verdict == "failed" and "more than the bound" in check.cause
    assert not check.passed


def test_a_model_that_ignores_its_input_is_insensitive_never_ok(tmp_path) -> None:
    fp32 = _fp32(blind_digits_net(), tmp_path / "b.onnx")
    done = export_int8(fp32, tmp_path / "b.int8.onnx", _samples(), Int8Settings(fallback_limit=0))
    assert done.check.measured.fp32_accuracy < 15  # one class for every sample
    assert done.check.verdict == "insensitive" and not done.check.passed
    assert "a wrong INT8 model" in done.check.cause and "would pass too" in done.check.cause


def test_reexport_gives_the_same_bytes(trained, tmp_path) -> None:
    fp32, done = trained
    again = export_int8(fp32, tmp_path / "again.int8.onnx", _samples(), Int8Settings())
    assert again.path.read_bytes() == done.path.read_bytes()


def test_plain_int8_fails_the_outlier_model_and_the_fallback_keeps_its_tensor_float(
    tmp_path,
) -> None:
    fp32 = _fp32(outlier_net(), tmp_path / "o.onnx")
    plain = export_int8(fp32, tmp_path / "plain.onnx", _samples(), Int8Settings(fallback_limit=0))
    assert plain.check.verdict == "failed" and plain.check.measured.drop > 10
    assert plain.quantized.excluded == ()
    fixed = export_int8(fp32, tmp_path / "fixed.onnx", _samples(), Int8Settings())
    assert fixed.check.verdict == "ok", fixed.check.line()
    ranking = fixed.fallback.ranking
    assert ranking[0].added > 20 and ranking[0].tensor == "/Relu_output_0"  # the crushed one
    # kept in float with the max-pool that shares its scale: one step, both convs in float
    assert {"/c1/Conv", "/MaxPool", "/c2/Conv"} <= set(fixed.quantized.excluded)
    assert len(fixed.fallback.trail) == 1 and fixed.fallback.trail[0][1] <= 0.5
    record = fixed.record()
    assert record["excluded_nodes"] == list(fixed.quantized.excluded)
    assert record["fallback"]["validation_drop_all_int8"] > 10


def test_the_fallback_stops_at_its_limit_and_all_float_is_never_ok(tmp_path) -> None:
    fp32 = _fp32(outlier_net(outliers=2), tmp_path / "o.onnx")  # two crushed tensors
    limited = export_int8(fp32, tmp_path / "l.onnx", _samples(), Int8Settings(fallback_limit=1))
    assert len(limited.fallback.trail) == 1 and limited.check.verdict == "failed"
    # keeping both crushed tensors float leaves this three-layer net no INT8 weight at all
    enough = export_int8(fp32, tmp_path / "e.onnx", _samples(), Int8Settings())
    assert len(enough.fallback.trail) == 2
    assert {"/c1/Conv", "/c2/Conv", "/fc/Gemm"} <= set(enough.quantized.excluded)
    assert enough.check.verdict == "failed" and "not an INT8 graph" in enough.check.cause


# --- the judgement, as a property over its inputs -------------------------------------------


def _agreement(samples: int, fp32: float, int8: float, error: float = 0.1) -> Agreement:
    return Agreement(samples, True, fp32, int8, 100.0, error)


@settings(max_examples=300, deadline=None)
@given(
    samples=st.integers(1, 5000),
    fp32=st.floats(0, 100),
    drop=st.floats(-20, 100),
    wrong_drop=st.floats(-20, 100),
    bound=st.floats(0, 5),
)
def test_the_verdict_is_ok_only_within_the_bound_and_when_a_wrong_model_would_fail(
    samples, fp32, drop, wrong_drop, bound
) -> None:
    measured = _agreement(samples, fp32, fp32 - drop)
    wrong = _agreement(samples, fp32, fp32 - wrong_drop)
    check = judge_int8("onnx-int8", "m", measured, wrong, "fault", bound)
    resolution = max(bound, 100.0 / samples)
    if measured.drop > bound:
        assert check.verdict == "failed"
    elif wrong.drop < MIN_SENSITIVITY * resolution:
        assert check.verdict == "insensitive"
    else:
        assert check.verdict == "ok" and check.passed


def test_nan_or_a_wrong_shape_fails() -> None:
    ref = np.eye(4)
    assert math.isinf(agreement(ref, np.full((4, 4), np.nan)).max_logit_error)
    assert agreement(ref, np.eye(3)).agreement == 0.0
    nan = agreement(ref, np.full((4, 4), np.nan))
    check = judge_int8("x", "p", nan, _agreement(4, 100, 0), "fault", 0.5)
    assert check.verdict == "failed" and "NaN" in check.cause


def test_without_labels_the_drop_is_the_disagreement() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    got = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    a = agreement(ref, got)
    assert not a.labelled and a.fp32_accuracy == 100.0 and a.agreement == 75.0 and a.drop == 25.0
    labelled = agreement(ref, got, np.array([0, 1, 1, 1]))  # INT8 fixed one fp32 error
    assert labelled.fp32_accuracy == 75.0 and labelled.int8_accuracy == 100.0
    assert labelled.drop == -25.0 and labelled.agreement == 75.0


def test_a_segmenter_output_is_judged_per_pixel() -> None:
    ref = np.zeros((2, 3, 4, 4))
    ref[:, 1] = 1.0
    got = ref.copy()
    got[0, 2, 0, 0] = 5.0  # one pixel of 32 changes class
    assert agreement(ref, got).agreement == pytest.approx(100 * 31 / 32)


# --- options and the CPU ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "kl"}, "method must be one of"),
        ({"activations": "int4"}, "activations must be one of"),
        ({"calibration_samples": 0}, "calibration_samples >= 1"),
        ({"percentile": 10.0}, "percentile must be in"),
        ({"symmetric": True, "activations": "uint8"}, "symmetric activations are signed"),
    ],
)
def test_options_are_refused_on_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Int8Options(**kwargs)


@pytest.mark.parametrize(
    "cpuinfo, machine, dot, reduce",
    [
        ("flags\t: fpu avx2 avx512f avx512_vnni\n", "x86_64", True, False),
        ("flags\t: fpu avx2 avx_vnni\n", "x86_64", True, False),
        ("flags\t: fpu sse4_2 avx2\n", "x86_64", False, True),  # no VNNI: 7-bit weights
        ("Features\t: fp asimd asimddp\n", "aarch64", True, False),
        ("Features\t: fp asimd\n", "aarch64", False, False),  # ARM: range reduction is x86 advice
        ("", "x86_64", False, True),
    ],
)
def test_range_reduction_follows_the_cpu(monkeypatch, cpuinfo, machine, dot, reduce) -> None:
    monkeypatch.setattr("platform.machine", lambda: machine)
    cpu = cpu_int8_support(cpuinfo)
    assert cpu.dot_product is dot and cpu.reduce_range is reduce
    assert cpu.to_dict()["vnni"] is dot
    assert cpu.activations == ("uint8" if machine == "x86_64" else "int8")


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_auto_activations_are_unsigned_on_x86_signed_elsewhere_and_when_symmetric(
    monkeypatch, tmp_path, machine
) -> None:
    """``auto`` follows the exporting CPU (ONNX Runtime's x86 build fuses depthwise convs only
    for unsigned activations); symmetric activations (TensorRT's file) and an explicit choice
    stay as asked; the written graph's zero points and the recorded settings say which."""
    import onnx

    from pipeline.export.int8 import preprocess, quantize_int8, resolved_activations

    monkeypatch.setattr("platform.machine", lambda: machine)
    assert resolved_activations(Int8Options()) == ("uint8" if machine == "x86_64" else "int8")
    assert resolved_activations(Int8Options(symmetric=True)) == "int8"
    assert resolved_activations(Int8Options(activations="int8")) == "int8"
    assert resolved_activations(Int8Options(activations="uint8")) == "uint8"
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU(),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    fp32 = export_onnx(model, x, tmp_path / "m.onnx", simplify=False)
    samples = torch.randn(8, 3, 8, 8).numpy()
    done = quantize_int8(preprocess(fp32, tmp_path / "p.onnx"), tmp_path / "q.onnx", samples,
                         Int8Options(calibration_samples=8, reduce_range=False))  # fmt: skip
    want = "uint8" if machine == "x86_64" else "int8"
    assert done.settings()["activations"].startswith(f"{want}, per tensor")
    zero_points = {
        onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name
        for i in onnx.load(str(done.path)).graph.initializer if i.name.endswith("_zero_point")
        and i.dims == []
    }  # fmt: skip
    assert want in zero_points


def test_weightless_end_nodes_stay_float_and_a_classifier_is_unchanged(tmp_path) -> None:
    """A segmenter's last Resize (and the Add before it) writes only the output: quantizing it
    adds a Q/DQ pair over the largest tensor and saves no arithmetic, so it stays float; a
    classifier ends in a Gemm and keeps every node quantized (``float_tails``)."""
    import onnx
    import torch.nn.functional as F

    from pipeline.export.int8 import float_tails, preprocess, quantize_int8

    class Segmenter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.head = torch.nn.Conv2d(8, 4, 1)
            self.skip = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return F.interpolate(self.head(y) + self.skip(y), size=x.shape[-2:], mode="bilinear")

    classifier = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 5),
    )  # fmt: skip
    x, samples = torch.randn(2, 3, 16, 16), torch.randn(8, 3, 16, 16).numpy()
    for name, model, ends in (("seg", Segmenter(), ["Add", "Resize"]), ("cls", classifier, [])):
        fp32 = export_onnx(model.eval(), x, tmp_path / f"{name}.onnx", simplify=False)
        prepared = preprocess(fp32, tmp_path / f"{name}.pre.onnx")
        nodes = {n.name: n.op_type for n in onnx.load(str(prepared)).graph.node}
        assert sorted(nodes[t] for t in float_tails(prepared)) == ends
        done = quantize_int8(prepared, tmp_path / f"{name}.q.onnx", samples,
                             Int8Options(calibration_samples=8))  # fmt: skip
        graph = onnx.load(str(done.path)).graph
        producer = {o: n.op_type for n in graph.node for o in n.output}
        assert producer[graph.output[0].name] == ("Resize" if ends else "DequantizeLinear")
        assert done.settings()["float_tail_nodes"] == list(done.float_tails)
