"""Tests for dleaf.vocabulary: the tokenizer, object vocabularies and longest-match-first mention extraction."""

from __future__ import annotations

import pytest

from dleaf.vocabulary import Mention, ObjectVocabulary, category_examples, is_collection, tokenize

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
# tokenize / vocabulary / extract
# ---------------------------------------------------------------------------


def test_tokenize_splits_on_punctuation_and_apostrophes():
    assert tokenize("The dog's Hot-Dog, on_a table!") == [
        "the", "dog", "s", "hot", "dog", "on", "a", "table",
    ]
    assert tokenize("") == []
    assert tokenize("  ...  ") == []


def test_vocabulary_categories_and_read_only(vocab):
    assert vocab.categories == frozenset(
        {"dog", "cat", "hot dog", "fork", "dining table", "car", "bus"}
    )
    assert vocab.related["dog"] == frozenset({"cat"})
    assert isinstance(vocab.related["fork"], frozenset)
    with pytest.raises(TypeError):
        vocab.synonyms["zebra"] = "zebra"  # type: ignore[index]
    src = dict(SYNONYMS)
    v = ObjectVocabulary(src)
    src["zebra"] = "zebra"
    assert "zebra" not in v.categories
    assert v.related is None
    assert hash(v) == hash(ObjectVocabulary(dict(SYNONYMS)))
    assert v == ObjectVocabulary(dict(SYNONYMS))


def test_from_categories_plurals():
    v = ObjectVocabulary.from_categories(
        ["bus", "box", "bench", "dish", "cup", "wine glass", "buzz"]
    )
    for plural, cat in [
        ("buses", "bus"), ("boxes", "box"), ("benches", "bench"), ("dishes", "dish"),
        ("cups", "cup"), ("wine glasses", "wine glass"), ("buzzes", "buzz"),
    ]:
        assert v.synonyms[plural] == cat
        assert v.synonyms[cat] == cat
    v2 = ObjectVocabulary.from_categories(["cup", "bus"], plurals=False)
    assert dict(v2.synonyms) == {"cup": "cup", "bus": "bus"}
    # an explicit name wins over a generated plural that spells it
    v3 = ObjectVocabulary.from_categories(["glass", "glasses"])
    assert v3.synonyms["glasses"] == "glasses"
    v4 = ObjectVocabulary.from_categories(["dog", "cat"], related={"dog": ["cat"]})
    assert v4.related == {"dog": frozenset({"cat"})}


def test_extract_synonyms_plurals_multiword_in_order(vocab):
    ms = vocab.extract("Two Puppies? No: a puppy, three CATS and a Dining-Table.")
    assert ms == [
        Mention("puppy", "dog", 4),
        Mention("cats", "cat", 6),
        Mention("dining table", "dining table", 9),
    ]


def test_extract_longest_match_consumes_words(vocab):
    # the first "dog" belongs to "hot dog" and must not be matched again
    ms = vocab.extract("A hot dog and a dog.")
    assert [(m.surface, m.category, m.word_index) for m in ms] == [
        ("hot dog", "hot dog", 1),
        ("dog", "dog", 5),
    ]
    # "dining table" is one mention, not "table" as well
    assert [m.category for m in vocab.extract("the dining table")] == ["dining table"]
    assert [m.category for m in vocab.extract("hot dogs")] == ["hot dog"]


def test_extract_global_longest_first():
    # Longer phrases are matched over the whole caption before shorter ones,
    # so "b c d" (3 words) wins over "a b" (2 words) even though "a b" starts
    # first.
    v = ObjectVocabulary({"a b": "ab", "b c d": "bcd", "a": "a", "c": "c"})
    ms = v.extract("a b c d")
    assert [(m.category, m.word_index) for m in ms] == [("a", 0), ("bcd", 1)]
    # within one length, left to right
    v2 = ObjectVocabulary({"a b": "ab", "b c": "bc", "c": "c"})
    assert [(m.category, m.word_index) for m in v2.extract("a b c")] == [
        ("ab", 0), ("c", 2),
    ]


def test_extract_repeats_and_empty(vocab):
    ms = vocab.extract("dog dog, DOG")
    assert [m.word_index for m in ms] == [0, 1, 2]
    assert vocab.extract("") == []
    assert vocab.extract("nothing to see here") == []
    # no substring matching inside words
    assert vocab.extract("dogma cathedral carpet") == []


