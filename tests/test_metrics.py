"""Tests for dleaf.metrics (CHAIR, POPE): hand-worked examples plus a brute-force cross-check (the vocabulary and
mention extraction: tests/test_vocabulary.py)."""

from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest

from dleaf.metrics import (
    CaptionChair,
    ChairResult,
    ObjectVocabulary,
    PopeResult,
    chair,
    parse_yes_no,
    pope,
)

nan = float("nan")


def is_nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


SYNONYMS = {
    "dog": "dog",
    "dogs": "dog",
    "puppy": "dog",
    "cat": "cat",
    "cats": "cat",
    "hot dog": "hot dog",
    "hot dogs": "hot dog",
    "fork": "fork",
    "forks": "fork",
    "dining table": "dining table",
    "table": "dining table",
    "car": "car",
    "bus": "bus",
}
RELATED = {"dog": {"cat"}, "fork": {"dining table", "hot dog"}, "car": {"bus"}}


@pytest.fixture
def vocab() -> ObjectVocabulary:
    return ObjectVocabulary(SYNONYMS, RELATED)


# ---------------------------------------------------------------------------
# CHAIR, hand-worked
# ---------------------------------------------------------------------------

CAPTIONS = [
    "A dog chases a cat. The dog barks.",  # GT {dog}: H={cat}
    "A hot dog on a table with forks.",  # all grounded
    "",  # empty caption
    "A puppy and a bus.",  # image with no objects
    "Two cats near a car.",  # H={cat}, missed {dog, bus}
]
GT = [{"dog"}, {"hot dog", "fork", "dining table"}, {"car"}, set(), ["dog", "bus", "car"]]


def test_chair_hand_worked(vocab):
    r = chair(CAPTIONS, GT, vocab)
    assert isinstance(r, ChairResult)
    assert r.n_captions == 5
    assert r.n_mentions == 10
    assert r.n_hallucinated_mentions == 4  # cat, puppy, bus, cats
    assert r.n_grounded_mentions == 6
    assert r.chair_i == pytest.approx(4 / 10)
    assert r.n_hallucinated_objects == 4
    assert r.chair_i_unique == pytest.approx(4 / 9)
    assert r.n_hallucinated_captions == 3
    assert r.chair_s == pytest.approx(3 / 5)
    # recall skips caption 3 (empty GT): (1 + 3 + 0 + 1) / (1 + 3 + 1 + 3)
    assert r.n_grounded_objects == 5
    assert r.recall == pytest.approx(5 / 8)
    assert r.mean_length == pytest.approx((8 + 8 + 0 + 5 + 5) / 5)
    # caption 0: H=1, Miss=0 -> add 1; caption 3: H=2, Miss=0 -> add 2;
    # caption 4: H=1, Miss=2 -> sub 1
    assert r.n_additions == 3
    assert r.n_substitutions == 1
    # partners: cap0 P={cat}: cat is a partner; cap3 P={}: none;
    # cap4 P={cat, bus}: cat is a partner  -> 2 / 4
    assert r.n_partner_hallucinations == 2
    assert r.partner_share == pytest.approx(0.5)
    # chance: cap0 1/6 (1 hallucination), cap3 0/7 (2), cap4 1/4 (1)
    assert r.partner_chance == pytest.approx((1 / 6 + 0 + 0 + 1 / 4) / 4)

    pc = r.per_caption
    assert len(pc) == 5 and all(isinstance(p, CaptionChair) for p in pc)
    assert pc[0].mentioned == {"dog", "cat"} and pc[0].hallucinated == {"cat"}
    assert pc[0].n_mentions == 3 and pc[0].n_hallucinated_mentions == 1
    assert pc[2].mentions == () and pc[2].missed == {"car"} and pc[2].n_words == 0
    assert pc[3].hallucinated == {"dog", "bus"} and pc[3].missed == frozenset()
    assert pc[4].missed == {"dog", "bus"}


