"""Tests for dleaf.eval.compare and dleaf.eval.scores: per-item scores, the statistics computed from them against
the metric core and by hand, paired bootstrap intervals against an independent resampling loop, the tables."""

import json
import re

import numpy as np
import pytest

from dleaf import eval as harness
from dleaf import metrics
from dleaf.io import InputError
from dleaf.organism import world
from dleaf.organism.benchmarks import VOCAB


def _scores(captions, scenes, split="adversarial"):
    res = metrics.chair(captions, [s.objects for s in scenes], VOCAB)
    return [{"id": f"{split}/{i}", "section": split, "kind": "caption", "n_words": pc.n_words,
             "n_mentions": pc.n_mentions, "n_hallucinated_mentions": pc.n_hallucinated_mentions,
             "hallucinated": sorted(pc.hallucinated), "grounded": sorted(pc.mentioned - pc.hallucinated),
             "n_truth": len(s.objects)} for i, (s, pc) in enumerate(zip(scenes, res.per_caption))], res


def _captions(scenes, rng, p_extra):
    caps = []
    for s in scenes:
        words = list(s.objects[: max(1, len(s.objects) - int(rng.random() < 0.2))])
        if rng.random() < p_extra:
            words.append(str(rng.choice([o for o in world.OBJECTS if o not in s.object_set])))
        caps.append("there is a " + " and a ".join(words) + " .")
    return caps


def test_caption_stats_equal_the_metric_core():
    scenes = world.scenes("adversarial", 60)
    scores, res = _scores(_captions(scenes, np.random.default_rng(0), 0.4), scenes)
    got = harness.caption_stats(scores)
    for key in ("chair_s", "chair_i", "recall", "mean_length"):
        assert got[key] == pytest.approx(getattr(res, key))
    assert got["n_hallucinated_mentions"] == res.n_hallucinated_mentions
    assert got["n_grounded_mentions"] == res.n_grounded_mentions


def test_paired_difference_matches_a_brute_force_bootstrap():
    from dleaf.eval import compare

    scenes = world.scenes("adversarial", 200)
    base, _ = _scores(_captions(scenes, np.random.default_rng(1), 0.5), scenes)
    other, _ = _scores(_captions(scenes, np.random.default_rng(2), 0.2), scenes)
    b, o = compare.caption_arrays(base), compare.caption_arrays(other)
    f = compare.CAPTION_STATISTICS["chair_i"]
    d = compare.paired_difference(b, o, f, n_resamples=3000)
    assert d["diff"] == pytest.approx(harness.caption_stats(other)["chair_i"] - harness.caption_stats(base)["chair_i"])
    rng = np.random.default_rng(5)
    boot = []
    for _ in range(3000):
        idx = rng.integers(0, len(base), len(base))  # whole items (both runs' rows of an image) resampled together
        boot.append(f(*(x[idx] for x in o)) - f(*(x[idx] for x in b)))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert d["low"] == pytest.approx(lo, abs=0.015) and d["high"] == pytest.approx(hi, abs=0.015)
    assert d["low"] < d["diff"] < d["high"] < 0  # fewer extras -> lower CHAIR_i
    assert compare.paired_difference(b, b, f, n_resamples=200) == {"diff": 0.0, "low": 0.0, "high": 0.0}
    whole = compare.paired_differences(base, other, n_resamples=500)["adversarial"]
    assert whole["chair_i"]["diff"] == pytest.approx(d["diff"])
    with pytest.raises(InputError, match="do not score the same items"):
        compare.paired_differences(base, other[1:])


def test_pope_statistics_equal_the_metric_core():
    from dleaf.eval import compare

    pairs = [(True, "yes"), (True, "no ."), (False, "yes , there is"), (False, "no"), (True, "yes"), (False, "no"),
             (True, "maybe"), (False, "a cup")]
    scores = [{"label": lab, "answer": metrics.parse_yes_no(a)} for lab, a in pairs]
    p = metrics.pope([a for _, a in pairs], [lab for lab, _ in pairs])
    assert p.n_unparsed == 2
    arrays = compare.pope_arrays(scores)
    # tp 2, fn 1, fp 1, tn 2, two unparsed answers (wrong, and neither fp nor fn)
    assert compare.pope_accuracy(*arrays) == pytest.approx(p.accuracy) == pytest.approx(4 / 8)
    assert compare.pope_f1(*arrays) == pytest.approx(p.f1) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


