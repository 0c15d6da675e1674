"""How to decode: one :class:`Setting` type for every harness run, grid cell, study row and generated preference
reply.

A setting is a decoding method (``greedy`` = nothing attached; otherwise a name from the method registry of
:mod:`dleaf.config`, e.g. ``dleaf``, ``pai``, ``spin``) with its knobs, a decoding strategy (greedy, beam search or
sampling with its temperature, top-p and seed) and a label. It is checked when it is built: an unknown method or
knob, a knob of the wrong type (``gamma=abc``) or out of range (``gamma=1.5``) raises
:class:`dleaf.io.InputError` (a ``ValueError``) before any model is touched.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from .io import InputError

STRATEGIES: tuple[str, ...] = ("greedy", "beam", "sample")
GREEDY = "greedy"


def method_names() -> tuple[str, ...]:
    """Every method name of the registry (``greedy``, which attaches nothing, is not among them)."""
    from . import config

    lister = getattr(config, "method_names", None)
    if callable(lister):
        return tuple(lister())
    return tuple(config.METHODS)


def _method_config(name: str, knobs: Mapping[str, Any]):
    from . import config

    try:
        return config.method_config(name, **dict(knobs))
    except (TypeError, ValueError) as e:
        raise InputError(str(e)) from None


def _knob_types(name: str) -> dict[str, Any]:
    cls = type(_method_config(name, {}))
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _coerce(method: str, name: str, value: Any, hint: Any) -> Any:
    """``value`` as the knob's declared type, or an :class:`InputError` that says what was expected."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else Any
        if value is None:
            raise InputError(f"method {method!r}: knob {name} cannot be none")
    if hint is Any:
        return value
    if value is None:
        raise InputError(f"method {method!r}: knob {name} cannot be none")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"method {method!r}: knob {name}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InputError(f"method {method!r}: knob {name}={value!r} must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InputError(f"method {method!r}: knob {name}={value!r} must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise InputError(f"method {method!r}: knob {name}={value!r} must be a word (one of the documented choices)")
    return value


def check_knobs(method: str, knobs: Mapping[str, Any]) -> dict[str, Any]:
    """``knobs`` checked against ``method``'s configuration and converted to its field types (ints become floats
    where a number is declared); the configuration is built once to check values and combinations."""
    if method == GREEDY:
        if knobs:
            raise InputError(f"knobs {', '.join(sorted(knobs))} were given but the method is greedy (nothing is "
                             "attached); choose a method")
        return {}
    if not isinstance(method, str) or method not in method_names():
        raise InputError(f"unknown method {method!r}; valid methods are greedy, {', '.join(method_names())}")
    types_ = _knob_types(method)
    unknown = sorted(set(knobs) - set(types_))
    if unknown:
        raise InputError(f"method {method!r} has no knob(s) {', '.join(unknown)}; its knobs are "
                         f"{', '.join(sorted(types_))}")
    out = {k: _coerce(method, k, v, types_[k]) for k, v in knobs.items()}
    _method_config(method, out)
    return out


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to decode.

    ``method``: ``"greedy"`` (nothing attached) or a registered method name; ``knobs``: its configuration fields
    (a mapping; stored sorted, so two settings with the same knobs are equal and hash alike). ``strategy``:
    ``"greedy"``, ``"beam"`` (``num_beams`` beams, default 5) or ``"sample"`` (``temperature``, ``top_p``; item
    ``i`` is sampled with a seed derived from ``seed`` and its id, see :mod:`dleaf.generation`). ``label``: a name
    for tables (default :meth:`describe`).
    """

    method: str = GREEDY
    knobs: Any = ()
    strategy: str = "greedy"
    num_beams: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    label: str | None = None

    def __post_init__(self):
        knobs = dict(self.knobs.items() if isinstance(self.knobs, Mapping) else self.knobs)
        knobs = check_knobs(self.method, knobs)
        object.__setattr__(self, "knobs", tuple(sorted(knobs.items())))
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown decoding strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        beams = self.num_beams if self.num_beams is not None else (5 if self.strategy == "beam" else 1)
        if not isinstance(beams, int) or isinstance(beams, bool) or beams < 1:
            raise InputError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if self.strategy == "beam" and beams < 2:
            raise InputError(f"beam search needs num_beams >= 2, got {beams}")
        if self.strategy != "beam" and beams != 1:
            raise InputError(f"num_beams={beams} only applies to the beam strategy (got strategy {self.strategy!r})")
        object.__setattr__(self, "num_beams", beams)
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or \
                not self.temperature > 0:
            raise InputError(f"temperature must be a positive number, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        if self.label is None:
            object.__setattr__(self, "label", self.describe())

    # -- views ------------------------------------------------------------------------------------------------
    @property
    def knob_dict(self) -> dict[str, Any]:
        return dict(self.knobs)

    def knob_args(self) -> list[str]:
        """The knobs as ``name=value`` strings (``--knob`` arguments) that :func:`dleaf.cli.parse_knobs` reads back
        to the same values."""
        def text(v):
            return "none" if v is None else ("true" if v else "false") if isinstance(v, bool) else str(v)

        return [f"{k}={text(v)}" for k, v in self.knobs]

    @property
    def attaches(self) -> bool:
        """Whether decoding attaches a method to the model (False for greedy)."""
        return self.method != GREEDY

    @property
    def sampling(self) -> bool:
        return self.strategy == "sample"

    def config(self):
        """The method's configuration object (None for greedy)."""
        return _method_config(self.method, self.knob_dict) if self.attaches else None

    def decoding(self) -> dict[str, Any]:
        """The decoding strategy as recorded in a run's ``config.json``: ``{"strategy": "greedy"}``,
        ``{"strategy": "beam", "num_beams": n}`` or ``{"strategy": "sample", "temperature", "top_p", "seed"}``."""
        if self.strategy == "greedy":
            return {"strategy": "greedy"}
        if self.strategy == "beam":
            return {"strategy": "beam", "num_beams": self.num_beams}
        return {"strategy": "sample", "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}

    def record(self) -> dict[str, Any]:
        """``{"method", "knobs", "decoding"}``: what a result records about how it was decoded."""
        return {"method": self.method, "knobs": self.knob_dict, "decoding": self.decoding()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], label: str | None = None) -> "Setting":
        """The setting a :meth:`record` (or a harness run's ``config.json``) describes."""
        dec = dict(record.get("decoding") or {"strategy": "greedy"})
        strategy = dec.pop("strategy", "greedy")
        return cls(record.get("method", GREEDY), record.get("knobs") or {}, strategy, label=label, **dec)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` for the decoding strategy (without the token limit)."""
        if self.strategy == "greedy":
            return {"do_sample": False, "num_beams": 1}
        if self.strategy == "beam":
            return {"do_sample": False, "num_beams": self.num_beams}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}

    def describe(self) -> str:
        """A short human label: ``dleaf (gamma=0.3)``, ``greedy, beam 5``, ``pai, sample T=0.7``."""
        text = self.method
        if self.knobs:
            text += " (" + ", ".join(f"{k}={v}" for k, v in self.knobs) + ")"
        if self.strategy == "beam":
            text += f", beam {self.num_beams}"
        elif self.strategy == "sample":
            text += f", sample T={self.temperature:g}" + (f" top_p={self.top_p:g}" if self.top_p < 1 else "")
        return text

    def attached(self, model, **kwargs):
        """``with setting.attached(model) as iv:`` the method attached to ``model`` (None for greedy); ``kwargs``
        go to :func:`dleaf.engine.attached` (for example ``trace=True``)."""
        from . import engine

        return engine.attached(model, self.method if self.attaches else None, **self.knob_dict, **kwargs)


def setting(label: str | None = None, method: str = GREEDY, **knobs) -> Setting:
    """Shorthand: ``setting("dleaf gamma=1", "dleaf", gamma=1.0)``."""
    return Setting(method, knobs, label=label)