def test_chair_as_dict_is_json_ready(vocab):
    r = chair(CAPTIONS, GT, vocab)
    d = r.as_dict()
    assert "per_caption" not in d
    assert d["chair_i"] == r.chair_i and d["n_additions"] == 3
    back = json.loads(json.dumps(d))
    assert back["n_mentions"] == 10


def test_chair_related_none_gives_none(vocab):
    r = chair(CAPTIONS, GT, ObjectVocabulary(SYNONYMS))
    assert r.partner_share is None
    assert r.partner_chance is None
    assert r.n_partner_hallucinations is None
    assert r.chair_i == pytest.approx(0.4)


def test_chair_nan_cases(vocab):
    # no mentions at all: CHAIR_i undefined, CHAIR_s = 0, partner undefined
    r = chair(["nothing here", ""], [{"dog"}, set()], vocab)
    assert is_nan(r.chair_i) and is_nan(r.chair_i_unique)
    assert r.chair_s == 0.0
    assert r.recall == 0.0
    assert is_nan(r.partner_share) and is_nan(r.partner_chance)
    assert r.n_partner_hallucinations == 0
    # every GT empty: recall undefined
    r = chair(["a dog"], [set()], vocab)
    assert is_nan(r.recall)
    assert r.chair_i == 1.0 and r.chair_s == 1.0
    # no captions at all: every rate undefined, nothing crashes
    r = chair([], [], vocab)
    for key in ("chair_i", "chair_i_unique", "chair_s", "recall", "mean_length",
                "partner_share", "partner_chance"):
        assert is_nan(getattr(r, key)), key
    assert r.n_captions == 0 and r.per_caption == []
    # mentions but no hallucinations: partner share undefined
    r = chair(["a dog"], [{"dog"}], vocab)
    assert r.chair_i == 0.0 and is_nan(r.partner_share) and is_nan(r.partner_chance)


def test_chair_substitutions_balance(vocab):
    # H = {cat, bus, fork} (3), Miss = {car} (1) -> 1 substitution, 2 additions
    r = chair(["a cat, a bus and a fork"], [{"car"}], vocab)
    assert (r.n_substitutions, r.n_additions) == (1, 2)
    # H = {cat}, Miss = {car, bus, dog} -> 1 substitution, 0 additions
    r = chair(["a cat"], [{"car", "bus", "dog"}], vocab)
    assert (r.n_substitutions, r.n_additions) == (1, 0)


def test_partner_directional():
    v = ObjectVocabulary.from_categories(["a", "b", "c", "d"], related={"a": {"b"}})
    # GT {a}: hallucinated b is a partner of a
    r = chair(["b"], [{"a"}], v)
    assert r.partner_share == 1.0
    assert r.partner_chance == pytest.approx(1 / 3)  # absent {b, c, d}, partner {b}
    # GT {b}: hallucinated a is NOT a partner (related is not symmetric here)
    r = chair(["a"], [{"b"}], v)
    assert r.partner_share == 0.0 and r.partner_chance == 0.0


# ---------------------------------------------------------------------------
# CHAIR vs an independent brute-force implementation
# ---------------------------------------------------------------------------

RAND_SYNONYMS = {
    "dog": "dog", "dogs": "dog",
    "hot dog": "hot dog", "hot dogs": "hot dog",
    "dog bed": "dog bed",
    "table": "dining table", "dining table": "dining table",
    "tennis racket": "tennis racket", "racket": "tennis racket",
    "tennis ball": "ball", "ball": "ball", "balls": "ball",
    "tennis ball machine": "machine", "machine": "machine",
    "cat": "cat", "cats": "cat", "kitten": "cat",
    "teddy bear": "teddy bear", "bear": "bear",
    "table tennis": "table tennis",
}
RAND_RELATED = {
    "dog": {"cat", "dog bed", "ball"},
    "tennis racket": {"ball", "machine"},
    "dining table": {"hot dog"},
    "bear": {"teddy bear"},
}
POOL = ["a", "the", "hot", "dog", "dogs", "bed", "dining", "table", "tennis",
        "racket", "ball", "balls", "machine", "cat", "cats", "kitten", "teddy",
        "bear", "on", "with", "red", "doghouse",
        # multi-word fragments so that long and overlapping phrases occur often
        "table tennis ball machine", "hot dog bed", "tennis ball machine",
        "teddy bear", "dining table tennis racket"]