# ---------------------------------------------------------------------------------------------------------------
# Hand-worked statistics, edges and the tables (killing the survivors of tests/mutation.py)
# ---------------------------------------------------------------------------------------------------------------


def _cap(i, section="s", hallucinated=(), grounded=(), n_mentions=None, n_hall=None, n_truth=3, n_words=10):
    n_hall = len(hallucinated) if n_hall is None else n_hall
    n_mentions = n_hall + len(grounded) if n_mentions is None else n_mentions
    return {"id": f"{section}/{i}", "section": section, "kind": "caption", "n_words": n_words,
            "n_mentions": n_mentions, "n_hallucinated_mentions": n_hall, "hallucinated": list(hallucinated),
            "grounded": list(grounded), "n_truth": n_truth}


def test_caption_arrays_and_statistics_by_hand():
    from dleaf.eval import compare

    rows = [_cap(0, hallucinated=["cat"], grounded=["dog"], n_mentions=4, n_hall=2, n_truth=2, n_words=7),
            _cap(1, grounded=["cup", "fork"], n_mentions=3, n_hall=0, n_truth=4, n_words=5)]
    hc, hm, gm, ho, go, n, w = compare.caption_arrays(rows)
    assert hc.tolist() == [1.0, 0.0] and hm.tolist() == [2.0, 0.0] and gm.tolist() == [2.0, 3.0]
    assert ho.tolist() == [1.0, 0.0] and go.tolist() == [1.0, 2.0] and n.tolist() == [2.0, 4.0]
    assert w.tolist() == [7.0, 5.0] and hc.dtype == float
    stats_ = compare.caption_stats(rows)
    assert stats_ == {"chair_s": 0.5, "chair_i": 2 / 7, "recall": 3 / 6, "mean_length": 6.0,
                      "hallucinated_mentions_per_image": 1.0, "grounded_mentions_per_image": 2.5, "n_images": 2,
                      "n_hallucinated_mentions": 2, "n_grounded_mentions": 5, "n_hallucinated_objects": 1,
                      "n_grounded_objects": 3}
    assert all(type(stats_[k]) is int for k in ("n_images", "n_hallucinated_mentions", "n_grounded_objects"))


def test_ratios_with_nothing_to_divide_are_nan_and_rows_are_items():
    from dleaf.eval import compare

    empty = compare.caption_arrays([_cap(0, n_mentions=0, n_truth=0), _cap(1, n_mentions=0, n_truth=0)])
    got = {k: f(*empty) for k, f in compare.CAPTION_STATISTICS.items()}
    assert np.isnan(got["chair_i"]) and np.isnan(got["recall"]) and got["chair_s"] == 0.0
    # the bootstrap calls each statistic on (resamples x items) arrays: one value per row, computed along the row
    rows = [_cap(i, hallucinated=["x"] * (i % 2), grounded=["y"] * (i % 3), n_truth=1 + i % 4, n_words=i)
            for i in range(6)]
    arrays = compare.caption_arrays(rows)
    idx = np.array([[0, 1, 2, 3, 4, 5], [5, 5, 4, 4, 0, 0], [1, 1, 1, 1, 1, 1]])
    for name, f in compare.CAPTION_STATISTICS.items():
        many = f(*(a[idx] for a in arrays), axis=-1)
        one = [f(*(a[row] for a in arrays)) for row in idx]
        np.testing.assert_allclose(many, one, equal_nan=True, err_msg=name)
    yes, no, label = (np.array(v, float) for v in ([1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0]))
    pope_idx = np.array([[0, 1, 2, 3], [2, 2, 2, 2]])
    for f in compare.POPE_STATISTICS.values():
        np.testing.assert_allclose(f(yes[pope_idx], no[pope_idx], label[pope_idx], axis=-1),
                                   [f(yes[r], no[r], label[r]) for r in pope_idx])


