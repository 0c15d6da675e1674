"""Object-hallucination metrics (CHAIR and POPE), independent of the data source.

The functions here are written once for any ground truth: the exact object
sets of a synthetic world today, COCO annotations later.  They use only the
Python standard library and numpy (``numpy.bool_`` labels are accepted);
nothing here imports torch.

Conventions
-----------
Tokenization, vocabulary and mention extraction
    See :mod:`dleaf.vocabulary`: one tokenizer (:func:`tokenize`), object
    vocabularies (:class:`ObjectVocabulary`) and longest-match-first mention
    extraction, re-exported here.

Ground truth
    One collection of category names per caption (any iterable of str except
    a bare str).  An empty collection is allowed: every mention in that
    caption is then hallucinated, and the caption is skipped for recall.

Undefined rates
    Every rate whose denominator is zero is ``float('nan')``; no function
    returns a silent 0 or raises for it.  ``as_dict()`` keeps NaN as-is (the
    standard ``json`` module writes it as ``NaN``; pass ``allow_nan=False`` or
    post-process if strict JSON is needed).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .vocabulary import Mention, ObjectVocabulary, category_examples, tokenize

__all__ = [
    "CaptionChair",
    "ChairResult",
    "Mention",
    "ObjectVocabulary",
    "PopeResult",
    "chair",
    "parse_answer",
    "parse_yes_no",
    "parse_yes_no_official",
    "pope",
    "tokenize",
]

_NAN = float("nan")


def _ratio(num: float, den: float) -> float:
    """``num / den`` as a Python float, or NaN when ``den == 0``."""
    return float(num) / float(den) if den else _NAN


# ---------------------------------------------------------------------------
# CHAIR
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionChair:
    """Per-caption CHAIR bookkeeping.

    ``mentioned`` = unique categories of ``mentions``; ``hallucinated`` =
    ``mentioned - GT``; ``missed`` = ``GT - mentioned``; ``n_words`` =
    ``len(tokenize(caption))``.
    """

    mentions: tuple[Mention, ...]
    mentioned: frozenset[str]
    hallucinated: frozenset[str]
    missed: frozenset[str]
    n_words: int

    @property
    def n_mentions(self) -> int:
        """Number of mentions, counting repeats."""
        return len(self.mentions)

    @property
    def n_hallucinated_mentions(self) -> int:
        """Mentions (with repeats) whose category is hallucinated."""
        return sum(1 for m in self.mentions if m.category in self.hallucinated)


@dataclass
class ChairResult:
    """Aggregate CHAIR metrics; see :func:`chair` for every formula."""

    chair_i: float
    chair_i_unique: float
    chair_s: float
    recall: float
    mean_length: float
    n_captions: int
    n_mentions: int
    n_hallucinated_mentions: int
    n_grounded_mentions: int
    n_hallucinated_objects: int
    n_grounded_objects: int
    n_hallucinated_captions: int
    n_additions: int
    n_substitutions: int
    n_partner_hallucinations: int | None
    partner_share: float | None
    partner_chance: float | None
    per_caption: list[CaptionChair] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """All aggregate fields as a plain dict (``per_caption`` excluded)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "per_caption"
        }


def _check_ground_truth(
    ground_truth: Sequence[Iterable[str]], cats: frozenset[str]
) -> list[frozenset[str]]:
    out = []
    for i, gt in enumerate(ground_truth):
        if isinstance(gt, (str, bytes)):
            raise TypeError(
                f"ground_truth[{i}] is a bare str {gt!r}; expected a collection of "
                f"category names (e.g. {{{gt!r}}})"
            )
        if not isinstance(gt, Iterable):
            raise TypeError(
                f"ground_truth[{i}] must be a collection of category names, "
                f"got {type(gt).__name__}"
            )
        items = list(gt)
        for name in items:
            if not isinstance(name, str):
                raise TypeError(f"ground_truth[{i}] contains non-str {name!r}")
            if name not in cats:
                raise ValueError(
                    f"ground_truth[{i}] contains unknown category {name!r}; "
                    f"{category_examples(cats)}"
                )
        out.append(frozenset(items))
    return out


