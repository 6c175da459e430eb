"""Import a pipeline directory's top-level modules without clashing with other pipelines.

Several pipelines have modules with the same plain names (``model``, ``functions``, ...);
each test file loads its own through these helpers, which restore ``sys.path`` and
``sys.modules`` afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _local_names(directory: Path) -> set[str]:
    names = {p.stem for p in directory.glob("*.py")}
    names |= {p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return names


@contextlib.contextmanager
def pipeline_path(directory: str | Path):
    """Temporarily put ``directory`` first on sys.path with its module names unshadowed."""
    directory = Path(directory)
    names = _local_names(directory)

    def ours(mod: str) -> bool:
        return mod.split(".")[0] in names

    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if ours(m)}
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        if str(directory) in sys.path:
            sys.path.remove(str(directory))
        for m in [m for m in sys.modules if ours(m)]:
            del sys.modules[m]
        sys.modules.update(saved)


def load_pipeline(directory: str | Path, *modules: str) -> list[ModuleType]:
    """Import ``modules`` from ``directory`` (e.g. "model", "q_model") and return them."""
    with pipeline_path(directory):
        return [importlib.import_module(m) for m in modules]