def test_pope_statistics_by_hand_and_without_any_positive():
    from dleaf.eval import compare

    scores = [{"answer": True, "label": True}, {"answer": False, "label": True}, {"answer": None, "label": True},
              {"answer": True, "label": False}, {"answer": False, "label": False}, {"answer": None, "label": False}]
    yes, no, label = compare.pope_arrays(scores)
    assert yes.tolist() == [1, 0, 0, 1, 0, 0] and no.tolist() == [0, 1, 0, 0, 1, 0]
    assert label.tolist() == [1, 1, 1, 0, 0, 0]
    assert compare.pope_accuracy(yes, no, label) == pytest.approx(2 / 6)
    assert compare.pope_f1(yes, no, label) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    nothing = [{"answer": None, "label": False}, {"answer": False, "label": False}]
    assert compare.pope_f1(*compare.pope_arrays(nothing)) == 0.0  # no tp, fp or fn: F1 0, not NaN
    assert compare.pope_accuracy(*compare.pope_arrays(nothing)) == 0.5


def test_paired_difference_seed_confidence_and_resamples():
    from dleaf.eval import compare

    rng = np.random.default_rng(3)
    base = (rng.random(80) < 0.5).astype(float),
    other = (rng.random(80) < 0.3).astype(float),
    mean = lambda x, axis=-1: np.mean(x, axis=axis)  # noqa: E731
    a = compare.paired_difference(base, other, mean, n_resamples=400, seed=1)
    assert a == compare.paired_difference(base, other, mean, n_resamples=400, seed=1)
    assert a != compare.paired_difference(base, other, mean, n_resamples=400, seed=2)
    assert a["diff"] == pytest.approx(other[0].mean() - base[0].mean())
    narrow = compare.paired_difference(base, other, mean, n_resamples=400, seed=1, confidence=0.5)
    assert a["low"] < narrow["low"] < narrow["high"] < a["high"]
    # the interval is the percentile interval of an independent paired resampling loop
    rs = np.random.default_rng(7)
    loop = [mean(other[0][i]) - mean(base[0][i]) for i in (rs.integers(0, 80, 80) for _ in range(4000))]
    lo, hi = np.percentile(loop, [25, 75])
    wide = compare.paired_difference(base, other, mean, n_resamples=4000, seed=1, confidence=0.5)
    assert wide["low"] == pytest.approx(lo, abs=0.02) and wide["high"] == pytest.approx(hi, abs=0.02)
    import warnings

    with warnings.catch_warnings():  # a difference that never varies: the interval [d, d], without a warning
        warnings.simplefilter("error")
        assert compare.paired_difference(base, base, mean, n_resamples=100) == {"diff": 0.0, "low": 0.0, "high": 0.0}


def test_paired_differences_by_section_and_kind():
    from dleaf.eval import compare

    base = [_cap(i, "a", hallucinated=["x"] * (i % 2)) for i in range(6)] + \
        [{"id": f"q/{i}", "section": "q", "kind": "yesno", "label": bool(i % 2), "answer": True} for i in range(6)]
    other = [_cap(i, "a") for i in range(6)] + \
        [{"id": f"q/{i}", "section": "q", "kind": "yesno", "label": bool(i % 2), "answer": bool(i % 2)}
         for i in range(6)]
    res = compare.paired_differences(base, list(reversed(other)), n_resamples=100)  # matched by id, not order
    assert list(res) == ["a", "q"]
    assert set(res["a"]) == set(compare.CAPTION_STATISTICS) and set(res["q"]) == {"pope_accuracy", "pope_f1"}
    assert res["a"]["chair_s"]["diff"] == pytest.approx(-0.5)
    assert res["q"]["pope_accuracy"]["diff"] == pytest.approx(0.5)