def chair(
    captions: Sequence[str],
    ground_truth: Sequence[Iterable[str]],
    vocab: ObjectVocabulary,
) -> ChairResult:
    """CHAIR hallucination metrics (Rohrbach et al., 2018), mention-counting.

    Per caption ``c`` with ground truth ``G_c``: ``M_c`` = mentions from
    ``vocab.extract`` (with repeats), ``O_c`` = unique categories of ``M_c``,
    ``H_c = O_c - G_c`` (hallucinated objects), ``Miss_c = G_c - O_c``.

    * ``chair_i = sum_c |{m in M_c : cat(m) in H_c}| / sum_c |M_c|``
      (every mention counts, repeats included, as in the reference code).
    * ``chair_i_unique = sum_c |H_c| / sum_c |O_c|``.
    * ``chair_s = |{c : H_c != {}}| / n_captions``.
    * ``recall = sum_{c: G_c != {}} |O_c & G_c| / sum_{c: G_c != {}} |G_c|``.
    * ``mean_length = mean_c vocab.n_words(caption_c)`` (``len(tokenize(caption_c))`` for a plain vocabulary).
    * Counts: ``n_mentions = sum |M_c|``; ``n_hallucinated_mentions`` /
      ``n_grounded_mentions`` split those mentions; ``n_hallucinated_objects
      = sum |H_c|``; ``n_grounded_objects = sum |O_c & G_c|``;
      ``n_hallucinated_captions`` = numerator of ``chair_s``.
    * Substitutions vs additions: ``sub_c = min(|H_c|, |Miss_c|)`` (a wrong
      object name that can stand in for a real object the caption missed),
      ``add_c = |H_c| - sub_c`` (a hallucination on top of a caption that
      already names every real object it could); ``n_substitutions = sum
      sub_c``, ``n_additions = sum add_c``.  This is a count-level matching,
      not a pairing of specific objects.
    * Partner share (only if ``vocab.related`` is set, else None): with
      ``P_c = union_{g in G_c} related.get(g, {})``, ``partner_share =
      sum_c |H_c & P_c| / sum_c |H_c|`` and ``n_partner_hallucinations`` is
      its numerator.  Chance rate: with ``A_c = categories - G_c``,
      ``partner_chance = sum_c |H_c| * |P_c & A_c| / |A_c|  /  sum_c |H_c|``,
      i.e. the share a hallucination drawn uniformly from the absent
      categories would have, averaged over the hallucinated objects.

    Every rate with a zero denominator is NaN (e.g. no mentions -> chair_i is
    NaN; no hallucinations -> partner_share and partner_chance are NaN).
    """
    if not isinstance(vocab, ObjectVocabulary):
        raise TypeError(f"vocab must be an ObjectVocabulary, got {type(vocab).__name__}")
    if isinstance(captions, (str, bytes)):
        raise TypeError("captions must be a sequence of str, not a bare str")
    if isinstance(ground_truth, (str, bytes)):
        raise TypeError("ground_truth must be a sequence of collections, not a bare str")
    captions = list(captions)
    ground_truth = list(ground_truth)
    if len(captions) != len(ground_truth):
        raise ValueError(
            f"captions and ground_truth differ in length: "
            f"{len(captions)} captions vs {len(ground_truth)} ground-truth sets"
        )
    for i, cap in enumerate(captions):
        if not isinstance(cap, str):
            raise TypeError(f"captions[{i}] must be a str, got {type(cap).__name__}")
    cats = vocab.categories
    gts = _check_ground_truth(ground_truth, cats)
    related = vocab.related

    per_caption: list[CaptionChair] = []
    n_mentions = n_hall_mentions = 0
    n_hall_objects = n_grounded_objects = n_mentioned_objects = 0
    n_hall_captions = 0
    recall_num = recall_den = 0
    n_words_total = 0
    n_add = n_sub = 0
    partner_num = 0
    chance_sum = 0.0

    for cap, gt in zip(captions, gts):
        mentions = tuple(vocab.extract(cap))
        n_words = vocab.n_words(cap)
        mentioned = frozenset(m.category for m in mentions)
        hallucinated = mentioned - gt
        missed = gt - mentioned
        grounded = mentioned & gt
        rec = CaptionChair(mentions, mentioned, hallucinated, missed, n_words)
        per_caption.append(rec)

        n_mentions += len(mentions)
        n_hall_mentions += rec.n_hallucinated_mentions
        n_mentioned_objects += len(mentioned)
        n_hall_objects += len(hallucinated)
        n_grounded_objects += len(grounded)
        n_hall_captions += bool(hallucinated)
        n_words_total += n_words
        if gt:
            recall_num += len(grounded)
            recall_den += len(gt)
        sub = min(len(hallucinated), len(missed))
        n_sub += sub
        n_add += len(hallucinated) - sub

        if related is not None and hallucinated:
            partners: set[str] = set()
            for g in gt:
                partners |= related.get(g, frozenset())
            partner_num += len(hallucinated & partners)
            absent = cats - gt  # non-empty: it contains every hallucinated object
            chance_sum += len(hallucinated) * len(partners & absent) / len(absent)

    if related is None:
        n_partner: int | None = None
        partner_share: float | None = None
        partner_chance: float | None = None
    else:
        n_partner = partner_num
        partner_share = _ratio(partner_num, n_hall_objects)
        partner_chance = _ratio(chance_sum, n_hall_objects)

    return ChairResult(
        chair_i=_ratio(n_hall_mentions, n_mentions),
        chair_i_unique=_ratio(n_hall_objects, n_mentioned_objects),
        chair_s=_ratio(n_hall_captions, len(captions)),
        recall=_ratio(recall_num, recall_den),
        mean_length=_ratio(n_words_total, len(captions)),
        n_captions=len(captions),
        n_mentions=n_mentions,
        n_hallucinated_mentions=n_hall_mentions,
        n_grounded_mentions=n_mentions - n_hall_mentions,
        n_hallucinated_objects=n_hall_objects,
        n_grounded_objects=n_grounded_objects,
        n_hallucinated_captions=n_hall_captions,
        n_additions=n_add,
        n_substitutions=n_sub,
        n_partner_hallucinations=n_partner,
        partner_share=partner_share,
        partner_chance=partner_chance,
        per_caption=per_caption,
    )


