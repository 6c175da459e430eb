"""YAML configuration wrapper (``parse(path)['Network']`` / ``['Layers']``)."""

from __future__ import annotations

import os
from typing import Any

import yaml


class parse:  # noqa: N801 - reference name
    """A parsed YAML config with dict-like access; ``Layers`` keeps the file's order."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        self.path = path
        with open(path) as f:
            self.parameters: dict[str, Any] = yaml.safe_load(f) or {}

    def __getitem__(self, key: str) -> Any:
        return self.parameters[key]

    def __contains__(self, key: str) -> bool:
        return key in self.parameters

    def get(self, key: str, default: Any = None) -> Any:
        return self.parameters.get(key, default)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.parameters, f, sort_keys=False)
