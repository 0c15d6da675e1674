"""CHAIR's reference rules: object mentions found exactly as the CHAIR script papers report with.

CHAIR (Rohrbach et al., 2018) is computed in nearly every object-hallucination paper with the script of its authors
or with the copy OPERA ships (which PAI, VCD and most later work reuse). The copy lemmatizes with nltk where the
2018 script used pattern's ``singularize`` (which turns "bus" into "bu"); this module follows the copy, so its
numbers can be set beside published tables. For every caption (generated or reference):

1. ``nltk.word_tokenize(caption.lower())``: punkt sentence splitting, then the Treebank word tokenizer.
2. ``nltk.pos_tag`` over all tokens of the caption (the averaged perceptron tagger).
3. Each token is lemmatized by WordNet (``WordNetLemmatizer``) with the part of speech of its tag: ``J*`` adjective,
   ``V*`` verb, ``N*`` noun, ``R*`` adverb, anything else noun.
4. Double words, left to right: where two consecutive lemmas joined by a space are a double word, they become one
   word (``"hot dog"``, ``"teddy bear"``, ``"train track"``...), mapped as the rule table says (``"baby elephant"``
   -> ``"elephant"``, ``"passenger jet"`` -> ``"jet"``, ``"bow tie"`` -> ``"tie"``, ``"toilet seat"`` ->
   ``"toilet"``), and the scan goes on after the second lemma; otherwise the lemma stays a word of its own.
5. If the words include ``toilet`` and ``seat``, every ``seat`` is dropped.
6. Every word that is an entry of the synonym table is a mention of the table line's first entry (its COCO
   category); repeats count. A double word that is not in the table (``"train track"``, ``"home plate"``) is no
   mention, and it has consumed its two lemmas, so "train tracks" names no train.

A caption's length (``mean_length``) is the number of words after step 4, punctuation tokens included, as the
reference's ``Len`` counts them.

The synonym table and rule lists are in ``data/coco/chair_reference.yaml`` (with their source); the nltk models
(punkt's English model, the averaged perceptron tagger, WordNet 3.0's index and exception files) ship in
``data/nltk_data`` and are always read from there, never from a user's ``nltk_data``, so the numbers cannot depend
on which nltk data a machine happens to have. ``docs/chair.md`` lists where these rules and the project's own
(``chair_rules="dleaf"``) differ.
"""

from __future__ import annotations

import functools
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field

from ..io import InputError, read_yaml
from ..resources import data_path
from ..vocabulary import Mention, ObjectVocabulary

__all__ = ["ReferenceChairVocabulary", "reference_vocabulary", "reference_words"]

#: the nltk release whose tokenizer, tagger and lemmatizer the reference copy was run with
NLTK_VERSION = "3.8.1"


@functools.lru_cache(maxsize=1)
def _nltk_models():
    """``(sentence tokenizer, word tokenizer, tagger, wordnet reader)`` from the shipped data."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
        from nltk.data import ZipFilePathPointer
        from nltk.tag.perceptron import PerceptronTagger
        from nltk.tokenize.destructive import NLTKWordTokenizer
    except ImportError as e:  # pragma: no cover - nltk is a dependency
        raise InputError(f"CHAIR's reference rules need nltk=={NLTK_VERSION} (pip install nltk=={NLTK_VERSION})") from e
    if nltk.__version__ != NLTK_VERSION:
        warnings.warn(f"CHAIR's reference rules were checked with nltk {NLTK_VERSION}; nltk {nltk.__version__} is "
                      f"installed, and its tokenizer may split some captions differently", stacklevel=3)
    root = data_path("nltk_data")
    with zipfile.ZipFile(root / "punkt_english.zip") as z:
        sentences = pickle.loads(z.read("punkt_english.pickle"))
    with zipfile.ZipFile(root / "averaged_perceptron_tagger.zip") as z:
        weights, tagdict, classes = pickle.loads(z.read("averaged_perceptron_tagger.pickle"))
    tagger = PerceptronTagger(load=False)
    tagger.model.weights, tagger.tagdict, tagger.classes = weights, tagdict, classes
    tagger.model.classes = classes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": no Open Multilingual WordNet
        wordnet = WordNetCorpusReader(ZipFilePathPointer(str(root / "wordnet.zip"), "wordnet/"), None)
    return sentences, NLTKWordTokenizer(), tagger, wordnet


def wordnet_pos(tag: str) -> str:
    """The WordNet part of speech the reference lemmatizes a tagged word as: ``J*`` adjective (``a``), ``V*`` verb
    (``v``), ``N*`` noun (``n``), ``R*`` adverb (``r``), anything else noun."""
    return {"J": "a", "V": "v", "N": "n", "R": "r"}.get(tag[:1], "n")


def lemmas(caption: str) -> list[str]:
    """Steps 1-3 of the module docstring: the caption's lowercased tokens, tagged and lemmatized by WordNet."""
    sentences, words, tagger, wordnet = _nltk_models()
    tokens = [t for s in sentences.tokenize(caption.lower()) for t in words.tokenize(s)]
    out = []
    for token, tag in tagger.tag(tokens):
        found = wordnet._morphy(token, wordnet_pos(tag))  # what WordNetLemmatizer.lemmatize reads
        out.append(min(found, key=len) if found else token)
    return out