def test_synonym_keys_are_normalized():
    v = ObjectVocabulary({"Hot-Dog": "hot dog", "hot dog": "hot dog"})
    assert [m.category for m in v.extract("a HOT dog")] == ["hot dog"]



# ---------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "synonyms, related, exc, match",
    [
        ({}, None, ValueError, "must not be empty"),
        (["dog"], None, TypeError, "synonyms must be a mapping"),
        ({"dog": 3}, None, TypeError, r"synonyms\['dog'\]"),
        ({3: "dog"}, None, TypeError, "synonyms key 3"),
        ({"dog": "  "}, None, ValueError, r"synonyms\['dog'\] is an empty"),
        ({"...": "dog"}, None, ValueError, r"'\.\.\.' contains no words"),
        ({"hot dog": "hot dog", "hot-dog": "dog"}, None, ValueError, "'hot-dog'"),
        ({"dog": "dog"}, ["dog"], TypeError, "related must be a mapping"),
        ({"dog": "dog"}, {"zebra": {"dog"}}, ValueError, "related key 'zebra'"),
        ({"dog": "dog"}, {"dog": {"zebra"}}, ValueError, r"related\['dog'\] contains 'zebra'"),
        ({"dog": "dog", "cat": "cat"}, {"dog": "cat"}, TypeError, r"related\['dog'\]"),
        ({"dog": "dog"}, {"dog": [1]}, TypeError, r"related\['dog'\] contains non-str 1"),
        ({"dog": "dog"}, {1: ["dog"]}, TypeError, "related key 1"),
    ],
)
def test_vocabulary_bad_inputs(synonyms, related, exc, match):
    with pytest.raises(exc, match=match):
        ObjectVocabulary(synonyms, related)


def test_vocabulary_error_lists_valid_categories():
    with pytest.raises(ValueError, match="valid categories include 'cat', 'dog'"):
        ObjectVocabulary({"dog": "dog", "cat": "cat"}, {"zebra": set()})


def test_from_categories_bad_inputs():
    with pytest.raises(TypeError, match="bare str"):
        ObjectVocabulary.from_categories("dog")
    with pytest.raises(TypeError, match="category name 5"):
        ObjectVocabulary.from_categories(["dog", 5])


def test_tokenize_and_extract_bad_input(vocab):
    with pytest.raises(TypeError, match="text must be a str"):
        tokenize(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text must be a str"):
        vocab.extract(3)  # type: ignore[arg-type]


def test_helpers():
    assert is_collection(["a"]) and is_collection({"a"}) and is_collection(iter(()))
    assert not is_collection("a") and not is_collection(b"a") and not is_collection(3)
    assert category_examples({"b", "a"}) == "valid categories include 'a', 'b'"
    assert category_examples("abcdef", k=2) == "valid categories include 'a', 'b', ... (6 in total)"


def test_metrics_re_exports_the_vocabulary():
    from dleaf import metrics

    assert metrics.ObjectVocabulary is ObjectVocabulary and metrics.tokenize is tokenize
    assert metrics.Mention is Mention


# ----------------------------------------------------------------------------------------------------------------
# Killing the survivors of a mutation run (tests/mutation.py)
# ----------------------------------------------------------------------------------------------------------------


def test_a_phrase_longer_than_the_caption_does_not_stop_shorter_ones():
    v = ObjectVocabulary({"big red fire truck": "truck", "dog": "dog", "hot dog": "hot dog"})
    assert [m.category for m in v.extract("a dog")] == ["dog"]  # 2 words: the 4-word phrase is skipped, not the rest
    assert [m.category for m in v.extract("dog")] == ["dog"]


def test_vocabulary_and_mentions_are_frozen_and_the_index_is_derived():
    import dataclasses

    v = ObjectVocabulary({"dog": "dog"})
    m = v.extract("a dog")[0]
    for obj, name in ((v, "synonyms"), (m, "category")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)
    assert "_by_length" not in repr(v) and repr(m) == "Mention(surface='dog', category='dog', word_index=1)"
    with pytest.raises(TypeError):
        ObjectVocabulary({"dog": "dog"}, None, {})  # the phrase index is never passed in


def test_category_examples_shows_five_then_the_total():
    assert category_examples("abcde") == "valid categories include 'a', 'b', 'c', 'd', 'e'"
    assert category_examples("abcdef") == "valid categories include 'a', 'b', 'c', 'd', 'e', ... (6 in total)"
