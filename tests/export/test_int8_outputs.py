"""INT8 of a graph with several outputs (``pipeline.export.int8_outputs``): outputs with a class
axis at position 1 are judged by agreement, the others element-wise under the int8 policy, each
sensitive only if the wrong INT8 model would have failed it; the worst output decides and is
named. Before, only the graph's first output was judged (``run_onnx(...)[0]``): a wrong box head
behind a right class map passed."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.export.int8_outputs import decision_outputs, judge_outputs_int8

N, CLASSES = 32, 4
RNG = np.random.default_rng(0)
SEG = RNG.standard_normal((N, CLASSES, 6, 6))  # a segmenter's class map
BOXES = RNG.standard_normal((N, 8, 4)) * 50  # box regressions: no class axis


def _judge(got: dict, wrong: dict, labels=None):
    reference = {"out": SEG, "boxes": BOXES}
    return judge_outputs_int8(
        "onnx-int8", "m.int8.onnx", (reference, got, wrong), labels, wrong_model="scales x2",
        max_drop=0.5, classes=CLASSES,
    )  # fmt: skip


def _wrong() -> dict:
    return {"out": SEG[:, ::-1].copy(), "boxes": BOXES * 2.0}  # decisions flipped, boxes 2x


def test_decisions_by_agreement_and_the_rest_element_wise():
    near = {"out": SEG + 1e-3, "boxes": BOXES + 0.5}  # within 10% of the boxes' scale
    check = _judge(near, _wrong())
    assert check.verdict == "ok", check.line()
    assert set(check.outputs) == {"out", "boxes"}
    assert "measured" in check.outputs["out"]  # an agreement check
    assert check.outputs["boxes"]["precision"] == "int8" and "max_abs_err" in check.outputs["boxes"]


def test_a_wrong_box_output_fails_though_the_class_map_agrees():
    got = {"out": SEG, "boxes": BOXES * 1.5}
    check = _judge(got, _wrong())
    assert check.verdict == "failed" and check.output == "boxes", check.line()
    assert check.cause.startswith("output 'boxes':")


def test_a_lost_decision_fails_naming_the_class_map():
    got = {"out": -SEG, "boxes": BOXES}
    check = _judge(got, _wrong())
    assert check.verdict == "failed" and check.output == "out", check.line()


def test_an_output_the_wrong_model_leaves_alone_is_insensitive():
    wrong = {"out": _wrong()["out"], "boxes": BOXES + 1.0}  # a fault this output cannot show
    check = _judge({"out": SEG, "boxes": BOXES}, wrong)
    assert check.verdict == "insensitive" and check.output == "boxes", check.line()


def test_labels_count_only_for_outputs_of_their_shape():
    labels = SEG.argmax(1)  # per pixel: [N, 6, 6]
    check = _judge({"out": SEG, "boxes": BOXES}, _wrong(), labels)
    assert check.outputs["out"]["measured"]["labelled"] is True
    flat = RNG.integers(0, CLASSES, N)  # per image: not this map's shape
    check = _judge({"out": SEG, "boxes": BOXES}, _wrong(), flat)
    assert check.outputs["out"]["measured"]["labelled"] is False


def test_which_outputs_are_decisions():
    assert decision_outputs({"features": BOXES}, None) == ["features"]  # one output: as before
    several = {"out": SEG, "aux": SEG, "features": np.zeros((N, 16, 6, 6)), "boxes": BOXES}
    assert decision_outputs(several, CLASSES) == ["out", "aux"]
    assert decision_outputs(several, None) == []


def test_export_int8_judges_every_output_of_a_real_graph(tmp_path):
    from pipeline.data.calibration import Int8Samples
    from pipeline.export.int8 import Int8Options
    from pipeline.export.int8_export import Int8Settings, export_int8
    from pipeline.export.onnx import export_onnx
    from pipeline.fold.batchnorm import fold_bn
    from tests.core.multi_output_models import dict_net

    model = dict_net(CLASSES)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 3, 32, 32, generator=g).numpy()
    fp32 = export_onnx(fold_bn(model, torch.from_numpy(x[:8]))[0], torch.from_numpy(x[:2]),
                       tmp_path / "m.onnx")  # fmt: skip
    samples = Int8Samples(x[:32], x[32:64], None, x[64:], None)
    done = export_int8(
        fp32, tmp_path / "m.int8.onnx", samples, Int8Settings(Int8Options(calibration_samples=32)),
        classes=CLASSES,
    )  # fmt: skip
    assert set(done.check.outputs) == {"head0", "head1"}
    assert "measured" in done.check.outputs["head0"]  # [N, 4, 32, 32]: a class map
    assert "measured" not in done.check.outputs["head1"]  # [N, 3, 8, 8]: element-wise
    assert done.record()["path"] == "m.int8.onnx"
