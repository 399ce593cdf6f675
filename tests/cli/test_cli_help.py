"""CLI conventions: every flag has help with its default, epilogs name the exit codes, --version,
the input folder as positional DIR with --from as its alias, and the per-layer tables."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed

import pytest

from pipeline import __version__
from pipeline.cli.args import help_text
from pipeline.cli.main import build_parser, main

TINY = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]
TINY_OUT = TINY + ["--num-classes", "5"]
HEAD = "fc"  # resnet20's classifier


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public list of a parser's actions
        if action.nargs == argparse.PARSER:
            return dict(action.choices)
    return {}


def help_problems(parser: argparse.ArgumentParser, name: str = "recede") -> list[str]:
    """Every action of ``parser`` and its subparsers without help, or whose optional value's
    help (as shown) does not state its default; plus parsers whose epilog lacks exit codes."""
    problems = [] if "130" in (parser.epilog or "") else [f"{name}: no exit codes in the epilog"]
    for action in parser._actions:
        if action.dest in ("help", "version") or action.nargs == argparse.PARSER:
            continue
        label = f"{name} {'/'.join(action.option_strings) or action.dest}"
        optional = not action.required if action.option_strings else action.nargs in ("?", "*")
        if not (action.help or "").strip():
            problems.append(f"{label}: no help")
        elif optional and "default" not in help_text(action):
            problems.append(f"{label}: help does not state the default")
    for sub_name, sub in subparsers(parser).items():
        problems += help_problems(sub, f"{name} {sub_name}")
    return problems


def test_every_flag_of_every_subcommand_has_help_and_default() -> None:
    parser = build_parser()
    assert set(subparsers(parser)) == {"run", "train", "prune", "export", "bench", "inspect"}
    assert help_problems(parser) == []


def test_the_checker_catches_a_flag_without_help_or_default() -> None:
    toy = argparse.ArgumentParser(epilog="exit codes: 0 1 2 130")
    sub = toy.add_subparsers().add_parser("go", epilog="exit codes: 0 1 2 130")
    sub.add_argument("--silent", type=int, default=3)
    sub.add_argument("--vague", help="some value")  # default None, not explained
    sub.add_argument("--fine", type=int, default=3, help="a value")
    assert help_problems(toy) == [
        "recede go --silent: no help",
        "recede go --vague: help does not state the default",
    ]
    assert help_problems(argparse.ArgumentParser()) == ["recede: no exit codes in the epilog"]


def test_help_shows_defaults_exit_codes_and_the_repeatable_set(capsys) -> None:
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: runs/train)" in out and "(default: off)" in out
    assert "130" in out and "repeatable" in out and "-c YAML is optional" in out
    assert main(["bench", "--help"]) == 0
    assert "(default: 1 32)" in capsys.readouterr().out
    flag = argparse.Action(["--n"], "n", default=7, help="a number")
    assert help_text(flag) == "a number (default: 7)"
    assert help_text(argparse.Action(["--m"], "m", default=7, help="(default: seven)")) == (
        "(default: seven)"
    )


def test_version(capsys) -> None:
    try:
        expected = installed("recede")
    except PackageNotFoundError:
        expected = __version__
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"recede {expected}"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "pruned"
    assert main(["prune", *TINY_OUT, "--out", str(out)]) == 0
    return out


def test_prune_prints_a_per_layer_table_and_a_summary(pruned, capsys, tmp_path) -> None:
    out = tmp_path / "again"
    assert main(["prune", *TINY_OUT, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["layer", "channels", "kept"]
    row = next(line.split() for line in lines if line.startswith("grouped.0 "))
    assert row[1:3] == ["4/8", "50.0%"]  # grouped.0 lost half its output channels
    report = json.loads((out / "report.json").read_text())
    layers = {row["name"]: row for row in report["layers"]}
    assert layers["grouped.0"]["channels"] == [4, 8]
    assert sum(r["after"]["macs"] for r in report["layers"]) <= report["macs"]["after"]
    summary = next(line for line in lines if line.startswith("pruned "))
    assert f"MACs {report['macs']['before'] / 1e3:.3g}K -> " in summary and "% kept" in summary


def test_positional_dir_and_from_alias_are_the_same(pruned, capsys, tmp_path) -> None:
    outputs = []
    for argv in (["inspect", str(pruned)], ["inspect", "--from", str(pruned)]):
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "5 classes" in outputs[0]
    for i, argv in enumerate(([str(pruned)], ["--from", str(pruned)])):
        assert main(["prune", *argv, "--out", str(tmp_path / f"p{i}")]) == 0
    both = ["inspect", str(pruned), "--from", str(tmp_path)]
    assert main(both) == 2
    assert "got the input folder twice" in capsys.readouterr().err


def test_inspect_prints_a_table_and_takes_the_class_count(capsys) -> None:
    assert (
        main(["inspect", "--model", "resnet20", "--input-shape", "1,3,16,16", "--num-classes", "7"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["layer", "kind", "channels", "params", "share", "MACs", "share"]
    head = next(line.split() for line in lines if line.startswith(HEAD + " "))
    assert head[1:4] == ["linear", "7", "455"]  # Linear(64, 7): 448 weights + 7 biases
    assert any("(7 classes, input 1x3x16x16)" in line for line in lines)
