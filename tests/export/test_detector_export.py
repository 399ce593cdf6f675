"""The whole detector beside its trunk (``pipeline.export.detector``): detections whose number
differs between runtimes are compared where they can be, ties in either order, and a wrong box,
score or label still fails, naming the output. The end-to-end test is in the default suite (31 s):
the untrained detector's twin path broke once with nothing else to see it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from pipeline.core.output_checks import judge_outputs
from pipeline.export.detector import TOLERANCE, comparable, conditioned

SCORES = np.array([0.9, 0.8, 0.8, 0.5, 0.3])  # rows 1 and 2 tie
BOXES = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40], [1, 2, 3, 4], [9, 9, 12, 12]])
LABELS = np.array([1, 2, 2, 3, 1])


def _detections(order=slice(None), n=5, boxes=BOXES, labels=LABELS) -> dict:
    return {
        "output.0.boxes": boxes[order][:n].astype(float),
        "output.0.scores": SCORES[order][:n],
        "output.0.labels": labels[order][:n].astype(float),
    }


def _judged(want: dict, got: dict):
    want, got, note = comparable(want, got)
    return judge_outputs("onnx-detector", [(want, got)], TOLERANCE), note


def test_tied_detections_in_the_other_order_agree():
    swapped = _detections(order=[0, 2, 1, 3, 4])
    check, note = _judged(_detections(), swapped)
    assert check.verdict == "ok", check.line()
    assert note == "5 detections, compared 4"  # the lowest may tie with one beyond the cut


def test_a_count_cut_at_a_tie_compares_what_both_kept_and_says_so():
    check, note = _judged(_detections(), _detections(n=4))  # ONNX cut the last one
    assert check.verdict == "ok", check.line()
    assert note == "4/5 detections, compared 3"  # the 4th scores the lowest both kept


@pytest.mark.parametrize("field", ["boxes", "labels"])
def test_a_wrong_detection_fails_naming_its_output(field):
    wrong = BOXES.copy() if field == "boxes" else LABELS.copy()
    wrong[1] = wrong[1] + 3
    got = _detections(**{field: wrong})
    check, _ = _judged(_detections(), got)
    assert check.verdict == "failed" and check.output == f"output.0.{field}", check.line()


class _ListModel(torch.nn.Module):
    """A detector's calling convention (a list of images) around convs, a BN and linears whose
    outputs are far from unit spread; the last conv runs twice, as a head shared by levels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(8, 5)
        with torch.no_grad():
            self.stem.weight.mul_(40.0)
            self.head.bias.add_(7.0)
            self.fc.weight.mul_(0.01)

    def forward(self, images: list) -> torch.Tensor:
        x = self.head(self.head(torch.relu(self.bn(self.stem(torch.stack(images))))))
        return self.fc(x.mean(dim=(2, 3)))


def _first_outputs(model: torch.nn.Module, batch: list) -> dict:
    outs: dict = {}
    hooks = [
        m.register_forward_hook(lambda mod, _, out, n=n: outs.setdefault(n, out))
        for n, m in model.named_children() if n != "bn"
    ]  # fmt: skip
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    return outs


def test_the_conditioned_twin_spreads_every_layer_to_unit_std_and_calibrates_its_bns():
    batch = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    model = _ListModel().eval()
    before = _first_outputs(model, batch)
    assert any(abs(float(o.std()) - 1) > 0.5 for o in before.values())  # the test can fail
    conditioned(model, batch)
    assert not model.training and not model.bn.training
    for name, out in _first_outputs(model, batch).items():
        assert float(out.std()) == pytest.approx(1.0, rel=5e-2), name  # eval BN: unbiased var
        assert abs(float(out.mean())) < 5e-2, name  # every layer here has a bias
    stem = model.stem(torch.stack(batch))
    assert torch.allclose(model.bn.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)


def test_prune_and_export_a_detector_with_its_whole_pipeline(tmp_path, capsys):
    from pipeline.cli.main import main

    out = tmp_path / "pruned"
    model = ["--model", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "--num-classes", "91"]
    argv = ["prune", *model, "--input-shape", "1,3,128,128", "--ratio", "0.3", "--scope", "layer"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept whole: detector.roi_heads:" in printed
    assert "detector.roi_heads" in json.loads((out / "report.json").read_text())["kept_whole"]
    assert main(["export", str(out), "--out", str(tmp_path / "release")]) == 0
    release = tmp_path / "release"
    names = [o.name for o in onnx.load(str(release / "detector.onnx")).graph.output]
    assert names == ["output.0.boxes", "output.0.labels", "output.0.scores"]
    checks = json.loads((release / "manifest.json").read_text())["export"]["verification"]
    verdicts = {c["what"]: c["verdict"] for c in checks}
    # untrained: no detection passes its score threshold, so only the twin can be compared
    assert verdicts["onnx-detector"] == "twin-ok" and verdicts["onnx"] in ("ok", "twin-ok")


@pytest.mark.parametrize("verdict", ["ok", "twin-ok", "failed", "insensitive"])
def test_a_whole_detector_that_does_not_verify_is_withheld_and_named(tmp_path, monkeypatch, verdict):
    """``detector.onnx`` ships only verified; otherwise it is deleted, warned about and listed
    in ``export.withheld`` with its check, and the verified trunk ships (release.py)."""
    from dataclasses import replace

    from pipeline.core.checks import Check
    from pipeline.export import detector as whole
    from pipeline.export.release import ReleaseOptions, export_release
    from pipeline.models.detection import build_detector

    def fake_export(trunk, size, out, *, opset):
        (out / whole.FILE).write_bytes(b"graph")
        check = Check(what=whole.WHAT, path=whole.FILE, precision="fp32", max_abs_err=1.0,
                      bound=1e-3, max_rel_err=0.5, verdict=verdict, input_effect=1.0)  # fmt: skip
        return replace(check, cause="" if verdict in ("ok", "twin-ok") else "boxes differ")

    monkeypatch.setattr(whole, "export_detector", fake_export)
    trunk = build_detector("ssdlite320_mobilenet_v3_large", 3).eval()
    release = export_release(trunk, (3, 64, 64), tmp_path, ReleaseOptions(simplify=False))
    shipped = verdict in ("ok", "twin-ok")
    assert (tmp_path / whole.FILE).exists() == shipped
    assert [c.what for c in release.checks] == ["onnx", *([whole.WHAT] if shipped else [])]
    withheld = release.details["withheld"]
    assert [w["verdict"] for w in withheld] == ([] if shipped else [verdict])
    if not shipped:
        assert withheld[0]["withheld"].startswith("detector.onnx withheld: its check is")
        assert withheld[0]["cause"] == "boxes differ"