@dataclass(frozen=True)
class _Rules:
    objects: frozenset[str]         # every synonym-table entry (the reference's mscoco_objects)
    node: dict[str, str]            # entry -> its line's first entry (the COCO category)
    double: dict[str, str]          # "lemma lemma" -> the word it becomes
    drop_with: dict[str, str]       # word dropped when the caption also has the other word


@functools.lru_cache(maxsize=4)
def _rules(path: str) -> _Rules:
    data = read_yaml(data_path(path) if not path.startswith("/") else path, "CHAIR reference rule table")
    need = ("synonyms", "double_words", "animal_words", "vehicle_words", "double_word_overrides", "drop_with")
    missing = [k for k in need if not isinstance(data, dict) or k not in data]
    if missing:
        raise InputError(f"CHAIR reference rule table {path} lacks {', '.join(missing)}")
    objects: list[str] = []
    node: dict[str, str] = {}
    for line in str(data["synonyms"]).splitlines():
        entries = line.strip().split(", ")
        objects.extend(entries)
        for e in entries:
            node[e] = entries[0]
    double = {w: w for w in data["double_words"]}
    for w in data["animal_words"]:
        double[f"baby {w}"] = w
        double[f"adult {w}"] = w
    for w in data["vehicle_words"]:
        double[f"passenger {w}"] = w
    double.update(data["double_word_overrides"])
    objects_set = frozenset(e for e in objects if e)
    return _Rules(objects_set, {k: v for k, v in node.items() if k}, double, dict(data["drop_with"]))


def reference_words(caption: str, table: str = "coco/chair_reference.yaml") -> tuple[list[str], list[Mention]]:
    """The caption's words after step 4 (the reference's length counts them) and its mentions (steps 5 and 6); a
    mention's ``word_index`` indexes those words, its ``surface`` is the table entry it matched."""
    rules = _rules(table)
    lem = lemmas(caption)
    words: list[str] = []
    i = 0
    while i < len(lem):
        pair = " ".join(lem[i:i + 2])
        if pair in rules.double:
            words.append(rules.double[pair])
            i += 2
        else:
            words.append(lem[i])
            i += 1
    present = set(words)
    dropped = {w for w, other in rules.drop_with.items() if other in present}
    mentions = [Mention(w, rules.node[w], k) for k, w in enumerate(words)
                if w not in dropped and w in rules.objects]
    return words, mentions


@dataclass(frozen=True)
class ReferenceChairVocabulary(ObjectVocabulary):
    """The COCO vocabulary of CHAIR's reference rules (module docstring): ``extract`` and ``n_words`` follow the
    reference script; ``synonyms`` lists every table entry a lowercased caption token can match, for inspection
    (categories are the 80 COCO names)."""

    table: str = field(default="coco/chair_reference.yaml", kw_only=True)

    def extract(self, text: str) -> list[Mention]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return reference_words(text, self.table)[1]

    def n_words(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return len(reference_words(text, self.table)[0])

    def words(self, text: str) -> list[str]:
        """The caption's words after double-word merging (a mention's ``word_index`` indexes them)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return reference_words(text, self.table)[0]

    def mention_span(self, mention: Mention) -> int:
        """One word: a double word ("hot dog") was merged into one."""
        return 1

    def __hash__(self) -> int:
        return hash((type(self), self.table))


def reference_vocabulary(table: str = "coco/chair_reference.yaml") -> ReferenceChairVocabulary:
    """The reference CHAIR vocabulary (the table under ``data/`` by default)."""
    rules = _rules(table)
    entries = {e: c for e, c in rules.node.items() if e == e.strip() and e == e.lower()}
    return ReferenceChairVocabulary(entries, table=table)

