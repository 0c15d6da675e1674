"""The method protocol and the registry.

A method is two classes in one module of :mod:`dleaf.methods`:

- its **configuration**, a frozen dataclass deriving from :class:`MethodConfig`: every knob a field with a default,
  validated in ``__post_init__``, documented in the class docstring (the first line is the method's one-line
  description) and, per knob, in an ``Attributes`` style line ``name: what it is`` of that docstring;
- its **behaviour**, a :class:`Method` subclass with ``config_class`` set, registered under one or more names with
  :func:`register` (a name may fix some fields: ``no_localization`` is D-LEAF with ``localization="everywhere"``).

The engine (:class:`dleaf.engine.Intervention`) owns the sequence (which rows are active, where the image is, how
the batch moves) and calls the method at a few points: :meth:`Method.begin` when a sequence starts,
:meth:`Method.before_forward` / :meth:`Method.end_forward` around each forward call, :meth:`Method.attend` for each
watched layer's attention (methods that act on attention), :meth:`Method.reorder` when the batch rows move (beam
search), :meth:`Method.rollback` when the cache is cropped, and :meth:`Method.generation_kwargs` for what
``model.generate`` needs (a method that acts on the logits returns a logits processor there).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, ClassVar


def choice(owner: str, name: str, value: Any, valid: tuple) -> None:
    """Validate a categorical knob."""
    if value not in valid:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


def layer_range(owner: str, start: int, end: int | None) -> None:
    """Validate a ``[layer_start, layer_end)`` pair (``end`` None: to the last layer)."""
    if start < 0:
        raise ValueError(f"{owner}.layer_start must be >= 0, got {start}")
    if end is not None and end <= start:
        raise ValueError(f"{owner}.layer_end must be None (all layers) or > layer_start={start}, got {end}")


def layers_of(start: int, end: int | None, n: int) -> range:
    """The layers ``[start, end)`` of a decoder of ``n`` layers (``end`` None: ``n``); an error if they do not fit."""
    end = n if end is None else end
    if start >= n or end > n:
        raise ValueError(f"layer range [{start}, {end}) does not fit a decoder of {n} layers")
    return range(start, end)


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's configuration (a frozen dataclass of knobs, validated on construction)."""


class Method:
    """What a method does, attached to one model; one instance per :class:`dleaf.engine.Intervention`, holding the
    method's per-sequence state. ``host`` is that intervention (``num_layers``, ``num_heads``, ``trace``,
    ``image``, ``compile``, ...)."""

    #: the configuration dataclass this method runs
    config_class: ClassVar[type]
    #: whether the method acts inside the text decoder's attention (its watched layers then run through the engine)
    acts_on_attention: ClassVar[bool] = True
    #: whether teacher-forced scoring (response_logprobs, PromptCache) can apply the method
    scores_teacher_forced: ClassVar[bool] = True

    #: the localizations the method computes itself (fused with its correction); any other value of its
    #: ``localization`` knob runs through :mod:`dleaf.methods.localizers`
    native_localizations: ClassVar[tuple] = ()

    def __init__(self, config, host):
        from .localizers import make_localizer

        self.config, self.host = config, host
        #: where the method acts (:mod:`dleaf.methods.localizers`), None for a configuration without a
        #: ``localization`` knob or one the method computes natively
        self.localizer = make_localizer(config, host, self.native_localizations)

    def watched_layers(self, num_layers: int) -> range:
        """The layers whose attention the method sees (default: the config's ``[layer_start, layer_end)``)."""
        return layers_of(self.config.layer_start, self.config.layer_end, num_layers)

    def begin(self, batch: int, device) -> None:
        """A sequence of ``batch`` rows starts (or starts over): reset the per-row state."""
        if self.localizer is not None:
            self.localizer.begin(batch, device)

    def before_forward(self, kwargs: dict, new_sequence: bool) -> None:
        """Before each forward call of the model (``kwargs``: its keyword arguments)."""
        if self.localizer is not None:
            self.localizer.before_forward(kwargs, new_sequence)

    def end_forward(self) -> None:
        """After each forward call of the model."""
        if self.localizer is not None:
            self.localizer.end_forward()

    def rows_to_act(self, call, rows=None):
        """(B, Qa) bool: the active-suffix rows of ``call`` the method acts on (its localizer's flags; every active
        row without a localizer). ``rows``: the layer's plain post-softmax rows, for a localizer that needs them."""
        if self.localizer is None:
            return call.active
        return self.localizer.flags(call, rows)

    def name_samples(self, keys) -> None:
        """Name the rows of the next sequence for the localizer (see :mod:`dleaf.methods.localizers.oracle`)."""
        if self.localizer is None or not hasattr(self.localizer, "name_samples"):
            raise ValueError(f"{type(self).__name__}: its localization does not read sample keys")
        self.localizer.name_samples(keys)

    def attend(self, call):
        """A watched layer's attention (:class:`dleaf.engine.AttentionCall`): return ``(output (B, Q, H, D),
        weights or None)``, usually through ``call.finish``."""
        raise NotImplementedError(f"{type(self).__name__} does not act on attention")

    def reorder(self, index) -> None:
        """Row i of the batch becomes old row ``index[i]`` (beam search)."""
        if self.localizer is not None:
            self.localizer.reorder(index)

    def rollback(self, length: int) -> bool:
        """The cache was cropped to ``length`` tokens; return whether the state is now exactly what it was then
        (the default: a method without running state, or its localizer's answer)."""
        return True if self.localizer is None else self.localizer.rollback(length)

    def check_replay(self) -> None:
        """Raise if the state cannot be recomputed from scratch in one pass (``generate(use_cache=False)``)."""
        if self.localizer is not None:
            self.localizer.check_replay()

    def generation_kwargs(self, inputs: dict) -> dict:
        """Extra keyword arguments for ``model.generate(**inputs, ...)`` (default: none)."""
        return {}

    def set_gamma(self, gamma) -> None:
        raise ValueError(f"{type(self).__name__} has no gamma to set")

    def running_statistics(self):
        return None


