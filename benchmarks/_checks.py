"""Import a test module by path, so a benchmark table comes from the very check pytest runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_check(path: Path, name: str) -> ModuleType:
    """The test module at ``path``, registered as ``name`` (its helpers import from tests/)."""
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
