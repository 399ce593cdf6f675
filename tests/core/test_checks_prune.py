"""`recede prune` verifies its removal on a batch that can see a wrong model and enforces the
verdict as `recede export` does (issue 31 item 10: `prune --from DIR` checked one sample, so its
removal check was always `insensitive`, ignored, and missing from report.json)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import torch

import pipeline.prune.remove as remove
from pipeline.cli.main import main

TINY = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]
NEAR = ["--model", "tests.conftest:NearConstantNet", "--input-shape", "1,3,16,16"]
BLIND = ["--model", "tests.fold.test_fold_twin:untrained_blind", "--input-shape", "1,3,8,8"]


def _removal(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    (check,) = report["verification"]
    assert check["what"] == "removal"
    return check


def test_prune_from_a_folder_checks_the_removal_on_several_samples(tmp_path, capsys) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["prune", *TINY, "--ratio", "0.25", "--out", str(first)]) == 0
    assert main(["prune", "--from", str(first), "--ratio", "0.25", "--out", str(second)]) == 0
    check = _removal(second)
    assert check["verdict"] == "ok" and check["batch_sizes"] == [4]
    assert check["input_effect"] > 2 * check["bound"] > 0
    assert "removal: fp64" in capsys.readouterr().out


def test_an_insensitive_removal_exits_1_unless_accepted(tmp_path, capsys) -> None:
    out = tmp_path / "pruned"
    assert main(["prune", *NEAR, "--ratio", "0.25", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "removal (in memory) could not be verified" in err and "--accept-insensitive" in err
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(["prune", *NEAR, "--ratio", "0.25", "--out", str(out), "--accept-insensitive"]) == 0
    report = json.loads((out / "report.json").read_text())
    (accepted,) = report["accepted_insensitive"]
    assert accepted["what"] == "removal" and "moves by only" in accepted["why"]
    assert report["verification"][0]["verdict"] == "insensitive"


def test_an_untrained_models_removal_is_verified_on_its_twin(tmp_path) -> None:
    out = tmp_path / "pruned"
    assert main(["prune", *BLIND, "--scope", "layer", "--out", str(out)]) == 0
    check = _removal(out)
    assert check["verdict"] == "twin-ok" and check["twin"]["verdict"] == "ok"


def test_a_wrong_removal_exits_1_and_writes_nothing(tmp_path, capsys) -> None:
    """One kept filter of the pruned model off by 1% (10^4 bounds): failed, even for an
    untrained model whose own removal check could not see it, and --accept-insensitive does
    not ship it."""
    real = remove.apply_plan_

    def wrong(model, plan):
        pruned = real(model, plan)
        with torch.no_grad():
            next(m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)).weight.mul_(1.01)
        return pruned

    for argv in (TINY, BLIND):
        out = tmp_path / "pruned"
        with mock.patch.object(remove, "apply_plan_", wrong):
            code = main(
                ["prune", *argv, "--scope", "layer", "--out", str(out), "--accept-insensitive"]
            )
        assert code == 1 and "verification failed" in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.iterdir())