PUNCT = [" ", " ", " ", ", ", ". ", "-", " (", ") ", "'s ", "! "]


def naive_extract(text: str, synonyms: dict[str, str]) -> list[tuple[str, int]]:
    """Reference-CHAIR style: replace the longest phrases in a padded string."""
    s = " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "
    found = []
    by_len: dict[int, list[str]] = {}
    for phrase in synonyms:
        by_len.setdefault(len(phrase.split()), []).append(phrase)
    for length in sorted(by_len, reverse=True):
        alt = "|".join(re.escape(p) for p in by_len[length])
        pattern = re.compile(r"(?<= )(?:" + alt + r")(?= )")

        def repl(m, length=length):
            index = s[: m.start()].count(" ") - 1
            found.append((synonyms[m.group(0)], index))
            return " ".join(["#"] * length)

        s = pattern.sub(repl, s)
    return sorted(found, key=lambda t: t[1])


def naive_chair(captions, gts, synonyms, related):
    cats = set(synonyms.values())
    tot = dict(m=0, hm=0, uo=0, ho=0, go=0, hc=0, rn=0, rd=0, w=0, add=0, sub=0,
               pn=0)
    chance_terms = []
    for cap, gt in zip(captions, gts):
        gt = set(gt)
        ms = naive_extract(cap, synonyms)
        mentioned = []
        for c, _ in ms:
            if c not in mentioned:
                mentioned.append(c)
        hall = [c for c in mentioned if c not in gt]
        missed = [g for g in gt if g not in mentioned]
        tot["m"] += len(ms)
        tot["hm"] += sum(1 for c, _ in ms if c not in gt)
        tot["uo"] += len(mentioned)
        tot["ho"] += len(hall)
        tot["go"] += len(mentioned) - len(hall)
        tot["hc"] += 1 if hall else 0
        if gt:
            tot["rn"] += sum(1 for g in gt if g in mentioned)
            tot["rd"] += len(gt)
        tot["w"] += len(re.sub(r"[^0-9a-z]+", " ", cap.lower()).split())
        s = 0
        h, mi = len(hall), len(missed)
        while h > 0 and mi > 0:  # pair one wrong name with one missed object
            s, h, mi = s + 1, h - 1, mi - 1
        tot["sub"] += s
        tot["add"] += h
        for x in hall:
            is_partner = any(x in related.get(g, ()) for g in gt)
            tot["pn"] += int(is_partner)
            absent = [c for c in sorted(cats) if c not in gt]
            n_p = sum(1 for c in absent if any(c in related.get(g, ()) for g in gt))
            chance_terms.append(n_p / len(absent))
    div = lambda a, b: a / b if b else nan  # noqa: E731
    n = len(captions)
    return {
        "chair_i": div(tot["hm"], tot["m"]),
        "chair_i_unique": div(tot["ho"], tot["uo"]),
        "chair_s": div(tot["hc"], n),
        "recall": div(tot["rn"], tot["rd"]),
        "mean_length": div(tot["w"], n),
        "n_captions": n,
        "n_mentions": tot["m"],
        "n_hallucinated_mentions": tot["hm"],
        "n_grounded_mentions": tot["m"] - tot["hm"],
        "n_hallucinated_objects": tot["ho"],
        "n_grounded_objects": tot["go"],
        "n_hallucinated_captions": tot["hc"],
        "n_additions": tot["add"],
        "n_substitutions": tot["sub"],
        "n_partner_hallucinations": tot["pn"],
        "partner_share": div(tot["pn"], len(chance_terms)),
        "partner_chance": div(sum(chance_terms), len(chance_terms)),
    }


def random_caption(rng: random.Random) -> str:
    words = [rng.choice(POOL) for _ in range(rng.randint(0, 12))]
    words = [w.upper() if rng.random() < 0.1 else w for w in words]
    out = ""
    for w in words:
        out += w + rng.choice(PUNCT)
    return out