@dataclasses.dataclass(frozen=True)
class Registration:
    """One method name: its behaviour, its config class, the fields the name fixes, and a one-line description."""

    name: str
    method_class: type
    fixed: dict
    description: str
    defaults: dict = dataclasses.field(default_factory=dict)

    @property
    def config_class(self) -> type:
        return self.method_class.config_class

    def knobs(self) -> list[dict]:
        """Every knob of the name (fields the name fixes excluded): ``name``, ``type``, ``default`` and ``help``
        (from the config class docstring's ``name: ...`` lines)."""
        helps = knob_help(self.config_class)
        return [{"name": f.name, "type": _type_name(f.type), "default": self.defaults.get(f.name, f.default),
                 "help": helps.get(f.name, "")}
                for f in dataclasses.fields(self.config_class) if f.name not in self.fixed]


_REGISTRY: dict[str, Registration] = {}
_BY_CONFIG: dict[type, type] = {}
_DISCOVERED = False


def register(name: str, description: str, fixed: dict | None = None, defaults: dict | None = None):
    """Class decorator: register a :class:`Method` subclass under ``name`` (``fixed``: config fields the name sets;
    ``defaults``: config fields the name sets unless a knob overrides them). Stack it to register several names for
    one method."""

    def decorate(cls):
        config_class = cls.config_class
        if not (dataclasses.is_dataclass(config_class) and issubclass(config_class, MethodConfig)):
            raise TypeError(f"{cls.__name__}.config_class must be a MethodConfig dataclass")
        fields = {f.name for f in dataclasses.fields(config_class)}
        bad = sorted((set(fixed or {}) | set(defaults or {})) - fields)
        if bad:
            raise TypeError(f"method {name!r} sets unknown field(s) {bad} of {config_class.__name__}")
        both = sorted(set(fixed or {}) & set(defaults or {}))
        if both:
            raise TypeError(f"method {name!r} both fixes and defaults field(s) {both}")
        if name in _REGISTRY and _REGISTRY[name].method_class is not cls:
            raise ValueError(f"method name {name!r} is registered twice")
        _REGISTRY[name] = Registration(name, cls, dict(fixed or {}), description, dict(defaults or {}))
        _BY_CONFIG.setdefault(config_class, cls)
        return cls

    return decorate


def _discover() -> None:
    """Import every module of :mod:`dleaf.methods` once, so that each registers its methods."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")


def registrations() -> dict[str, Registration]:
    """Every registered method name: modules alphabetically, the names of one module in registration order."""
    _discover()
    order = {name: i for i, name in enumerate(_REGISTRY)}
    ranked = sorted(_REGISTRY.values(), key=lambda r: (r.method_class.__module__, order[r.name]))
    return {r.name: r for r in ranked}


def method_names() -> list[str]:
    return list(registrations())


def registration(name: str) -> Registration:
    regs = registrations()
    if name not in regs:
        raise ValueError(f"unknown method {name!r}; valid methods are {', '.join(regs)} (or 'greedy' for none)")
    return regs[name]


def method_for(config) -> type:
    """The :class:`Method` subclass that runs ``config`` (looked up from its class)."""
    _discover()
    for cls in type(config).__mro__:
        if cls in _BY_CONFIG:
            return _BY_CONFIG[cls]
    raise TypeError(f"no method runs a {type(config).__name__}; register one with dleaf.methods.register")


def knob_help(config_class: type) -> dict[str, str]:
    """Per-knob help from the config class docstring: lines ``name: text`` of its ``Knobs:`` section."""
    doc = config_class.__doc__ or ""
    out, current = {}, None
    fields = {f.name for f in dataclasses.fields(config_class)}
    in_section = False
    for raw in doc.splitlines():
        line = raw.strip()
        if line == "Knobs:":
            in_section = True
            continue
        if not in_section:
            continue
        head, sep, text = line.partition(":")
        if sep and head in fields:
            current = head
            out[head] = text.strip()
        elif line and current is not None:
            out[current] += " " + line
        elif not line:
            current = None
    return out


def _type_name(t) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def describe() -> list[dict]:
    """Every method: ``name``, ``description``, ``config`` (class name), ``fixed`` and ``knobs`` (see
    :meth:`Registration.knobs`); for ``python -m dleaf methods`` and help texts."""
    return [{"name": r.name, "description": r.description, "config": r.config_class.__name__, "fixed": r.fixed,
             "defaults": r.defaults,
             "knobs": r.knobs()} for r in registrations().values()]
