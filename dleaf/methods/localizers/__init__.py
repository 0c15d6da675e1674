"""Localization, the "where" of a method: which (generated position, layer) cells it acts on.

A method of :mod:`dleaf.methods` is a localization and a correction. The correction, the "how", is the method's own
file (D-LEAF's head fusion in ``dleaf.py``, PAI's image-attention amplification in ``pai.py``, SPIN's head
suppression in ``spin.py``); the localization is chosen by the method's ``localization`` knob from the localizers
registered here, so every correction runs with every localizer through the same engine:

- ``everywhere``: every active row of every watched layer (PAI's and SPIN's default; D-LEAF's ``no_localization``);
- ``random``: each active row of each watched layer with probability ``random_rate`` (seeded by ``seed``);
- ``threshold``: D-LEAF's LIAE against a causal running threshold (D-LEAF computes it natively, fused with its
  fusion; PAI and SPIN use this module's copy with D-LEAF's default threshold knobs);
- ``oracle``: the cells a flag provider names, per sample and generated position (``oracle.py``), which may
  include the first generated token's row (the prefill's last row), where no running threshold can flag.

A localizer is one file of this package: a :class:`Localizer` subclass registered with :func:`register_localizer`.
Its per-sequence state follows the batch as a method's does (:meth:`begin`, :meth:`reorder`, :meth:`rollback`,
:meth:`check_replay`), and :meth:`flags` returns, for one watched layer's attention call, the (B, Qa) rows to act
on (always within the call's active rows). The method calls ``self.localizer.flags(call, rows)``; rows the
localizer does not flag are left exactly as plain attention computes them.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar

import torch


class Localizer:
    """Where a method acts. One instance per attached method (``config``: the method's configuration, which holds
    the localizer's knobs; ``host``: the :class:`dleaf.engine.Intervention`)."""

    #: whether :meth:`flags` needs the layer's post-softmax attention rows (the active suffix, (B, H, Qa, K))
    needs_rows: ClassVar[bool] = False

    def __init__(self, config, host):
        self.config, self.host = config, host

    def begin(self, batch: int, device) -> None:
        """A sequence of ``batch`` rows starts, or starts over (a replay, a crop back to its start)."""

    def before_forward(self, kwargs: dict, new_sequence: bool) -> None:
        """Before each forward call (``new_sequence``: the first call of a new sequence, not a restart)."""

    def end_forward(self) -> None:
        """After each forward call."""

    def reorder(self, index: torch.Tensor) -> None:
        """Row i of the batch becomes old row ``index[i]``."""

    def rollback(self, length: int) -> bool:
        """The cache was cropped to ``length``; whether the state is exact again (default: stateless)."""
        return True

    def check_replay(self) -> None:
        """Raise if the flags cannot be recomputed in one pass (``generate(use_cache=False)``)."""

    def flags(self, call, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Qa) bool: the active-suffix rows of ``call`` to act on in ``call.layer``."""
        raise NotImplementedError


_LOCALIZERS: dict[str, type] = {}
_DISCOVERED = False


def register_localizer(name: str):
    """Class decorator: register a :class:`Localizer` under ``name`` (a value of a method's ``localization``)."""

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Localizer)):
            raise TypeError(f"{cls!r} is not a Localizer subclass")
        if name in _LOCALIZERS and _LOCALIZERS[name] is not cls:
            raise ValueError(f"localizer name {name!r} is registered twice")
        _LOCALIZERS[name] = cls
        return cls

    return decorate


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def localizer_names() -> tuple[str, ...]:
    """Every registered localization name (modules alphabetically, then registration order)."""
    _discover()
    return tuple(_LOCALIZERS)


def localizer_class(name: str) -> type:
    _discover()
    if name not in _LOCALIZERS:
        raise ValueError(f"unknown localization {name!r}; valid: {', '.join(_LOCALIZERS)}")
    return _LOCALIZERS[name]


def check_localization(owner: str, config) -> None:
    """Validate a configuration's ``localization`` (a registered name) and ``flags`` (given exactly when
    ``localization="oracle"``)."""
    names = localizer_names()
    if config.localization not in names:
        raise ValueError(f"{owner}.localization must be one of {', '.join(map(repr, names))}; "
                         f"got {config.localization!r}")
    flags = getattr(config, "flags", None)
    if config.localization == "oracle" and flags is None:
        raise ValueError(f"{owner}: localization='oracle' needs flags (a flag provider, a mapping, or the path of a "
                         "JSON flag file; see dleaf.methods.localizers.oracle)")
    if config.localization != "oracle" and flags is not None:
        raise ValueError(f"{owner}: flags are only read with localization='oracle' (got "
                         f"localization={config.localization!r})")
    t = getattr(config, "detector_threshold", None)
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0):
        raise ValueError(f"{owner}.detector_threshold must be a probability in (0, 1) or none; got {t!r}")


def make_localizer(config, host, native: tuple = ()):
    """The localizer of a method's configuration (None for a configuration without ``localization``, or one the
    method computes natively, ``native``)."""
    name = getattr(config, "localization", None)
    if name is None or name in native:
        return None
    return localizer_class(name)(config, host)


__all__ = ["Localizer", "check_localization", "localizer_class", "localizer_names", "make_localizer",
           "register_localizer"]