def test_chair_matches_brute_force():
    vocab = ObjectVocabulary(RAND_SYNONYMS, RAND_RELATED)
    cats = sorted(vocab.categories)
    rng = random.Random(1234)
    for trial in range(30):
        n = rng.randint(1, 25)
        captions = [random_caption(rng) for _ in range(n)]
        gts = [set(rng.sample(cats, rng.randint(0, 4))) for _ in range(n)]
        for cap in captions:
            got = [(m.category, m.word_index) for m in vocab.extract(cap)]
            assert got == naive_extract(cap, RAND_SYNONYMS), cap
        expected = naive_chair(captions, gts, RAND_SYNONYMS, RAND_RELATED)
        got = chair(captions, gts, vocab).as_dict()
        assert set(got) == set(expected)
        for key, value in expected.items():
            if is_nan(value):
                assert is_nan(got[key]), (trial, key)
            else:
                assert got[key] == pytest.approx(value), (trial, key)


# ---------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is.", True),
        ("No.", False),
        ("There is not a cat", False),
        ("I think yes", True),
        ("maybe", None),
        ("", None),
        ("YES", True),
        ("no, there is no dog", False),
        ("Yes, but there is no dog.", True),  # first word decides
        ("There is no dog, yes.", False),  # a negation beats a later yes
        ("There isn't a cat.", False),
        ("There isn\u2019t a cat.", False),
        ("There is a cat in the image.", None),
        ("Nope", None),
        ("yesterday I saw a dog", None),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


def test_pope_hand_worked():
    answers = ["Yes.", "yes", "No", "no", "No, there isn't.", "Yes", "maybe", "hmm"]
    labels = [True, True, True, False, False, False, True, False]
    # yes&T: 2 (tp), no&T: 1 (fn), no&F: 2 (tn), yes&F: 1 (fp), unparsed: 2
    r = pope(answers, labels)
    assert isinstance(r, PopeResult)
    assert (r.tp, r.fp, r.tn, r.fn, r.n, r.n_unparsed) == (2, 1, 2, 1, 8, 2)
    assert r.accuracy == pytest.approx(4 / 8)
    assert r.precision == pytest.approx(2 / 3)
    assert r.recall == pytest.approx(2 / 3)
    assert r.f1 == pytest.approx(2 / 3)
    assert r.yes_ratio == pytest.approx(3 / 8)
    d = r.as_dict()
    assert d["tp"] == 2 and d["n_unparsed"] == 2
    json.dumps(d)


def test_pope_accepts_parsed_answers_and_numpy_labels():
    r = pope([True, False, None], np.array([True, True, False]))
    assert (r.tp, r.fp, r.tn, r.fn, r.n_unparsed) == (1, 0, 0, 1, 1)
    assert r.precision == 1.0 and r.recall == 0.5


def test_pope_nan_cases():
    r = pope(["no", "no"], [False, False])  # never says yes, no positives
    assert r.accuracy == 1.0 and r.yes_ratio == 0.0
    assert is_nan(r.precision) and is_nan(r.recall) and is_nan(r.f1)
    r = pope(["maybe"], [True])
    assert r.accuracy == 0.0 and r.n_unparsed == 1
    assert is_nan(r.precision) and is_nan(r.recall) and is_nan(r.f1)
    r = pope(["yes"], [False])
    assert r.precision == 0.0 and is_nan(r.recall) and r.f1 == 0.0