# ---------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------

_YES_NO_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_SENTENCE_END_RE = re.compile(r"[.!?\n]")

#: the answer rules :func:`pope` knows: ``pope_official`` (the POPE repository's evaluation, the default for POPE
#: question files and the rule published POPE tables use) and ``dleaf`` (:func:`parse_yes_no`, which leaves an answer
#: it cannot read unparsed instead of calling it yes)
ANSWER_RULES = ("pope_official", "dleaf")


def parse_yes_no(text: str) -> bool | None:
    """Map a free-form answer to yes (True), no (False) or unparsed (None): the project's strict rule (``dleaf``).

    Only the first sentence is read (the text before the first ``.``, ``!``, ``?`` or line break), as in the
    official POPE rule. In it, lowercased and split into words (apostrophes kept inside a word): if the first word
    is ``yes``/``no`` return it; else if any word is ``no`` or ``not`` (or a contraction ending in ``n't``, e.g.
    ``isn't``) return False; else if any word is ``yes`` return True; else None: an answer that says neither is not
    counted as a yes, as the official rule (:func:`parse_yes_no_official`) would.
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}")
    first = _SENTENCE_END_RE.split(text.lstrip(), maxsplit=1)[0]
    words = _YES_NO_WORD_RE.findall(first.lower().replace("\u2019", "'"))
    if not words:
        return None
    if words[0] == "yes":
        return True
    if words[0] == "no":
        return False
    if any(w in ("no", "not") or w.endswith("n't") for w in words):
        return False
    if "yes" in words:
        return True
    return None


def parse_yes_no_official(text: str) -> bool:
    """The official POPE rule (the POPE repository's ``evaluate.py``): keep the text before the first ``.``, remove
    commas, split at single spaces; the answer is no if a piece is exactly ``No``, ``no`` or ``not``, else yes.

    Every answer is a yes or a no; matching is case-sensitive and on whole pieces, so ``"NO"``, ``"Not sure"``,
    ``"nope"``, ``"isn't"`` and ``"No\nthere is none"`` are all yes, and ``"no!"`` is yes too (no period).
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}")
    first = text.split(".")[0]
    pieces = first.replace(",", "").split(" ")
    return not ("No" in pieces or "not" in pieces or "no" in pieces)


