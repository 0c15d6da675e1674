"""Benchmarks are found by name in a registry; the runner knows none of them.

A benchmark registers a :class:`BenchmarkSpec`: its name, the kind of answer it asks for (``caption``, scored with
CHAIR against each item's ground-truth object set, or ``yesno``, scored POPE-style against a boolean), the protocol
fields it needs, the options it reads (input files and folders, subsets), and ``build(protocol, options, limit)``,
which returns a :class:`Benchmark` (its items in protocol order). The benchmarks that ship with the project register
themselves when their module is imported (:mod:`dleaf.plugins` imports them before a name is looked up): COCO CHAIR
(:mod:`dleaf.eval.coco`), POPE question files (:mod:`dleaf.eval.pope`) and the organism's two; other packages can
add theirs with :func:`register_benchmark` or through the ``dleaf.plugins`` (or ``dleaf.benchmarks``) entry-point
group (each entry point names a module that registers on import).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import metrics, plugins
from ..io import InputError

KINDS = ("caption", "yesno")


@dataclasses.dataclass(frozen=True)
class Item:
    """One prompt to answer: ``truth`` is the ground-truth category set (``kind == "caption"``) or whether the asked
    object is present (``kind == "yesno"``); ``image()`` loads the image."""

    id: str
    section: str
    kind: str
    prompt: str
    image: Callable[[], Any] = dataclasses.field(compare=False, repr=False)
    truth: Any = None
    #: the file ``image()`` loads, when it is one (a run records its content hash); None for images made in memory
    image_path: Any = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass
class Benchmark:
    """The items of one benchmark in protocol order, the vocabulary its captions are scored with, what it records
    about its inputs (``info``) and the rules its answers are scored by (``scoring``)."""

    name: str
    protocol: Any  # dleaf.eval.protocol.Protocol
    items: list[Item]
    vocab: metrics.ObjectVocabulary | None = None
    info: dict = dataclasses.field(default_factory=dict)
    #: how its answers are scored, recorded with every result: ``chair_rules`` (caption benchmarks with COCO's
    #: vocabulary) or ``answer_rule`` (yes/no benchmarks; :data:`dleaf.metrics.ANSWER_RULES`, default ``dleaf``)
    scoring: dict = dataclasses.field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    @property
    def sections(self) -> list[str]:
        return list(dict.fromkeys(it.section for it in self.items))

    @property
    def kind(self) -> str:
        kinds = {it.kind for it in self.items}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def max_new_tokens(self, override: int | None = None) -> int:
        return int(override if override is not None else self.protocol["max_new_tokens"])

    def subset(self, ids: Sequence[str]) -> "Benchmark":
        """The same benchmark restricted to ``ids`` (kept in protocol order)."""
        keep = set(ids)
        return dataclasses.replace(self, items=[it for it in self.items if it.id in keep])


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """A registered benchmark. ``options``: name -> help of the options ``build`` reads (the harness arguments of
    the same names); ``required``: those that must be given; ``build(protocol, options, limit)``: the benchmark,
    with every input checked (missing files and images raise :class:`~dleaf.io.InputError`)."""

    name: str
    kind: str
    build: Callable[[Any, Mapping[str, Any], int | None], Benchmark]
    protocol_keys: tuple[str, ...]
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    required: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"benchmark {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        unknown = set(self.required) - set(self.options)
        if unknown:
            raise ValueError(f"benchmark {self.name!r}: required options {sorted(unknown)} are not among its options")


_REGISTRY: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Register ``spec`` under its name (registering the same name again replaces it); returns it."""
    _REGISTRY[spec.name] = spec
    return spec


def benchmark_names() -> tuple[str, ...]:
    """Every registered benchmark name."""
    plugins.load()
    return tuple(sorted(_REGISTRY))


def get_benchmark(name: str) -> BenchmarkSpec:
    """The registered benchmark ``name``; an unknown name is an :class:`~dleaf.io.InputError` listing the known."""
    plugins.load()
    if name not in _REGISTRY:
        raise InputError(f"unknown benchmark {name!r}; expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


# ---------------------------------------------------------------------------------------------------------------
# Helpers for benchmark builders
# ---------------------------------------------------------------------------------------------------------------


def select(requested: Sequence[str] | None, available: Sequence[str], what: str) -> list[str]:
    """The ``requested`` names among ``available`` (all when none is requested), in ``available``'s order; an
    unknown name is an :class:`~dleaf.io.InputError`."""
    if not requested:
        return list(available)
    bad = [r for r in requested if r not in available]
    if bad:
        raise InputError(f"unknown {what} {', '.join(map(repr, bad))}; this protocol has {', '.join(available)}")
    return [a for a in available if a in requested]


def limit_count(n: int, limit: int | None) -> int:
    """``min(n, limit)`` (``n`` when ``limit`` is None); a non-positive limit is an :class:`~dleaf.io.InputError`."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise InputError(f"--limit must be a positive integer (or absent for the whole protocol), got {limit!r}")
    return n if limit is None else min(n, limit)