def _run_dir(tmp_path, name, scores, sections, protocol=None, run=None):
    from dleaf.io import write_json_atomic

    d = tmp_path / name
    d.mkdir()
    (d / compare_module().SCORES).write_text("".join(json.dumps(r) + "\n" for r in scores))
    write_json_atomic({"benchmark": "b", "protocol": protocol or {"name": "p", "version": 1, "sha256": "h"},
                       "run": run or {"method": "greedy"}, "sections": sections}, d / compare_module().METRICS)
    return d


def compare_module():
    from dleaf.eval import compare

    return compare


def test_formatting_helpers():
    compare = compare_module()
    assert compare.pct(None) == "nan" and compare.pct(float("nan")) == "nan" and compare.pct(0.12345) == "12.3"
    assert compare.pct(0) == "0.0"
    assert compare.method_label({"method": "dleaf", "knobs": {"kappa": 1, "gamma": 0.3}, "adapter": "a",
                                 "decoding": {"strategy": "sample"}}) == "dleaf (gamma=0.3, kappa=1) + adapter, sample"
    assert compare.method_label({"method": "greedy", "decoding": {"strategy": "greedy"}}) == "greedy"
    assert compare.method_label({}) == "?"


def test_comparison_table_rows_intervals_and_notes(tmp_path):
    compare = compare_module()
    cap = {"kind": "caption", "n_captions": 2, "chair_s": 0.5, "chair_i": 0.25, "recall": 0.75, "mean_length": 9.25,
           "n_hallucinated_mentions": 3, "n_grounded_mentions": 9}
    yn = {"kind": "yesno", "n": 4, "accuracy": 0.75, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "yes_ratio": 0.25,
          "n_unparsed": 1}
    rows = [_cap(0, "a", hallucinated=["x"]), _cap(1, "a")]
    yes = [{"id": f"q/{i}", "section": "q", "kind": "yesno", "label": i < 2, "answer": i == 0} for i in range(4)]
    a = _run_dir(tmp_path, "ra", rows + yes, {"a": cap, "q": yn})
    b = _run_dir(tmp_path, "rb", [_cap(0, "a"), _cap(1, "a")] + yes, {"a": dict(cap, chair_s=0.0), "q": yn},
                 protocol={"name": "p", "version": 1, "sha256": "h", "overrides": {"limit": 2}},
                 run={"method": "dleaf", "knobs": {"gamma": 0.3}})
    plain = compare.comparison_table([a, b])
    assert "| ra | greedy | a | p v1 | 2 | 50.0 | 25.0 | 75.0 | 9.2 | 3 | 9 |" in plain
    assert "| rb | dleaf (gamma=0.3) | a | p v1 * | 2 | 0.0 | 25.0 | 75.0 | 9.2 | 3 | 9 |" in plain
    assert "| ra | greedy | q | p v1 | 4 | 75.0 | 100.0 | 50.0 | 66.7 | 25.0 | 1 |" in plain
    assert "\\* run with protocol overrides" in plain and "different protocols" in plain
    assert "In parentheses" not in plain
    paired = compare.comparison_table([a, b], paired=True, n_resamples=50)
    row = next(line for line in paired.splitlines() if line.startswith("| rb | dleaf (gamma=0.3) | a |"))
    assert re.search(r"\| 2 \| 0\.0 \(-50\.0 \[-100\.0, \+0\.0\]\) \| 25\.0 \(n/a\) \| "
                     r"75\.0 \(\+0\.0 \[\+0\.0, \+0\.0\]\) \| 9\.2 \| 3 \| 9 \|$", row), row
    qrow = next(line for line in paired.splitlines() if line.startswith("| rb | dleaf (gamma=0.3) | q |"))
    assert "| 75.0 (+0.0 [+0.0, +0.0]) | 100.0 | 50.0 | 66.7 (+0.0 [+0.0, +0.0]) | 25.0 | 1 |" in qrow
    assert "In parentheses: difference from ra on the same items" in paired
    assert "n/a: the statistic is undefined" in paired
    same = compare.comparison_table([a])
    assert "overrides" not in same and "Warning" not in same and same.endswith("|\n")
    only_captions = _run_dir(tmp_path, "rc", rows, {"a": cap})
    assert "accuracy %" not in compare.comparison_table([only_captions])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / compare.METRICS).write_text("[]")
    with pytest.raises(InputError, match="not one written by the evaluation harness"):
        compare.comparison_table([tmp_path / "bad"])
    with pytest.raises(InputError, match="has no scores.jsonl"):
        compare.read_scores(tmp_path / "bad")
    assert compare.compare_runs(a, b, n_resamples=50)["a"]["chair_s"]["diff"] == pytest.approx(-0.5)