def parse_answer(text: str, rule: str = "dleaf") -> bool | None:
    """An answer parsed by ``rule`` (one of :data:`ANSWER_RULES`)."""
    if rule == "pope_official":
        return parse_yes_no_official(text)
    if rule == "dleaf":
        return parse_yes_no(text)
    raise ValueError(f"unknown answer rule {rule!r}; expected one of {', '.join(ANSWER_RULES)}")


@dataclass
class PopeResult:
    """POPE metrics; see :func:`pope` for the formulas."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    n: int
    n_unparsed: int
    tp: int
    fp: int
    tn: int
    fn: int
    answer_rule: str = "dleaf"

    def as_dict(self) -> dict[str, Any]:
        """All fields as a plain dict."""
        return dataclasses.asdict(self)


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def pope(answers: Sequence[str | bool | None], labels: Sequence[bool], rule: str = "dleaf") -> PopeResult:
    """POPE yes/no metrics with "yes" (object present) as the positive class.

    ``answers[k]`` is free text (parsed by ``rule``: ``"dleaf"``,
    :func:`parse_yes_no`, or ``"pope_official"``, :func:`parse_yes_no_official`,
    under which no answer is unparsed), or an already-parsed bool / None. The
    result records the rule (``answer_rule``).  ``labels[k]`` is True when the object is
    present.  With ``yes``/``no`` the parsed answers:

    * ``tp = #(yes & present)``, ``fp = #(yes & absent)``,
      ``tn = #(no & absent)``, ``fn = #(no & present)``; unparsed answers
      are in none of them (``n_unparsed``).
    * ``accuracy = (tp + tn) / n`` (unparsed answers count as wrong).
    * ``precision = tp / (tp + fp)``; ``recall = tp / (tp + fn)`` (an
      unparsed answer is neither a yes nor a no, so it is not a false
      negative either).
    * ``f1 = 2 tp / (2 tp + fp + fn)`` (the harmonic mean of precision and
      recall where both are defined).
    * ``yes_ratio = (tp + fp) / n``.

    Zero denominators give NaN.
    """
    if isinstance(answers, (str, bytes)):
        raise TypeError("answers must be a sequence of answers, not a bare str")
    if isinstance(labels, (str, bytes)):
        raise TypeError("labels must be a sequence of bool, not a str")
    answers = list(answers)
    labels = list(labels)
    if len(answers) != len(labels):
        raise ValueError(
            f"answers and labels differ in length: {len(answers)} answers vs "
            f"{len(labels)} labels"
        )
    if not answers:
        raise ValueError("pope needs at least one answer; answers and labels are empty")
    if rule not in ANSWER_RULES:
        raise ValueError(f"unknown answer rule {rule!r}; expected one of {', '.join(ANSWER_RULES)}")
    tp = fp = tn = fn = unparsed = 0
    for k, (ans, lab) in enumerate(zip(answers, labels)):
        if not _is_bool(lab):
            raise TypeError(
                f"labels[{k}] must be a bool (True = object present), got "
                f"{type(lab).__name__} {lab!r}"
            )
        if isinstance(ans, str):
            parsed = parse_answer(ans, rule)
        elif ans is None or _is_bool(ans):
            parsed = None if ans is None else bool(ans)
        else:
            raise TypeError(
                f"answers[{k}] must be a str, bool or None, got {type(ans).__name__}"
            )
        present = bool(lab)
        if parsed is None:
            unparsed += 1
        elif parsed:
            if present:
                tp += 1
            else:
                fp += 1
        elif present:
            fn += 1
        else:
            tn += 1
    n = len(answers)
    return PopeResult(
        accuracy=_ratio(tp + tn, n),
        precision=_ratio(tp, tp + fp),
        recall=_ratio(tp, tp + fn),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        yes_ratio=_ratio(tp + fp, n),
        n=n,
        n_unparsed=unparsed,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        answer_rule=rule,
    )