def test_pope_matches_array_formulas():
    rng = np.random.default_rng(7)
    choices = np.array(["yes", "No.", "not sure", "Yes it is", "unknown"])
    ans = list(rng.choice(choices, size=200))
    lab = [bool(x) for x in rng.random(200) < 0.5]
    r = pope(ans, lab)
    y = np.array([a in ("yes", "Yes it is") for a in ans])
    n_ = np.array([a in ("No.", "not sure") for a in ans])
    L = np.array(lab)
    tp, fp = int((y & L).sum()), int((y & ~L).sum())
    tn, fn = int((n_ & ~L).sum()), int((n_ & L).sum())
    assert (r.tp, r.fp, r.tn, r.fn) == (tp, fp, tn, fn)
    assert r.n_unparsed == 200 - int(y.sum() + n_.sum())
    p, rc = tp / (tp + fp), tp / (tp + fn)
    assert r.f1 == pytest.approx(2 * p * rc / (p + rc))
    assert r.accuracy == pytest.approx((tp + tn) / 200)
    assert r.yes_ratio == pytest.approx(y.mean())


# ---------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------


def test_chair_bad_inputs(vocab):
    with pytest.raises(TypeError, match=r"ground_truth\[1\] is a bare str 'dog'"):
        chair(["a", "b"], [{"dog"}, "dog"], vocab)
    with pytest.raises(ValueError, match=r"ground_truth\[2\] contains unknown category 'zebra'.*valid categories include 'bus', 'car'"):
        chair(["a", "b", "c"], [{"dog"}, set(), {"dog", "zebra"}], vocab)
    with pytest.raises(ValueError, match="differ in length: 2 captions vs 1"):
        chair(["a", "b"], [{"dog"}], vocab)
    with pytest.raises(TypeError, match="captions must be a sequence of str"):
        chair("a dog", [{"dog"}], vocab)
    with pytest.raises(TypeError, match=r"captions\[1\] must be a str"):
        chair(["a", None], [set(), set()], vocab)
    with pytest.raises(TypeError, match=r"ground_truth\[0\] must be a collection"):
        chair(["a"], [3], vocab)
    with pytest.raises(TypeError, match=r"ground_truth\[0\] contains non-str 7"):
        chair(["a"], [[7]], vocab)
    with pytest.raises(TypeError, match="ground_truth must be a sequence"):
        chair(["a"], "dog", vocab)
    with pytest.raises(TypeError, match="vocab must be an ObjectVocabulary"):
        chair(["a"], [set()], {"dog": "dog"})  # type: ignore[arg-type]


def test_pope_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        pope([], [])
    with pytest.raises(ValueError, match="differ in length: 2 answers vs 1 labels"):
        pope(["yes", "no"], [True])
    with pytest.raises(TypeError, match=r"labels\[1\] must be a bool.*int 1"):
        pope(["yes", "no"], [True, 1])
    with pytest.raises(TypeError, match=r"answers\[0\] must be a str, bool or None"):
        pope([1], [True])
    with pytest.raises(TypeError, match="answers must be a sequence"):
        pope("yes", [True, True, True])
    with pytest.raises(TypeError, match="labels must be a sequence of bool"):
        pope(["yes"], "T")
    with pytest.raises(TypeError, match="answer must be a str"):
        parse_yes_no(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Killing the survivors of a mutation run (tests/mutation.py)
# ----------------------------------------------------------------------------------------------------------------


def test_results_are_immutable_and_their_repr_is_short(vocab):
    import dataclasses

    res = chair(["a dog on a table"], [{"dog"}], vocab)
    pc = res.per_caption[0]
    for obj, field_name in ((pc, "n_words"), (pc.mentions[0], "category"), (vocab, "synonyms")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field_name, None)
    assert "per_caption" not in repr(res) and "_by_length" not in repr(vocab)
    with pytest.raises(TypeError):
        ObjectVocabulary({"dog": "dog"}, None, {})  # the phrase index is derived, never passed in


def test_unknown_category_error_shows_five_categories_then_the_total():
    five = ObjectVocabulary.from_categories(["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError) as err:
        chair(["x"], [{"z"}], five)
    assert str(err.value).endswith("valid categories include 'a', 'b', 'c', 'd', 'e'")  # exactly five: no total
    six = ObjectVocabulary.from_categories(["a", "b", "c", "d", "e", "f"])
    with pytest.raises(ValueError) as err:
        chair(["x"], [{"z"}], six)
    assert str(err.value).endswith("valid categories include 'a', 'b', 'c', 'd', 'e', ... (6 in total)")