# ---------------------------------------------------------------------------------------------------------------
# dleaf.eval.scores
# ---------------------------------------------------------------------------------------------------------------


def _benchmark():
    from dleaf.eval.registry import Benchmark, Item

    vocab = metrics.ObjectVocabulary.from_categories(["dog", "cat", "cup"])
    items = [Item("c/0", "c", "caption", "p", lambda: None, {"dog", "cup"}),
             Item("c/1", "c", "caption", "p", lambda: None, ["cat", "cat"]),
             Item("y/0", "y", "yesno", "q", lambda: None, True),
             Item("y/1", "y", "yesno", "q", lambda: None, False),
             Item("y/2", "y", "yesno", "q", lambda: None, True)]
    return Benchmark("toy", None, items, vocab)


def test_section_metrics_and_item_scores_equal_the_metric_core():
    from dleaf.eval import scores

    bench = _benchmark()
    texts = {"c/0": "a dog and a cat .", "c/1": "two cats", "y/0": "yes", "y/1": "yes , there is", "y/2": "hmm"}
    rows = [{"id": k, "text": v} for k, v in texts.items()]
    got = scores.compute_metrics(bench, rows)
    assert list(got) == ["c", "y"]
    assert got["c"] == {"kind": "caption", **metrics.chair([texts["c/0"], texts["c/1"]],
                                                           [{"dog", "cup"}, ["cat"]], bench.vocab).as_dict()}
    pope = metrics.pope(["yes", "yes , there is", "hmm"], [True, False, True])
    official = metrics.pope(["yes", "yes , there is", "hmm"], [True, False, True], "pope_official").as_dict()
    # the project's rule (a benchmark's default) and, beside it, what the official rule counts ("hmm" is a yes)
    assert got["y"] == {"kind": "yesno", **pope.as_dict(),
                        "pope_official": {k: official[k] for k in ("accuracy", "precision", "recall", "f1",
                                                                   "yes_ratio")}}
    assert got["y"]["pope_official"]["yes_ratio"] == 1.0 and got["y"]["yes_ratio"] == pytest.approx(2 / 3)
    assert scores.compute_metrics(bench, {r["id"]: r for r in rows}) == got  # rows by id work too
    items = scores.item_scores(bench, rows)
    assert items[0] == {"id": "c/0", "section": "c", "kind": "caption", "n_words": 5, "n_mentions": 2,
                        "n_hallucinated_mentions": 1, "hallucinated": ["cat"], "grounded": ["dog"], "n_truth": 2}
    assert items[1]["n_truth"] == 1 and items[1]["grounded"] == ["cat"]  # a repeated truth counts once
    assert items[2:] == [{"id": "y/0", "section": "y", "kind": "yesno", "label": True, "answer": True},
                         {"id": "y/1", "section": "y", "kind": "yesno", "label": False, "answer": True},
                         {"id": "y/2", "section": "y", "kind": "yesno", "label": True, "answer": None}]
    from dleaf.eval import compare

    assert compare.caption_stats(items[:2])["chair_i"] == pytest.approx(got["c"]["chair_i"])
    with pytest.raises(ValueError, match="2 items have no generation yet \\(first 'y/1'\\)"):
        scores.item_scores(bench, rows[:3])
    with pytest.raises(ValueError, match="no generation yet"):
        scores.compute_metrics(bench, rows[1:])
