"""A recede output folder holding another one is never replaced silently: ``prune --out DIR``
exits 2 naming the release and leaves it; ``--force`` deletes it with a warning. Writing one
into another (``export DIR --out DIR/rel``) is refused before any work."""

from __future__ import annotations

import logging

import pytest

from pipeline.cli.main import main
from pipeline.core.output_folders import OutputError, check_out_folder, nested_outputs

TINY = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]


def _folder_with_release(tmp_path):
    out = tmp_path / "pruned"
    (out / "rel").mkdir(parents=True)
    (out / ".recede.json").write_text('{"kind": "prune"}')
    (out / "rel" / ".recede.json").write_text('{"kind": "export"}')
    (out / ".half.partial").mkdir()
    (out / ".half.partial" / ".recede.json").write_text('{"kind": "export"}')
    return out


def test_nested_outputs_skips_the_folder_itself_and_unfinished_writes(tmp_path):
    out = _folder_with_release(tmp_path)
    assert nested_outputs(out) == [out / "rel"]


def test_replacing_a_folder_with_a_release_inside_is_refused_unless_forced(tmp_path, caplog):
    out = _folder_with_release(tmp_path)
    with pytest.raises(OutputError, match=r"--out .*holds another recede output folder .*rel"):
        check_out_folder(out, kind="prune", force=False, flag="--out")
    with caplog.at_level(logging.WARNING, logger="pipeline.core.atomic"):
        assert check_out_folder(out, kind="prune", force=True, flag="--out") == out
    assert "rel" in caplog.text and "--force" in caplog.text


def _snapshot(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("where", ["rel", "deeper/still/rel"])
def test_export_into_its_own_model_folder_is_refused(where, tmp_path, capsys):
    """``export DIR --out DIR/rel`` exited 0: re-pruning DIR would delete the release, and
    DIR's file index did not list it. Refused now, naming --out, with nothing created."""
    out = tmp_path / "pruned"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    before, _ = _snapshot(tmp_path), capsys.readouterr()
    assert main(["export", str(out), "--out", str(out / where)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out / where} is inside" in err and f"{out} it exports" in err, err
    assert _snapshot(tmp_path) == before


def test_prune_over_a_folder_holding_a_release_keeps_it(tmp_path, capsys):
    """A release inside a prune folder (written before such nesting was refused, or moved
    there by hand) is never deleted by replacing the folder around it."""
    out = tmp_path / "pruned"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "rel")]) == 0
    (tmp_path / "rel").rename(out / "rel")
    onnx = sorted(p.name for p in (out / "rel").iterdir())
    capsys.readouterr()
    assert main(["prune", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds another recede output folder ({out / 'rel'}" in err, err
    assert sorted(p.name for p in (out / "rel").iterdir()) == onnx


@pytest.mark.parametrize("command", ["prune", "train"])
def test_any_output_inside_another_recede_folder_is_refused(command, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    before, _ = _snapshot(tmp_path), capsys.readouterr()
    argv = {"prune": ["prune", *TINY], "train": ["train"]}[command]
    assert main([*argv, "--out", str(out / "again")]) == 2
    err = capsys.readouterr().err
    assert f"--out {out / 'again'} is inside {out}, a `recede prune` folder" in err, err
    assert _snapshot(tmp_path) == before
