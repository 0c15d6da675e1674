"""Where the files that ship with the project are: the organism checkpoints, the evaluation protocols, the COCO
synonym table, the measured profiles.

They live in the repository's top-level ``data/`` folder. An installed package (``pip install .`` or a wheel)
carries them as the package ``dleaf.data`` (``pyproject.toml`` maps that package to ``data/``), read here through
:mod:`importlib.resources`; a source checkout that is not installed reads ``data/`` next to the ``dleaf`` folder.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def data_root() -> Path:
    """The folder holding the shipped data files."""
    try:
        root = importlib.resources.files("dleaf.data")
    except ModuleNotFoundError:
        root = None
    if root is not None:
        for candidate in _paths(root):
            if (candidate / "protocols").is_dir():
                return candidate
    return Path(__file__).resolve().parents[1] / "data"


def _paths(root) -> list[Path]:
    """The file system folders behind an importlib.resources traversable (a namespace package may have several)."""
    inner = getattr(root, "_paths", None)
    if inner:
        return [Path(str(p)) for p in inner]
    return [Path(str(root))]


def data_path(*parts: str) -> Path:
    """A path under the shipped data folder, e.g. ``data_path("protocols", "organism_caption.yaml")``."""
    return data_root().joinpath(*parts)
