"""The README's release script runs as written: twice exit 0, then exit 1 on an injected slowdown.

The script is taken from README.md by its heading ("## Release build"), so the text a user copies
is the text tested. It runs in a fresh folder (as a fresh clone would), with `recede` meaning this
checkout's CLI and ``RUN`` pointing at a tiny pruned model instead of the demo's run (the
script's own ``recede run`` fallback would train the demo for minutes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.main import main
from tests.conftest import finish_or_skip

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Release build"


def release_script() -> str:
    """The first bash block under the README's release heading."""
    text = (ROOT / "README.md").read_text()
    assert HEADING in text, f"README.md lost its {HEADING!r} section"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, f"README.md's {HEADING!r} section lost its bash block"
    return match.group(1)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh working folder, a tiny pruned model as ``$RUN/pruned`` and an environment whose
    ``recede`` is this checkout's."""
    pytest.importorskip("onnxruntime")
    work = tmp_path_factory.mktemp("clone")
    tiny = ["--model", "tests.conftest:tiny_net_random_bn", "--input-shape", "1,3,16,16"]
    assert main(["prune", *tiny, "--out", str(work / "run" / "pruned")]) == 0
    shim = work / "bin" / "recede"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pipeline.cli "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "RUN": str(work / "run")}
    env["PYTHONPATH"] = f"{ROOT}:{env.get('PYTHONPATH', '')}"
    return work, env


def run_script(children, work: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = children(
        ["bash", "-c", release_script()],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return finish_or_skip(proc, "the README release script")


@pytest.mark.slow  # about 90 s on a shared 2-core machine: ten CLI processes; `make test-slow`
def test_the_release_script_passes_twice_and_fails_on_an_injected_slowdown(clone, children) -> None:
    work, env = clone
    for attempt in ("first", "second"):
        code, err = run_script(children, work, env)
        assert code == 0, f"{attempt} run: exit {code}\n{err}"
    assert (work / "bench" / "baseline.json").is_file() and (work / "release").is_dir()
    report = json.loads((work / "bench" / "release.json").read_text())
    assert report["gate"]["compared"] > 0 and report["gate"]["failing"] == []
    assert [m["label"] for m in report["models"]][0] == "dense"  # the release vs its dense model
    assert main(["bench", str(work / "release"), "--runs", "5", "--batches", "1"]) == 0

    baseline = work / "bench" / "baseline.json"
    saved = json.loads(baseline.read_text())
    for row in saved["rows"]:  # the baseline 3x faster: the release now looks 3x slower
        for key in ("p50_ms", "p90_ms", "p99_ms"):
            row[key] /= 3
        row["blocks_ms"] = [b / 3 for b in row["blocks_ms"]]
    baseline.write_text(json.dumps(saved))
    code, err = run_script(children, work, env)
    assert code == 1, f"exit {code}\n{err}"
    assert "slower than 1.2x the baseline" in err and "measuring again" in err
