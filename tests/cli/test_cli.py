import json

import pytest
import torch

from pipeline.cli.main import main


def test_unknown_config_key_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "-c", "configs/demo.yaml", "--set", "nonsense.key=1", "--out", str(out)])
    assert code == 2
    assert "valid keys" in capsys.readouterr().err
    assert not out.exists()


def test_prune_then_export_a_torchvision_model(tmp_path, capsys):
    out = tmp_path / "r18"
    assert (
        main(
            [
                "prune",
                "--model",
                "torchvision:resnet18",
                "--input-shape",
                "1,3,64,64",
                "--ratio",
                "0.5",
                "--scope",
                "layer",  # untrained: its tied BN scales give a global ratio no ranking
                "--num-classes",
                "10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["after"] < 0.6 * report["params"]["before"]
    assert report["macs"]["after"] < report["macs"]["before"]
    assert report["barriers"] == []
    assert main(["export", str(out)]) == 0
    assert "-> ok" in capsys.readouterr().out


def test_a_model_without_batchnorm_prunes_per_layer_and_a_global_cut_exits_2(tmp_path, capsys):
    """No BN to rank globally: the default cut is refused naming --scope layer; per layer, its
    channels are ranked by filter norm, removed and the export verified (SqueezeNet; SSD300's
    VGG was refused outright before)."""
    model = ["--model", "torchvision:squeezenet1_1", "--input-shape", "1,3,64,64"]
    assert main(["prune", *model, "--out", str(tmp_path / "global")]) == 2
    err = capsys.readouterr().err
    assert "SqueezeNet has no BatchNorm layer" in err and "--scope layer --ratio" in err
    assert not (tmp_path / "global").exists()
    out = tmp_path / "layer"
    assert main(["prune", *model, "--ratio", "0.3", "--scope", "layer", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["macs"]["after"] < 0.8 * report["macs"]["before"]
    assert main(["export", str(out), "--out", str(tmp_path / "release")]) == 0
    assert "model.onnx: fp32" in capsys.readouterr().out


def test_bad_input_shape_exits_2(tmp_path, capsys):
    args = ["prune", "--model", "torchvision:resnet18", "--input-shape", "3,64"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "--input-shape: expected N,C,H,W" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_user_factory(tmp_path):
    code = main(
        [
            "prune",
            "--model",
            "tests.conftest:tiny_net_random_bn",
            "--input-shape",
            "1,3,16,16",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert torch.load(tmp_path / "model.pt", weights_only=True)
    assert (tmp_path / "shapes.json").is_file() and not (tmp_path / "manifest.json").exists()


def test_layer_scope_prunes_the_bn_less_classifier_layer(tmp_path, capsys):
    """mobilenet_v3_small's hidden Linear(576, 1024) has no BN: only --scope layer prunes it.

    Untrained, its BN scales all tie, so the global case cuts at a threshold above them all
    (a global ratio would be refused for want of a ranking)."""
    widths = {}
    for scope, rule in (("global", ["--threshold", "1.5"]), ("layer", [])):
        out = tmp_path / scope
        args = ["--model", "torchvision:mobilenet_v3_small", "--input-shape", "1,3,64,64", *rule]
        assert main(["prune", *args, "--scope", scope, "--out", str(out)]) == 0
        state = torch.load(out / "model.pt", weights_only=True)
        widths[scope] = state["classifier.0.weight"].shape[0]
    assert widths == {"global": 1024, "layer": 512}
    assert main(["export", str(tmp_path / "layer")]) == 0
    assert "-> ok" in capsys.readouterr().out


def test_quiet_and_verbose_work_before_and_after_the_subcommand(tmp_path, monkeypatch):
    """`recede run -q ...` exited 2 ("unrecognized arguments: -q"): only `recede -q run` worked."""
    import logging

    import pipeline.core.progress
    from pipeline.cli.main import build_parser

    parser = build_parser()
    for argv in (["-q", "-v", "run"], ["run", "-q", "-v"], ["-q", "run", "-v"], ["-v", "run", "-q"]):
        args = parser.parse_args(argv)
        assert (args.quiet, args.verbose) == (True, True), argv
    args = parser.parse_args(["run"])
    assert (args.quiet, args.verbose) == (False, False)
    seen = []
    monkeypatch.setattr(pipeline.core.progress, "set_quiet", seen.append)
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: seen.append(kw["level"]))
    TINY = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]
    assert main(["prune", "-q", "-v", *TINY, "--out", str(tmp_path / "p")]) == 0
    assert seen == [True, logging.DEBUG]


@pytest.mark.parametrize(("module", "bug"), [("pipeline.export.verify", True), ("onnx", False)])
def test_an_import_error_is_the_users_only_for_a_missing_package(module, bug, monkeypatch, capsys):
    """A name that moved inside recede once exited 2 ("error: cannot import name ...") as if the
    input were bad; it is a bug and raises. A missing optional package stays exit 2."""
    import pipeline.cli.main as cli

    def broken(args):
        """Inspect, broken (the parser reads a command's help from its docstring)."""
        raise ImportError(f"cannot import name 'x' from {module!r}", name=module)

    monkeypatch.setitem(cli.COMMANDS, "inspect", broken)
    argv = ["inspect", "--model", "vgg", "--input-shape", "1,3,32,32"]
    if bug:
        with pytest.raises(ImportError, match="pipeline.export.verify"):
            main(argv)
    else:
        assert main(argv) == 2
        assert "cannot import name 'x' from 'onnx'" in capsys.readouterr().err
