"""No silent ties: a global ratio cut inside a wide run of equal importances is refused (exit 2)."""

from __future__ import annotations

import pytest
import torch

from pipeline.cli.main import main
from pipeline.config import PruneConfig
from pipeline.prune.plan import TiedImportanceError
from pipeline.prune.stage import prune_model
from tests.conftest import TinyNet, randomise_bn_

TINY = ["--model", "tests.conftest:TinyNet", "--input-shape", "1,3,16,16", "--num-classes", "5"]


def test_python_api_refuses_an_untrained_model_and_layer_scope_prunes_it() -> None:
    model, x = TinyNet().eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(TiedImportanceError, match="prune.scope: layer"):
        prune_model(model, x, PruneConfig(threshold="ratio", ratio=0.5))
    layered = prune_model(model, x, PruneConfig(threshold="ratio", ratio=0.5, scope="layer"))
    assert layered.plan.dropped_groups
    trained_like = randomise_bn_(TinyNet()).eval()  # distinct importances: the ranking decides
    ranked = prune_model(trained_like, x, PruneConfig(threshold="ratio", ratio=0.5))
    assert ranked.plan.dropped_groups or ranked.held_back  # chosen (kept if only approximate)


def test_cli_untrained_global_ratio_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "pruned"
    assert main(["prune", *TINY, "--ratio", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--scope layer" in err and "no ranking signal" in err
    assert list(tmp_path.iterdir()) == []  # no --out, no .partial staging folder
    assert main(["prune", *TINY, "--ratio", "0.5", "--scope", "layer", "--out", str(out)]) == 0
