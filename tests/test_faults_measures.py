"""The fault benchmark's statistics (dleaf/faults/measures.py) against independent computations: loops over
hand-made replies and scores, hand-worked examples, a brute-force pair count for the AUROC."""

import math

import numpy as np
import pytest

from dleaf import metrics
from dleaf.faults import measures as fm
from dleaf.faults import FaultConfig


# ------------------------------------------------------------------------------------------------ statistics
def _score(i, grounded, hallucinated, n_truth):
    return {"id": str(i), "section": "s", "kind": "caption", "n_words": 10, "grounded": sorted(grounded),
            "hallucinated": sorted(hallucinated), "n_truth": n_truth,
            "n_mentions": len(grounded) + len(hallucinated), "n_hallucinated_mentions": len(hallucinated)}


def test_repair_counts_on_a_hand_example():
    base = [_score(0, {"cat", "dog"}, set(), 2), _score(1, {"car"}, {"bus"}, 2), _score(2, {"cup"}, set(), 1)]
    faulted = [_score(0, {"cat"}, {"fox"}, 2), _score(1, set(), {"bus", "van"}, 2), _score(2, {"cup"}, set(), 1)]
    method = [_score(0, {"cat", "dog"}, {"fox"}, 2), _score(1, set(), {"bus"}, 2), _score(2, set(), {"pig"}, 1)]
    c = fm.repair_counts(base, faulted, method)
    # image 0: lost dog (restored), added fox (kept); image 1: lost car (not restored), added van (removed);
    # image 2: nothing lost or added, but the method drops cup and names pig
    assert c["lost"].tolist() == [1, 1, 0] and c["restored"].tolist() == [1, 0, 0]
    assert c["added"].tolist() == [1, 1, 0] and c["removed"].tolist() == [0, 1, 0]
    assert c["new_lost"].tolist() == [0, 0, 1] and c["new_hallucinated"].tolist() == [0, 0, 1]
    r = fm.repair(base, faulted, method, n_resamples=200)
    assert r["restored"]["value"] == 0.5 and r["removed"]["value"] == 0.5
    assert r["n_lost"] == 2 and r["n_added"] == 2


def test_error_kinds_add_up_to_chair_counts():
    vocab = metrics.ObjectVocabulary.from_categories(["cat", "dog", "car", "bus"])
    captions = ["a cat and a bus .", "a dog .", "a car , a bus and a cat .", "nothing ."]
    truths = [{"cat", "dog"}, {"dog"}, {"car"}, {"bus"}]
    res = metrics.chair(captions, truths, vocab)
    scores = [_score(i, pc.mentioned - pc.hallucinated, pc.hallucinated, len(t))
              for i, (pc, t) in enumerate(zip(res.per_caption, truths))]
    kinds = np.array([fm.error_kinds(s) for s in scores])
    assert kinds[:, 0].sum() == res.n_additions and kinds[:, 1].sum() == res.n_substitutions
    assert res.n_additions == 2 and res.n_substitutions == 1  # the example exercises both


def test_ratio_intervals():
    num, den = np.array([1, 0, 2, 1, 3.0]), np.array([2, 1, 2, 4, 3.0])
    r = fm.ratio_interval(num, den, n_resamples=500)
    assert r["value"] == pytest.approx(7 / 12) and r["low"] <= r["value"] <= r["high"]
    flat = fm.ratio_interval(np.ones(6), 2 * np.ones(6), n_resamples=200)
    assert flat["value"] == flat["low"] == flat["high"] == 0.5
    assert math.isnan(fm.ratio_interval(np.zeros(3), np.zeros(3))["value"])
    d = fm.ratio_difference(num, den, num, 2 * den, n_resamples=300)
    assert d["diff"] == pytest.approx(7 / 24) and d["low"] <= d["diff"] <= d["high"]


def _row(n, flags, margin=None, change=None):
    cells = {"rows": n, "flags": flags}
    if margin is not None:
        cells["margin"] = margin
    if change is not None:
        cells["change"] = change
    return {"id": "x", "cells": cells}


