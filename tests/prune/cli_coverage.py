"""An untrained zoo model through the command line, as a new user runs it (issue 33's goal).

``recede prune --model SPEC --input-shape 1,3,S,S --scope layer`` and then ``recede export`` of
what it wrote, each in its own process (as a user runs them, and so a model's memory is freed
with it). The goal for every model: both commands exit 0, or one refuses with exit 2 saying
why; never exit 1 (a check failed or could not see a wrong model) and never a traceback. The
verdicts of every check (removal, fold, ONNX) are read back from ``report.json`` and the
release manifest. Used by ``test_torchvision_coverage.py``, ``test_timm_coverage.py`` and the
coverage tables.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class CliResult:
    """The two commands' exit codes, each check's verdict, and what went wrong."""

    prune_exit: int
    export_exit: int | None  # None: export did not run (prune did not exit 0)
    verdicts: dict[str, str] = field(default_factory=dict)  # check -> verdict
    message: str = ""  # the last stderr line of a command that did not exit 0

    @property
    def traceback(self) -> bool:
        return self.message.startswith("Traceback")

    def ok(self) -> bool:
        """Both exit 0, or a refusal (exit 2) that names why; never exit 1 or a traceback."""
        exits = [self.prune_exit] + ([] if self.export_exit is None else [self.export_exit])
        refused = exits[-1] == 2 and bool(self.message) and not self.traceback
        return not self.traceback and (exits == [0, 0] or refused)

    @staticmethod
    def cell_ok(cell: str) -> bool:
        """:meth:`ok` read back from a table cell written by :meth:`cell`."""
        found = re.match(r"exit (\d+) / (\d+|-)", cell)
        if found is None or "Traceback" in cell:
            return False
        exits = [e for e in found.groups() if e != "-"]
        return exits == ["0", "0"] or exits[-1] == "2"

    def cell(self) -> str:
        """One table cell: the exits, each verdict, and the message of a failure."""
        exits = f"{self.prune_exit} / {'-' if self.export_exit is None else self.export_exit}"
        verdicts = ", ".join(f"{what} {verdict}" for what, verdict in self.verdicts.items())
        text = f"exit {exits}" + (f": {verdicts}" if verdicts else "")
        if self.message:
            text += f"; {self.message[:200]}"
        return text.replace("|", "/")


def _recede(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RECEDE_QUIET": "1"}
    command = [sys.executable, "-m", "pipeline.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)


def _why(proc: subprocess.CompletedProcess) -> str:
    """The traceback's last line, or recede's own message (its last line naming the command)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()] or [""]
    if any(line.startswith("Traceback") for line in lines):
        return f"Traceback: {lines[-1]}"
    return next((line for line in reversed(lines) if line.startswith("recede ")), lines[-1])


def _verdicts(pruned: Path, release: Path) -> dict[str, str]:
    verdicts = {}
    report = pruned / "report.json"
    if report.is_file():
        for check in json.loads(report.read_text()).get("verification", []):
            verdicts[check["what"]] = check["verdict"]
    manifest = release / "manifest.json"
    if manifest.is_file():
        export = json.loads(manifest.read_text()).get("export", {})
        for check in [export.get("fold"), *export.get("verification", [])]:
            if check:
                verdicts[check["what"]] = check["verdict"]
    return verdicts


def cli_untrained(spec: str, size: int, workdir: Path) -> CliResult:
    """``recede prune`` (``--scope layer``) then ``recede export`` of the untrained ``spec``.

    Both write into a fresh folder of ``workdir``, removed afterwards: verdicts are read only
    from what these two commands wrote (a refused command leaves nothing to read).
    """
    folder = workdir / f"cli-{spec.replace(':', '-')}"
    shutil.rmtree(folder, ignore_errors=True)
    pruned, release = folder / "pruned", folder / "release"
    try:
        return _prune_then_export(spec, f"1,3,{size},{size}", pruned, release)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _prune_then_export(spec: str, shape: str, pruned: Path, release: Path) -> CliResult:
    prune = _recede(
        "prune", "--model", spec, "--input-shape", shape, "--scope", "layer", "--out", str(pruned)
    )
    if prune.returncode != 0:
        return CliResult(prune.returncode, None, _verdicts(pruned, release), _why(prune))
    export = _recede("export", str(pruned), "--out", str(release))
    message = _why(export) if export.returncode != 0 else ""
    return CliResult(0, export.returncode, _verdicts(pruned, release), message)
