"""The README's commands and examples run as written.

Every ```python block in README.md and docs/*.md runs (on tiny inputs; data is scikit-learn's
digits, which every test machine has). Every command line in a ```bash block is checked without
running anything heavy: ``recede ...`` (also through ``python -m pipeline.cli`` or ``torchrun``)
must parse with the real argparse parser, ``make`` targets must exist in the Makefile, and
``python script.py`` / ``python -m module`` must name a file or module that exists. A command the
checker does not know fails the test, so no line is skipped silently. The tour's own-model
commands (``recede prune``/``export``/``inspect`` on ``my_nets:build``) are cheap enough to run
for real. Decision: blocks in other languages are refused unless marked ``text``, which is how
the CLI synopsis says it is not a command.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

from pipeline.cli.main import build_parser, main
from pipeline.graph.channel_graph import build_channel_graph

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
OWN_LOOP = re.compile(r"<!-- own-loop example -->\n```python\n(.*?)```", re.S)
DENSE_LOOPS = re.compile(r"<!-- \w+ loop -->\n```python\n(.*?)```", re.S)  # tests/train/test_dense_loops.py
OTHER_COMMANDS = {"set", "mkdir"}  # what the release script runs besides recede


def code_blocks(text: str, language: str) -> list[str]:
    """The bodies of the fenced blocks of ``language`` in ``text``, in order."""
    return [body for lang, body in FENCE.findall(text) if lang == language]


def shell_commands(block: str) -> list[list[str]]:
    """Each command of a bash block as argv.

    Backslash continuations are joined, comments dropped, here-document bodies skipped,
    leading ``NAME=value`` environment assignments (``PYTHONPATH=. recede ...``) removed, and a
    ``$NAME`` that an assignment earlier in the block set is replaced by its words (``GATE="..."``
    then ``recede bench $GATE``), so the flags it holds are checked too.
    """
    commands, pending, heredoc, names = [], "", None, {}
    for line in block.splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        marker = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if marker:
            heredoc, line = marker.group(1), line[: marker.start()]
        for argv in _split_lists(shlex.split(line, comments=True)):
            while argv and (assigned := re.fullmatch(r"([A-Za-z_]\w*)=(.*)", argv[0], re.S)):
                names[assigned.group(1)] = shlex.split(assigned.group(2))
                argv.pop(0)
            argv = _expand(argv, names)
            if argv and argv[0] != "[":  # a `[ test ]` guard: the command after || is checked
                commands.append(argv)
    return commands


def _expand(argv: list[str], names: dict[str, list[str]]) -> list[str]:
    """``argv`` with each ``$NAME``/``${NAME}`` the block assigned replaced by its words."""
    out: list[str] = []
    for word in argv:
        key = word[1:].strip("{}") if word.startswith("$") else ""
        out += names.get(key, [word])
    return out


def _split_lists(argv: list[str]) -> list[list[str]]:
    """``a || b && c ; d`` as the commands ``a``, ``b``, ``c``, ``d``."""
    parts: list[list[str]] = [[]]
    for token in argv:
        if token in ("||", "&&", ";"):
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*):", (ROOT / "Makefile").read_text(), re.M))


def recede_problem(args: list[str]) -> str | None:
    """Why ``recede args`` would not parse, or None; argparse's own message is kept."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(args)
    except SystemExit as exit_:
        if exit_.code != 0 or not {"-h", "--help"} & set(args):
            return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue() else "exit"
    return None


def command_problem(argv: list[str]) -> str | None:
    """What is wrong with one README command line, or None when it checks out."""
    name, rest = argv[0], argv[1:]
    if name == "recede":
        return recede_problem(rest)
    if name in ("python", "torchrun") and "-m" in rest:
        module = rest[rest.index("-m") + 1]
        if module in ("pipeline.cli", "pipeline.cli.main"):
            return recede_problem(rest[rest.index("-m") + 2 :])
        return None if importlib.util.find_spec(module) else f"no module {module}"
    if name == "python":
        script = rest[0] if rest else "-"
        return None if script == "-" or (ROOT / script).is_file() else f"no script {script}"
    if name == "make":
        targets = [t for t in rest if not t.startswith("-") and "=" not in t]  # VAR=x: a value
        missing = [t for t in targets if t not in make_targets()]
        return f"no make target {', '.join(missing)}" if missing else None
    if name in OTHER_COMMANDS:
        return None
    return f"unknown command {name!r}: teach tests/test_readme_example.py how to check it"


def problems(text: str) -> list[str]:
    """Every failing command of every bash block of a Markdown text, with its reason."""
    found = []
    for block in code_blocks(text, "bash"):
        for argv in shell_commands(block):
            problem = command_problem(argv)
            if problem:
                found.append(f"{shlex.join(argv)}: {problem}")
    return found


def _example() -> str:
    match = OWN_LOOP.search(README.read_text())
    assert match, "README.md lost its own-loop example block"
    return match.group(1)


def test_example_is_short():
    assert len(_example().strip().splitlines()) <= 26


