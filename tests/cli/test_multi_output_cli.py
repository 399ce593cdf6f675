"""The command line on models with several outputs: ``prune``, ``inspect``, ``export`` and
``bench`` take a dict, a tuple or a nested return; something that is not a tree of tensors is
refused with exit 2 before any work. Before, ``recede prune`` on a dict or tuple output ended in
a traceback (``'tuple' object has no attribute 'numpy'``)."""

from __future__ import annotations

import json

import onnx
import pytest

from pipeline.cli.main import main
from tests.core.multi_output_models import ODD, OddOutputs

SHAPE = ["--input-shape", "1,3,32,32", "--num-classes", "4"]
FACTORIES = "tests.core.multi_output_models"
LEAVES = {
    "dict_net": ["head0", "head1"],
    "tuple_net": ["output.0", "output.1", "output.2"],
    "nested_net": ["heads.0", "last.0", "last.1.features"],
}


@pytest.mark.parametrize("factory", sorted(LEAVES))
def test_prune_inspect_export_and_bench_every_output(factory, tmp_path, capsys):
    model = ["--model", f"{FACTORIES}:{factory}", *SHAPE]
    out = tmp_path / "pruned"
    assert main(["prune", *model, "--ratio", "0.3", "--scope", "layer", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["macs"]["after"] < report["macs"]["before"]
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"outputs: {LEAVES[factory][0]} [1, 4, 32, 32]" in shown, shown
    release = tmp_path / "release"
    assert main(["export", str(out), "--out", str(release)]) == 0
    graph = onnx.load(str(release / "model.onnx")).graph
    assert [o.name for o in graph.output] == LEAVES[factory]
    manifest = json.loads((release / "manifest.json").read_text())
    check = next(c for c in manifest["export"]["verification"] if c["what"] == "onnx")
    assert check["verdict"] == "ok" and sorted(check["outputs"]) == sorted(LEAVES[factory])
    quick = ["--runs", "5", "--warmup", "1", "--batches", "1", "--threads", "1"]
    assert main(["bench", str(out), str(release / "model.onnx"), *quick]) == 0
    assert "| onnxruntime | cpu | model |" in capsys.readouterr().out


def test_an_output_that_is_not_a_tensor_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", f"{FACTORIES}:string_output_net", *SHAPE, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "output 'note' is a str, not a tensor" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("odd", ODD)
def test_an_awkward_output_never_crashes_a_command(odd, tmp_path, monkeypatch, capsys):
    """The class: any tree of tensors beside a model's map (a tensor returned twice, an integer
    map, a 0-d tensor, numeric keys, the input itself, a constant). Each command exits 0, or 1
    with a verification verdict, or 2 with a message; never an exception out of ``main``."""
    import tests.core.multi_output_models as factories

    monkeypatch.setattr(factories, "odd_output_net", lambda num_classes=4: OddOutputs(odd, num_classes).eval())
    out, release = tmp_path / "pruned", tmp_path / "release"
    model = ["--model", f"{FACTORIES}:odd_output_net", *SHAPE]
    rc = main(["prune", *model, "--ratio", "0.3", "--scope", "layer", "--out", str(out)])
    _judged(rc, out, capsys)
    if rc != 0:
        return
    _judged(main(["inspect", str(out)]), None, capsys)
    rc = main(["export", str(out), "--out", str(release)])
    _judged(rc, release, capsys)
    if rc == 0:
        quick = ["--runs", "3", "--warmup", "1", "--batches", "1", "--threads", "1"]
        _judged(main(["bench", str(out), str(release / "model.onnx"), *quick]), None, capsys)


def _judged(rc: int, out, capsys) -> None:
    err = capsys.readouterr().err
    assert rc in (0, 1, 2) and "Traceback" not in err, err
    if rc == 1:
        assert "verification failed" in err or "insensitive" in err, err
    if rc == 2:
        assert "recede" in err and (out is None or not out.exists()), err
