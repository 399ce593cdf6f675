"""The README's own-loop example runs as written and reaches its budget."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- own-loop example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its own-loop example block"
    return match.group(1)


def test_example_is_short():
    assert len(_example().strip().splitlines()) <= 26


def test_own_loop_example_reaches_the_target(capsys):
    scope: dict = {}
    exec(compile(_example(), str(README), "exec"), scope)
    progress = scope["pol"].progress()
    assert progress.wanted == 0.5
    assert abs(progress.receded - 0.5) <= 0.02
    pruned = scope["pruned"]
    achieved = len(pruned.plan.dropped_groups) / len(pruned.importances)
    assert abs(achieved - 0.5) <= 0.02
    assert "Progress(step=" in capsys.readouterr().out
