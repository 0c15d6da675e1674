"""Registrations, loaded on first use: the modules that ship with the project and those other packages add.

A registering module adds names to the library's registries when it is imported: benchmarks to the evaluation
harness (:func:`dleaf.eval.register_benchmark`) and model families to the model loader
(:func:`dleaf.models.register_family`). The core never imports such a module itself; it calls :func:`load` before it
looks a name up, so that a benchmark or a model family plugs in without the core knowing it exists. The shipped
registrations are COCO CHAIR (:mod:`dleaf.eval.coco`), POPE question files (:mod:`dleaf.eval.pope`) and the
organism's benchmarks and model family (``dleaf.organism.benchmarks``). Another package adds its own through the
``dleaf.plugins`` entry-point group (or ``dleaf.benchmarks``): each entry point names a module that registers on
import.
"""

from __future__ import annotations

import importlib
import warnings

BUILTIN_MODULES = ("dleaf.eval.coco", "dleaf.eval.pope", "dleaf.organism.benchmarks")
ENTRY_POINT_GROUPS = ("dleaf.plugins", "dleaf.benchmarks")

_loaded = False


def load() -> None:
    """Import every registering module once: the shipped ones, then each entry point's (a third-party module that
    fails to import is reported as a warning; it must not take the shipped registrations down)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for group in ENTRY_POINT_GROUPS:
        for ep in entry_points(group=group):
            try:
                importlib.import_module(ep.value.split(":")[0])
            except Exception as e:
                warnings.warn(f"the {group} entry point {ep.name!r} failed to load: {e}", stacklevel=2)