def test_own_loop_example_reaches_the_target(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_example(), str(README), "exec"), scope)
    progress = scope["pol"].progress()
    assert progress.wanted == 0.5
    assert abs(progress.receded - 0.5) <= 0.02
    # The cut at the receded level, unrounded, drops the target share; the default rounding
    # (prune.round_to 8) only keeps channels back, at most round_to - 1 per layer.
    from pipeline.config import PruneConfig
    from pipeline.prune.stage import prune_model

    model, example, pruned = scope["model"], scope["example"], scope["pruned"]
    exact = prune_model(model.eval(), example, PruneConfig(threshold="auto", round_to=1))
    achieved = len(exact.plan.dropped_groups) / len(exact.importances)
    assert abs(achieved - 0.5) <= 0.02
    rounded = set(pruned.plan.dropped_groups)
    assert rounded <= set(exact.plan.dropped_groups)
    held_back = len(exact.plan.dropped_groups) - len(rounded)
    assert 0 <= held_back <= (PruneConfig().round_to - 1) * len(pruned.plan.layers)
    assert "Progress(step=" in capsys.readouterr().out


def _other_python_blocks() -> list[tuple[str, str]]:
    """(page, code) of every python block except the own-loop ones, which have their own tests."""
    own = {_example(), *(code for page in DOCS for code in DENSE_LOOPS.findall(page.read_text()))}
    return [
        (page.relative_to(ROOT).as_posix(), code)
        for page in PAGES
        for code in code_blocks(page.read_text(), "python")
        if code not in own
    ]


@pytest.mark.parametrize(
    "page,code", _other_python_blocks(), ids=lambda v: v if v.endswith(".md") else ""
)
def test_python_block_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write files (m.onnx); keep them out of the tree
    exec(compile(code, page, "exec"), {"__name__": "readme_block"})


def test_every_block_is_python_bash_or_text():
    for page in PAGES:
        languages = {lang for lang, _ in FENCE.findall(page.read_text())}
        assert languages <= {"python", "bash", "text"}, f"{page.name}: {languages}"


def test_the_readme_has_its_commands_and_examples():
    """Guards the extractor: a README whose blocks it no longer finds must not pass vacuously."""
    text = README.read_text()
    commands = [argv[0] for block in code_blocks(text, "bash") for argv in shell_commands(block)]
    assert {"recede", "make"} <= set(commands) and commands.count("recede") >= 10
    assert len(code_blocks(text, "python")) >= 2 and len(_other_python_blocks()) >= 2


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_parses(page):
    assert problems(page.read_text()) == []


@pytest.mark.parametrize(
    "line,why",
    [
        ("recede prune --model vgg --input-shape 1,3,32,32 --bogus-flag 1 --out x", "--bogus-flag"),
        ("recede prune --model vgg --input-shape 1,3,32,32 \\\n    --ratoi 0.5 --out x", "--ratoi"),
        ("PYTHONPATH=. recede export runs/x --format onnx-fp32", "invalid choice"),
        ("recede frobnicate runs/x", "invalid choice"),
        ("recede bench runs/demo --runs 4", "--runs"),
        ("torchrun --nproc_per_node=2 -m pipeline.cli train --epochs 3", "--epochs"),
        ("make demo benchmark", "no make target benchmark"),
        ("python benchmarks/no_such.py --quick", "no script"),
        ("curl https://example.com | sh", "unknown command"),
    ],
)
def test_a_wrong_command_fails_the_check(line, why):
    """By construction: a README line with an unknown flag, value or target is reported."""
    found = problems(f"intro\n\n```bash\n{line}\n```\n")
    assert len(found) == 1 and why in found[0], found


def test_a_typo_in_the_real_readme_is_caught():
    """The same check on the README itself, with one flag and one value mistyped."""
    text = README.read_text()
    assert "--scope layer" in text and "--ratio 0.5" in text
    assert len(problems(text.replace("--scope layer", "--scope layr", 1))) == 1
    assert len(problems(text.replace("--ratio 0.5", "--ratios 0.5", 1))) == 1


def test_the_check_passes_good_lines_and_skips_heredoc_bodies():
    text = (
        "```bash\nset -euo pipefail\nrecede prune --model vgg --input-shape 1,3,32,32 \\\n"
        "    --ratio 0.5 --scope layer --out x   # comment --not-a-flag\n"
        "python - a.json <<'EOF'\nrecede --not-parsed\nEOF\nmake test\n```\n"
    )
    assert problems(text) == []
    assert len(shell_commands(code_blocks(text, "bash")[0])) == 4


def _own_model() -> tuple[str, list[list[str]]]:
    """The tour's my_nets.py block and the README commands that use it (all but training)."""
    text = README.read_text()
    source = next(code for code in code_blocks(text, "python") if "def build(" in code)
    commands = [
        argv[1:]
        for block in code_blocks(text, "bash")
        for argv in shell_commands(block)
        if argv[0] == "recede"
        and argv[1] in ("inspect", "prune", "export")
        and ("my_nets:build" in argv or "runs/mine" in argv)
    ]
    return source, commands


def test_the_tour_own_model_prunes_and_exports(tmp_path, monkeypatch, capsys):
    """Runs the tour's inspect, prune and export lines for real on its tiny model (seconds)."""
    source, commands = _own_model()
    assert [c[0] for c in commands] == ["inspect", "prune", "export"]
    (tmp_path / "my_nets.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what PYTHONPATH=. does for the console script
    model = __import__("my_nets").build(num_classes=10, in_channels=3).eval()
    assert build_channel_graph(model, torch.randn(1, 3, 32, 32)).prunable_groups
    for args in commands:
        assert main(args) == 0, (args, capsys.readouterr().err)
    assert (tmp_path / "runs" / "mine").is_dir()
    assert list((tmp_path / "runs" / "mine").glob("*.onnx"))
