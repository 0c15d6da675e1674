"""Object vocabularies and mention extraction, shared by every caption metric (:mod:`dleaf.metrics`).

Conventions
-----------
Tokenization
    Text is lowercased and split into *words*: maximal runs of letters and
    digits (Unicode aware).  Whitespace, punctuation, underscores and
    apostrophes all separate words, so ``"The dog's hot-dog."`` becomes
    ``["the", "dog", "s", "hot", "dog"]``.  :func:`tokenize` is the single
    tokenizer used for mention extraction and for caption lengths.

Vocabulary
    An :class:`ObjectVocabulary` maps surface phrases (one or more words, e.g.
    ``"hot dog"``, ``"forks"``) to canonical categories.  Phrases are
    normalized with the same tokenizer, so ``"Hot-Dog"`` and ``"hot dog"`` are
    the same key.  There is no stemming: plurals and other variants must be
    listed explicitly (:meth:`ObjectVocabulary.from_categories` adds simple
    plurals).

Mention extraction (longest match first)
    Phrases are matched over the whole caption from the longest (most words)
    to the shortest; within one length, left to right.  A word consumed by a
    match is never matched again, so in ``"a hot dog and a dog"`` with the
    phrases ``"hot dog"`` and ``"dog"`` the first ``dog`` belongs to the
    ``hot dog`` mention and only the last ``dog`` is a separate mention.  This
    follows the reference CHAIR implementation, which replaces two-word
    phrases before looking up single words.  Mentions are returned in caption
    order.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Mention", "ObjectVocabulary", "category_examples", "is_collection", "tokenize"]

_WORD_RE = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into words.

    A word is a maximal run of letters/digits; whitespace, punctuation,
    underscores and apostrophes are separators.  Formula:
    ``words = re.findall(r"[^\\W_]+", text.lower())``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _WORD_RE.findall(text.lower())


def is_collection(obj: Any) -> bool:
    """Whether ``obj`` is a collection of names: an iterable other than a bare str or bytes."""
    return isinstance(obj, Iterable) and not isinstance(obj, (str, bytes))


@dataclass(frozen=True)
class Mention:
    """One object mention in a caption.

    ``surface`` is the matched phrase as normalized words joined by single
    spaces (lowercase, punctuation removed); ``category`` is its canonical
    category; ``word_index`` is the index of its first word in
    :func:`tokenize` output.
    """

    surface: str
    category: str
    word_index: int


def _plural(name: str) -> str:
    """Simple English plural: ``+es`` after s/x/z/ch/sh, else ``+s``."""
    if name.endswith(("s", "x", "z", "ch", "sh")):
        return name + "es"
    return name + "s"


@dataclass(frozen=True)
class ObjectVocabulary:
    """Surface phrases -> canonical categories, plus optional partner sets.

    ``synonyms`` maps a surface phrase (lowercase, one or more words) to a
    canonical category name.  The categories are exactly the values of
    ``synonyms``.  ``related`` (optional) maps a category to the categories
    that co-occur with it in scenes ("partners"); it need not be symmetric.

    ``non_objects`` (optional) are phrases that are no object but contain a
    synonym (``"train track"``, ``"home plate"``): they are matched like the
    synonyms, longest first, and consume their words, but yield no mention.

    Both mappings are copied into read-only mappings on construction
    (``related`` values become frozensets).
    """

    synonyms: Mapping[str, str]
    related: Mapping[str, frozenset[str]] | None = None
    non_objects: frozenset[str] = field(default=frozenset(), kw_only=True)
    _by_length: Mapping[int, Mapping[tuple[str, ...], str]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        syn = self.synonyms
        if not isinstance(syn, Mapping):
            raise TypeError(
                f"synonyms must be a mapping phrase -> category, got {type(syn).__name__}"
            )
        if len(syn) == 0:
            raise ValueError("synonyms must not be empty")
        clean: dict[str, str] = {}
        by_length: dict[int, dict[tuple[str, ...], str]] = {}
        owner: dict[tuple[str, ...], str] = {}
        for phrase, cat in syn.items():
            if not isinstance(phrase, str):
                raise TypeError(f"synonyms key {phrase!r} is not a str")
            if not isinstance(cat, str):
                raise TypeError(f"synonyms[{phrase!r}] = {cat!r} is not a str")
            if not cat.strip():
                raise ValueError(f"synonyms[{phrase!r}] is an empty category name")
            words = tuple(tokenize(phrase))
            if not words:
                raise ValueError(f"synonyms key {phrase!r} contains no words")
            prev = owner.get(words)
            if prev is not None and syn[prev] != cat:
                raise ValueError(
                    f"synonyms keys {prev!r} and {phrase!r} normalize to the same "
                    f"phrase {' '.join(words)!r} but map to different categories "
                    f"{syn[prev]!r} and {cat!r}"
                )
            owner[words] = phrase
            clean[phrase] = cat
            by_length.setdefault(len(words), {})[words] = cat
        if isinstance(self.non_objects, (str, bytes)) or not is_collection(self.non_objects):
            raise TypeError("non_objects must be a collection of phrases, not a bare str")
        blocked: set[str] = set()
        for phrase in self.non_objects:
            if not isinstance(phrase, str):
                raise TypeError(f"non_objects entry {phrase!r} is not a str")
            words = tuple(tokenize(phrase))
            if not words:
                raise ValueError(f"non_objects entry {phrase!r} contains no words")
            if words in owner:
                raise ValueError(f"{phrase!r} is both an object phrase and a non-object phrase")
            by_length.setdefault(len(words), {})[words] = None  # type: ignore[assignment]
            blocked.add(" ".join(words))
        object.__setattr__(self, "non_objects", frozenset(blocked))
        object.__setattr__(self, "synonyms", types.MappingProxyType(clean))
        object.__setattr__(
            self,
            "_by_length",
            types.MappingProxyType(
                {n: types.MappingProxyType(t) for n, t in sorted(by_length.items())}
            ),
        )

        if self.related is not None:
            rel = self.related
            if not isinstance(rel, Mapping):
                raise TypeError(
                    f"related must be a mapping category -> partner categories or None, "
                    f"got {type(rel).__name__}"
                )
            cats = self.categories
            clean_rel: dict[str, frozenset[str]] = {}
            for key, partners in rel.items():
                if not isinstance(key, str):
                    raise TypeError(f"related key {key!r} is not a str")
                if key not in cats:
                    raise ValueError(
                        f"related key {key!r} is not a known category "
                        f"({category_examples(cats)})"
                    )
                if not is_collection(partners):
                    raise TypeError(
                        f"related[{key!r}] must be a collection of category names, "
                        f"got {type(partners).__name__}"
                    )
                members = []
                for p in partners:
                    if not isinstance(p, str):
                        raise TypeError(f"related[{key!r}] contains non-str {p!r}")
                    if p not in cats:
                        raise ValueError(
                            f"related[{key!r}] contains {p!r}, which is not a known "
                            f"category ({category_examples(cats)})"
                        )
                    members.append(p)
                clean_rel[key] = frozenset(members)
            object.__setattr__(self, "related", types.MappingProxyType(clean_rel))

    def __hash__(self) -> int:
        rel = None if self.related is None else frozenset(self.related.items())
        return hash((frozenset(self.synonyms.items()), rel, self.non_objects))

    def n_words(self, text: str) -> int:
        """The caption length CHAIR reports: ``len(tokenize(text))``."""
        return len(tokenize(text))

    def words(self, text: str) -> list[str]:
        """The words a :class:`Mention`'s ``word_index`` indexes: :func:`tokenize` output."""
        return tokenize(text)

    def mention_span(self, mention: Mention) -> int:
        """How many of :meth:`words` a mention covers (its phrase's words)."""
        return len(mention.surface.split())

    @property
    def categories(self) -> frozenset[str]:
        """The set of canonical categories: ``set(synonyms.values())``."""
        return frozenset(self.synonyms.values())

    @classmethod
    def from_categories(
        cls,
        names: Iterable[str],
        related: Mapping[str, Iterable[str]] | None = None,
        plurals: bool = True,
    ) -> ObjectVocabulary:
        """Vocabulary where each category name is its own synonym.

        Each name ``c`` maps to ``c``; with ``plurals=True`` the simple plural
        (``c + "es"`` if ``c`` ends in s/x/z/ch/sh, else ``c + "s"``; for a
        multi-word name this pluralizes the last word) also maps to ``c``.
        An explicitly listed name always wins over a generated plural that
        happens to spell it.  No irregular plurals (``mice``, ``people``) and
        no ``-y -> -ies``: build the synonyms yourself for those.
        """
        if isinstance(names, (str, bytes)):
            raise TypeError("names must be a collection of category names, not a bare str")
        names = list(names)
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"category name {n!r} is not a str")
        syn: dict[str, str] = {}
        if plurals:
            for n in names:
                syn[_plural(n)] = n
        for n in names:
            syn[n] = n
        return cls(syn, related)  # type: ignore[arg-type]

    def extract(self, text: str) -> list[Mention]:
        """Object mentions in ``text``, longest match first, in caption order.

        Words are :func:`tokenize` output.  For phrase lengths ``L`` from the
        longest down to 1, scan left to right; a window of ``L`` unconsumed
        words equal to a phrase becomes a :class:`Mention` and its words are
        consumed (a non-object phrase consumes its words and yields no
        mention).  Repeated mentions are all returned.
        """
        words = tokenize(text)
        n = len(words)
        taken = [False] * n
        found: list[Mention] = []
        for length in sorted(self._by_length, reverse=True):
            if length > n:
                continue
            table = self._by_length[length]
            i = 0
            while i + length <= n:
                if not any(taken[i : i + length]):
                    window = tuple(words[i : i + length])
                    if window in table:
                        cat = table[window]
                        if cat is not None:
                            found.append(Mention(" ".join(window), cat, i))
                        for j in range(i, i + length):
                            taken[j] = True
                        i += length
                        continue
                i += 1
        found.sort(key=lambda m: m.word_index)
        return found


def category_examples(cats: Iterable[str], k: int = 5) -> str:
    """A hint for error messages: the first ``k`` categories (sorted) and how many there are."""
    ordered = sorted(cats)
    shown = ", ".join(repr(c) for c in ordered[:k])
    more = f", ... ({len(ordered)} in total)" if len(ordered) > k else ""
    return f"valid categories include {shown}{more}"
