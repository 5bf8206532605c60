"""Dataset descriptions shipped with the tool: one ``<name>.yaml`` per dataset (see docs/datasets.md).

Located through :mod:`importlib.resources` so they are found the same way from a checkout, a wheel
or a zip import.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional


def names() -> list[str]:
    """Names of the shipped dataset descriptions, sorted."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def yaml_path(name: str) -> Optional[Path]:
    """Path of ``<name>.yaml`` if it ships with the package, else None."""
    p = resources.files(__name__) / f"{name}.yaml"
    return Path(str(p)) if p.is_file() else None
