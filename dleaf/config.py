"""Configuration of the methods: D-LEAF and the baselines (PAI, SPIN, VCD) and ablations, by name.

Each method's config class lives with the method in :mod:`dleaf.methods` (one file per method), every knob a
field validated on construction, so that a bad value fails before any model is touched. This module chooses a method
by name (:func:`method_config`) and lists them (:data:`METHODS`, :func:`describe_methods`), all derived from the
method registry; the config classes of the methods the project ships are importable from here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

from .methods import MethodConfig, describe, method_names, registration, registrations
from .methods.dleaf import (FUSION_TARGETS, HEAD_SELECTIONS, IAF_VARIANTS, LAYER_SIGNALS, LIAE_VARIANTS,
                            LOCALIZATIONS, THRESHOLDS, DLeafConfig)
from .methods.pai import PAIConfig
from .methods.spin import SPINConfig
from .methods.vcd import VCDConfig

__all__ = ["DLeafConfig", "PAIConfig", "SPINConfig", "VCDConfig", "MethodConfig", "METHODS", "method_config",
           "method_names", "describe_methods", "format_methods", "LAYER_SIGNALS", "LIAE_VARIANTS", "IAF_VARIANTS",
           "THRESHOLDS", "HEAD_SELECTIONS", "LOCALIZATIONS", "FUSION_TARGETS"]


class _Methods(Mapping):
    """Methods by name: ``METHODS[name] == (config class, fields the name fixes)``, read from the registry."""

    def __getitem__(self, name: str) -> tuple[type, dict]:
        regs = registrations()
        if name not in regs:
            raise KeyError(name)
        return regs[name].config_class, dict(regs[name].fixed)

    def __iter__(self) -> Iterator[str]:
        return iter(registrations())

    def __len__(self) -> int:
        return len(registrations())

    def __repr__(self) -> str:
        return f"METHODS({', '.join(self)})"


#: Methods by name: the config class and the fields each name fixes (derived from :mod:`dleaf.methods`).
METHODS: Mapping[str, tuple[type, dict]] = _Methods()


def method_config(name: str, **knobs) -> MethodConfig:
    """The configuration of the method called ``name`` (one of :data:`METHODS`), with ``knobs`` overriding its
    defaults; an unknown name or knob is an error that lists what is valid."""
    reg = registration(name)
    cls, fixed = reg.config_class, reg.fixed
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(knobs) - fields)
    if unknown:
        raise ValueError(f"method {name!r} has no knob(s) {', '.join(unknown)}; its knobs are {', '.join(sorted(fields))}")
    clash = sorted(k for k in knobs if k in fixed and knobs[k] != fixed[k])
    if clash:
        raise ValueError(f"method {name!r} fixes {', '.join(f'{k}={fixed[k]!r}' for k in clash)}")
    return cls(**{**reg.defaults, **knobs, **fixed})


def describe_methods() -> list[dict]:
    """Every method with its description, config class, fixed fields and knobs (name, type, default, help)."""
    return describe()


def format_methods(verbose: bool = True) -> str:
    """The methods as text: one line each (name and description), and with ``verbose`` every knob with its default
    and help. ``greedy`` (nothing attached) is listed first."""
    lines = ["greedy  plain decoding (no method attached)"]
    first_of: dict[str, str] = {}
    for m in describe():
        lines.append(f"{m['name']}  {m['description']}")
        if m["fixed"]:
            lines.append("    fixes: " + ", ".join(f"{k}={v!r}" for k, v in m["fixed"].items()))
        if m["defaults"]:
            lines.append("    defaults: " + ", ".join(f"{k}={v!r}" for k, v in m["defaults"].items()))
        if m["config"] in first_of:
            lines.append(f"    knobs: those of {first_of[m['config']]} ({m['config']})")
            continue
        first_of[m["config"]] = m["name"]
        if verbose:
            for k in m["knobs"]:
                lines.append(f"    {k['name']} = {k['default']!r}  ({k['type']})  {k['help']}".rstrip())
    return "\n".join(lines)


def short_help() -> str:
    """One line naming every method (for command-line help texts)."""
    return "one of greedy, " + ", ".join(method_names()) + " (python -m dleaf methods lists their knobs)"