def test_localization_counts_against_a_loop():
    L = 3
    fault = FaultConfig("diffuse", [2], positions="from", start=2)
    rng = np.random.default_rng(0)
    rows, want = [], {"cells": 0, "faulted": 0, "flagged": 0, "hits": 0}
    pos, neg = [], []  # (margin, layer)
    at_fault, other = {j: [0, 0] for j in (1, 2)}, {j: [0, 0] for j in (1, 2)}  # [flagged, rows] per layer
    for n in (4, 6, 3):
        flags = rng.random((n, L)) < 0.4
        margin = rng.normal(size=(n, L))
        margin[0] = np.nan  # no threshold yet
        rows.append(_row(n, [int(sum(1 << j for j in range(L) if f[j])) for f in flags],
                         [[None if np.isnan(v) else float(v) for v in r] for r in margin]))
        for k in range(n):
            for j in range(1, L):  # the method watches layers 1 and 2
                faulted = k >= 2 and j == 2
                (at_fault if k >= 2 else other)[j][0] += bool(flags[k, j])
                (at_fault if k >= 2 else other)[j][1] += 1
                want["cells"] += 1
                want["faulted"] += faulted
                want["flagged"] += bool(flags[k, j])
                want["hits"] += faulted and bool(flags[k, j])
                if not np.isnan(margin[k, j]):
                    (pos if faulted else neg).append((margin[k, j], j))
    a = fm.localization_arrays(rows, fault, [1, 2], L)
    for k, v in want.items():
        assert a[k].sum() == v
    assert sorted(a["margin_faulted"].tolist()) == sorted(m for m, _ in pos)
    assert sorted(a["margin_clean"].tolist()) == sorted(m for m, _ in neg)
    config = {"method": "dleaf", "knobs": {"layer_start": 1}, "decoding": {"strategy": "greedy"}}
    loc = fm.localization(rows, config, fault, L, flags=True, n_resamples=200)
    assert loc["precision"]["value"] == pytest.approx(want["hits"] / want["flagged"])
    assert loc["recall"]["value"] == pytest.approx(want["hits"] / want["faulted"])
    assert loc["flag_rate"]["value"] == pytest.approx(want["flagged"] / want["cells"])
    for j in (1, 2):  # per layer, at the faulted positions (in every layer) and at the others
        assert loc["layer_flag_rate_faulted_positions"][j] == pytest.approx(at_fault[j][0] / at_fault[j][1])
        assert loc["layer_flag_rate_other_positions"][j] == pytest.approx(other[j][0] / other[j][1])
    assert math.isnan(loc["layer_flag_rate_faulted_positions"][0])  # layer 0 is not watched
    assert loc["faulted_share"]["value"] == pytest.approx(want["faulted"] / want["cells"])

    def brute(same_layer):  # every (faulted, unfaulted) pair: 1 if the faulted cell's margin is higher, 1/2 if tied
        wins = [1.0 if p > q else 0.5 if p == q else 0.0 for p, lp in pos for q, lq in neg
                if not same_layer or lp == lq]
        return sum(wins) / len(wins)

    assert loc["auroc"]["value"] == pytest.approx(brute(False))
    assert loc["auroc_within_layer"]["value"] == pytest.approx(brute(True))
    assert brute(True) != pytest.approx(brute(False))  # the two differ on this example
    for key in ("auroc", "auroc_within_layer"):
        assert loc[key]["low"] <= loc[key]["value"] <= loc[key]["high"]
        assert loc[key]["n_replies"] == 3


def test_stratified_auroc_on_a_hand_example():
    # layer 0: faulted 0.9 vs unfaulted 0.1 and 0.5 -> 2 wins of 2 pairs; layer 1: faulted 0.2 vs unfaulted 0.2 and
    # 0.8 -> a tie (1/2) and a loss; within layers: (2 + 0.5) / 4. Pooled: 0.9 beats 0.1, 0.5, 0.2, 0.8 (4); 0.2
    # beats 0.1 (1), ties 0.2 (1/2), loses to 0.5 and 0.8: (4 + 1.5) / 8.
    score = [0.9, 0.1, 0.5, 0.2, 0.2, 0.8]
    label = [True, False, False, True, False, False]
    layer = [0, 0, 0, 1, 1, 1]
    assert fm.stratified_auroc(score, label, layer) == pytest.approx(2.5 / 4)
    assert fm.stratified_auroc(score, label) == pytest.approx(5.5 / 8)
    assert math.isnan(fm.stratified_auroc([0.1, 0.2], [True, True]))
    # replies resampled: the interval of a perfectly separated example is the point itself
    margins = [(np.array([1.0, 0.0]), np.array([True, False]), np.array([0, 0]))] * 4
    r = fm.auroc_by_reply(margins, within_layer=True, n_resamples=50)
    assert r["value"] == r["low"] == r["high"] == 1.0 and r["n_faulted"] == 4


def test_change_share_against_a_loop():
    rows = [_row(2, [0, 0], change={"faulted": [0.0, 1.0, 0.5], "clean": [2.0, 0.0, 0.5]}),
            _row(3, [0, 0, 0], change={"faulted": [0.0, 0.0, 3.0], "clean": [1.0, 1.0, None]})]
    ch = fm.change_arrays(rows, 3)
    assert ch["faulted"].tolist() == [1.5, 3.0] and ch["total"].tolist() == [4.0, 5.0]
    assert ch["layer"].tolist() == [3.0, 2.0, 4.0]


