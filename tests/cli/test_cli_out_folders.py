"""An ``--out`` that cannot be swapped as a whole is refused before any work, exit 2 naming
``--out``, with nothing left on disk; a refused, failed or interrupted command leaves no
``.partial``, no lock and no folder it created on the way to ``--out``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import pipeline.core.output_folders
from pipeline.cli.main import main
from tests.cli.test_cli_bad_inputs import TINY, assert_refused, snapshot


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("src") / "pruned"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    return out


def _commands(out: Path, pruned: Path) -> dict[str, list[str]]:
    return {
        "prune": ["prune", *TINY, "--out", str(out)],
        "export": ["export", str(pruned), "--out", str(out)],
        "train": ["train", "--set", "train.epochs=1", "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["prune", "export", "train"])
def test_out_that_is_a_symlink_is_refused(command, pruned, tmp_path, capsys):
    """A symlinked --out was replaced by a folder, its link left hidden as .current.old.*."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "current").symlink_to(tmp_path / "v1")
    argv = _commands(tmp_path / "current", pruned)[command]
    err = assert_refused(tmp_path, capsys, argv, f"--out {tmp_path / 'current'} is a symbolic link")
    assert f"pass --out {tmp_path / 'v1'}" in err


@pytest.mark.parametrize("command", ["prune", "export", "train"])
def test_out_that_is_a_mount_point_is_refused(command, pruned, tmp_path, capsys, monkeypatch):
    """The export ran, then the swap failed with an OSError traceback, leaving .vol.partial."""
    vol = tmp_path / "vol"
    vol.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(vol) or real(p))
    argv = _commands(vol, pruned)[command]
    assert_refused(tmp_path, capsys, argv, f"--out {vol} is a mount point")


def test_out_on_a_real_mount_point_is_refused(pruned, tmp_path, capsys):
    vol = tmp_path / "vol"
    vol.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "none", str(vol)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        argv = ["export", str(pruned), "--out", str(vol)]
        assert_refused(tmp_path, capsys, argv, f"--out {vol} is a mount point")
    finally:
        subprocess.run(["umount", str(vol)], check=True)


@pytest.mark.parametrize("command", ["prune", "export", "train"])
def test_writable_out_in_a_parent_that_takes_no_files(
    command, pruned, tmp_path, capsys, monkeypatch
):
    """The lock and the new folder go beside --out: a raw `[Errno 13] ... .app.lock` before."""
    parent = tmp_path / "ro"
    (parent / "app").mkdir(parents=True)
    real = pipeline.core.output_folders._unwritable_reason
    monkeypatch.setattr(  # root writes anywhere: make the parent report itself read-only
        pipeline.core.output_folders,
        "_unwritable_reason",
        lambda folder: "permission denied" if folder == parent else real(folder),
    )
    argv = _commands(parent / "app", pruned)[command]
    err = assert_refused(
        tmp_path, capsys, argv, f"--out {parent / 'app'}: cannot write in {parent}"
    )
    assert ".app.partial" in err and "[Errno" not in err


def test_in_place_export_of_a_symlinked_folder_is_refused(pruned, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(pruned)
    before = snapshot(pruned.parent)
    assert_refused(tmp_path, capsys, ["export", str(link)], f"DIR {link} is a symbolic link")
    assert snapshot(pruned.parent) == before


def test_export_into_a_model_folder_recede_did_not_mark_is_refused(pruned, tmp_path, capsys):
    """A model folder saved from Python (no .recede.json) is protected like one recede wrote."""
    from pipeline.models.checkpoint import load_pruned, save_pruned

    model, spec = load_pruned(pruned)
    mine = save_pruned(model, tmp_path / "mine", spec=spec)
    argv = ["export", str(mine), "--out", str(mine / "rel")]
    assert_refused(tmp_path, capsys, argv, f"--out {mine / 'rel'} is inside the model folder")


def test_a_failed_verification_leaves_no_folders_on_the_way_to_out(
    pruned, tmp_path, capsys, monkeypatch
):
    """A failed export into a new nested --out left the empty folders it created."""
    import pipeline.export.release
    from pipeline.core.checks import VerificationError

    def fails(*args, **kwargs):
        raise VerificationError("model.onnx: max error 1.0 > bound 1e-4")

    monkeypatch.setattr(pipeline.export.release, "export_release", fails)
    argv = ["export", str(pruned), "--out", str(tmp_path / "a" / "b" / "rel")]
    assert_refused(tmp_path, capsys, argv, "verification failed", code=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("step", ["index", "swap"])
def test_ctrl_c_while_finishing_a_prune_leaves_nothing(step, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the folder's index was written left .o.partial and offered a --resume that
    prune does not have."""
    import pipeline.core.output_folders as folders

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    target = {"index": "_write_index", "swap": "swap_into_place"}[step]
    monkeypatch.setattr(folders, target, interrupted)
    err = assert_refused(
        tmp_path,
        capsys,
        ["prune", *TINY, "--out", str(tmp_path / "o")],
        "recede prune: interrupted; nothing was written",
        code=130,
        absent=("--resume",),
    )
    assert err.count("\n") == 1, err


def test_a_prune_over_an_existing_folder_interrupted_keeps_it(tmp_path, capsys, monkeypatch):
    import pipeline.core.output_folders as folders

    out = tmp_path / "o"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(folders, "_write_index", interrupted)
    assert_refused(
        tmp_path, capsys, ["prune", *TINY, "--out", str(out)], "interrupted", code=130,
        absent=("--resume",),
    )  # fmt: skip
