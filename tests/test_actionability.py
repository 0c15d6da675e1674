"""Tests for dleaf.actionability: the stratified and caption-clustered AUROC, percentile flags, cross-validated
position models and the row tables, each against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dleaf import actionability as act
from dleaf.premise import auroc


def _bf_auroc(pos, neg):
    """Independent double loop: P(pos > neg) + 0.5 P(tie)."""
    total = 0.0
    for x in pos:
        for y in neg:
            total += 1.0 if x > y else (0.5 if x == y else 0.0)
    return total / (len(pos) * len(neg))



def test_stratified_auroc_worked_by_hand():
    # stratum 0: positives 3, 5 against the negative 4: (3, 4) lost, (5, 4) won -> U = 1 of 2 pairs (AUROC 1/2)
    # stratum 1: positive 2 against negatives 1, 6, 7: won, lost, lost -> U = 1 of 3 pairs (AUROC 1/3)
    # stratum 2 holds only a positive (9), stratum 3 only a negative (0): no pairs, left out
    # pair-weighted mean: (2 * 1/2 + 3 * 1/3) / (2 + 3) = 2/5 (the unweighted mean of 1/2 and 1/3 would be 5/12)
    score = [3, 5, 4, 2, 1, 6, 7, 9, 0]
    label = np.array([1, 1, 0, 1, 0, 0, 0, 1, 0], bool)
    stratum = [0, 0, 0, 1, 1, 1, 1, 2, 3]
    assert act.stratified_auroc(score, label, stratum) == pytest.approx(0.4, abs=1e-15)
    # pooled over every pair: 3 beats {1, 0}, 5 beats {4, 1, 0}, 2 beats {1, 0}, 9 beats all 5 -> 12 / 20
    assert act.stratified_auroc(score, label) == pytest.approx(0.6, abs=1e-15)
    est = act.clustered_auroc(score, label, np.arange(9), stratum, n_resamples=50)
    assert est["auroc"] == pytest.approx(0.4) and (est["n_pairs"], est["n_strata"]) == (5, 2)
    assert (est["n_positive"], est["n_negative"]) == (4, 5)
    assert math.isnan(act.stratified_auroc([1.0, 2.0], np.array([True, False]), [0, 1]))


def test_stratified_auroc_against_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(8)
    score = rng.normal(size=300)
    label = rng.random(300) < 0.2
    score[label] += 0.7
    stratum = rng.integers(0, 4, 300)
    assert act.stratified_auroc(score, label) == pytest.approx(roc_auc_score(label, score), abs=1e-12)
    num = den = 0.0
    for s in range(4):
        at = stratum == s
        pairs = label[at].sum() * (~label[at]).sum()
        num += roc_auc_score(label[at], score[at]) * pairs
        den += pairs
    assert act.stratified_auroc(score, label, stratum) == pytest.approx(num / den, abs=1e-12)


def test_cluster_pair_counts_equal_repeated_rows():
    """A cluster taken k times counts as k copies of its rows, ties included (the caption bootstrap relies on it)."""
    rng = np.random.default_rng(9)
    score = rng.integers(0, 4, 40).astype(float)  # many ties
    label = rng.random(40) < 0.4
    stratum = rng.integers(0, 2, 40)
    cluster = rng.integers(0, 6, 40)
    counts = rng.integers(0, 3, (5, 6)).astype(float)
    u, p = act.resampled_pairs(*act.cluster_pairs(score, label, stratum, cluster, 6), counts)
    for r in range(5):
        k = counts[r, cluster].astype(int)  # each row repeated as often as its cluster is taken
        s, y, g = np.repeat(score, k), np.repeat(label, k), np.repeat(stratum, k)
        want_u = sum(_bf_auroc(s[(g == v) & y], s[(g == v) & ~y]) * ((g == v) & y).sum() * ((g == v) & ~y).sum()
                     for v in (0, 1) if ((g == v) & y).any() and ((g == v) & ~y).any())
        want_p = sum(((g == v) & y).sum() * ((g == v) & ~y).sum() for v in (0, 1))
        assert u[r] == pytest.approx(want_u, abs=1e-9) and p[r] == want_p


def test_clustered_interval_resamples_captions():
    """Against an independent loop: captions drawn with replacement, all their rows kept, the AUROC of each
    replicate (:func:`auroc`, the Mann-Whitney statistic), its 2.5 and 97.5 percentiles."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(10)
    n_captions = 40
    cluster = np.repeat(np.arange(n_captions), 12)
    shift = rng.normal(0, 1, n_captions)[cluster]  # rows of one caption share its offset: not independent
    label = rng.random(cluster.size) < 0.15
    score = shift + rng.normal(size=cluster.size) + 0.8 * label
    est = act.clustered_auroc(score, label, cluster, n_resamples=2000, seed=0)
    assert est["auroc"] == pytest.approx(roc_auc_score(label, score), abs=1e-12)
    draw = np.random.default_rng(3)
    reps = []
    for _ in range(800):
        rows = np.concatenate([np.flatnonzero(cluster == c) for c in draw.integers(0, n_captions, n_captions)])
        if label[rows].any() and not label[rows].all():
            reps.append(auroc(score[rows][label[rows]], score[rows][~label[rows]]))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    assert est["ci_low"] == pytest.approx(lo, abs=0.03) and est["ci_high"] == pytest.approx(hi, abs=0.03)
    # the same seed and clusters give the same draws, whatever the scores (common random numbers)
    other = act.clustered_auroc(score * 2 + 1, label, cluster, n_resamples=2000, seed=0)
    assert (other["ci_low"], other["ci_high"]) == pytest.approx((est["ci_low"], est["ci_high"]))


def test_clustered_auroc_bad_and_degenerate_inputs():
    y = np.array([True, False, False])
    with pytest.raises(ValueError, match="cluster must hold non-negative integer codes"):
        act.clustered_auroc([1.0, 2.0, 3.0], y, [0.5, 1, 2])
    with pytest.raises(ValueError, match="below n_clusters=2"):
        act.clustered_auroc([1.0, 2.0, 3.0], y, [0, 1, 2], n_clusters=2)
    with pytest.raises(ValueError, match="label must be a bool array"):
        act.clustered_auroc([1.0, 2.0, 3.0], [1, 0, 0], [0, 1, 2])
    one = act.clustered_auroc([1.0, 2.0, 3.0], y, [0, 0, 0])
    assert one["auroc"] == 0.0 and math.isnan(one["ci_low"])  # one caption: no interval
    none = act.clustered_auroc([1.0, 2.0], np.array([False, False]), [0, 1])
    assert math.isnan(none["auroc"]) and none["n_pairs"] == 0


def _bf_percentile(values, q):
    """Linear interpolation between the order statistics at rank (n - 1) q / 100."""
    v = sorted(values)
    h = (len(v) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


def test_percentile_flags_against_a_loop():
    rng = np.random.default_rng(11)
    score = rng.normal(size=500)
    kind = rng.choice(["h", "g", "o"], 500, p=[0.1, 0.2, 0.7])
    score[kind == "h"] += 1.0
    pos, grounded = kind == "h", kind == "g"
    for negative in (None, grounded):
        got = act.percentile_flags(score, pos, negative)
        assert [g["percentile"] for g in got] == [90, 95, 99]
        for g in got:
            t = _bf_percentile(score, g["percentile"])  # over every row, whatever the comparison
            tp = fp = n_pos = n_cmp = 0
            for s, k in zip(score, kind):
                compared = k == "h" or (negative is None or k == "g")
                if k == "h":
                    n_pos += 1
                    tp += s > t
                elif compared:
                    fp += s > t
                n_cmp += compared
            assert g["threshold"] == pytest.approx(t, abs=1e-12)
            assert g["recall"] == pytest.approx(tp / n_pos) and g["precision"] == pytest.approx(tp / (tp + fp))
            assert g["flag_rate"] == pytest.approx((tp + fp) / n_cmp)
    assert math.isnan(act.percentile_flags([1.0, 2.0, 3.0], np.array([True, False, False]), None, [100])[0]
                      ["precision"])
    with pytest.raises(ValueError, match="both positive and negative"):
        act.percentile_flags([1.0, 2.0], np.array([True, False]), np.array([True, True]))


def test_cv_auroc_position_against_position_and_signal():
    rng = np.random.default_rng(12)
    n_captions, per = 60, 20
    groups = np.repeat(np.arange(n_captions), per)
    position = np.tile(np.arange(per), n_captions)
    ordinal = 1 + position // 5
    signal = rng.normal(size=groups.size)
    label = rng.random(groups.size) < 1 / (1 + np.exp(-(position - 15) / 2 - 2.5 * signal))
    base = act.position_features(position, ordinal)
    assert base.shape == (groups.size, 5)
    assert base[position == 0, 1].tolist() == [0.0] * n_captions  # log(1 + 0)
    assert set(map(tuple, base[:, 2:][ordinal >= 4])) == {(0.0, 0.0, 1.0)}  # ordinals 4 and later: one stratum
    cv_pos = act.cv_auroc(base, label, groups)
    cv_both = act.cv_auroc(np.column_stack([base, signal]), label, groups)
    assert 0.75 < cv_pos < cv_both
    noise = act.cv_auroc(np.column_stack([base, rng.normal(size=groups.size)]), label, groups)
    assert abs(noise - cv_pos) < 0.02  # a signal that carries nothing adds nothing
    assert math.isnan(act.cv_auroc(base, np.zeros(groups.size, bool), groups))
    assert math.isnan(act.cv_auroc(base, label, np.zeros(groups.size, int)))


def _row_fixture(seed=13, n_captions=12):
    rng = np.random.default_rng(seed)
    kinds, cluster, position, ordinal = [], [], [], []
    for c in range(n_captions):
        n = int(rng.integers(8, 14))
        k = rng.choice(["hallucinated", "grounded", "object_rest", "other"], n, p=[0.15, 0.2, 0.05, 0.6])
        seen = 0
        for j in range(n):
            kinds.append(k[j]), cluster.append(c), position.append(j), ordinal.append(1 + seen)
            seen += k[j] in ("hallucinated", "grounded")
    kinds = np.array(kinds)
    signal = rng.normal(size=(kinds.size, 2))
    signal[kinds == "hallucinated", 1] += 1.5
    return {"s": signal}, kinds, np.array(cluster), np.array(position), np.array(ordinal)


def test_actionability_table_against_independent_computations():
    from sklearn.metrics import roc_auc_score

    signals, kind, cluster, _, _ = _row_fixture()
    rows = act.actionability_table(signals, kind, cluster, n_clusters=12, n_resamples=200)
    assert [(r["comparison"], r["layer"]) for r in rows] == [(c, l) for c in ("all", "grounded", "non_object")
                                                            for l in (0, 1)]
    negatives = {"all": kind != "hallucinated", "grounded": kind == "grounded", "non_object": kind == "other"}
    pos = kind == "hallucinated"
    for r in rows:
        col, neg = signals["s"][:, r["layer"]], negatives[r["comparison"]]
        keep = pos | neg
        assert (r["n_positive"], r["n_negative"]) == (pos.sum(), neg.sum())
        assert r["auroc"] == pytest.approx(roc_auc_score(pos[keep], col[keep]), abs=1e-12)
        assert r["ci_low"] <= r["auroc"] <= r["ci_high"]
        assert r["base_rate"] == pytest.approx(pos.sum() / keep.sum())
        assert r["mean_positive"] == pytest.approx(col[pos].mean()) and r["mean_negative"] == pytest.approx(
            col[neg].mean())
        for f in r["flags"]:
            t = _bf_percentile(col, f["percentile"])  # the percentile of every row, for every comparison
            assert f["recall"] == pytest.approx(sum(c > t for c in col[pos]) / pos.sum())
            flagged = [k for c, k in zip(col, kind) if c > t]
            assert f["kinds"] == pytest.approx({k: flagged.count(k) / len(flagged) for k in act.ROW_KINDS})
    by = {(r["comparison"], r["layer"]): r for r in rows}
    assert by["all", 1]["auroc"] > 0.8
    assert by["all", 1]["flags"][0]["recall"] == by["grounded", 1]["flags"][0]["recall"]
    with pytest.raises(ValueError, match="unknown row kind"):
        act.actionability_table(signals, np.where(kind == "other", "function", kind), cluster)
    md = act.actionability_markdown(rows)
    assert md.count("| signal | layer |") == 3 and "p95 recall % | p95 precision %" in md
    assert md.count("p99 flags on non-object rows %") == 1  # in the table against every other row
    r = by["all", 1]
    f = r["flags"]
    assert (f"| s | 1 | {r['mean_positive']:.3f} | {r['mean_negative']:.3f} | {r['auroc']:.3f} | "
            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {100 * f[0]['recall']:.1f} | {100 * f[0]['precision']:.1f} |"
            ) in md
    assert f"| {100 * f[2]['recall']:.1f} | {100 * f[2]['precision']:.1f} | {100 * f[2]['kinds']['other']:.1f} |\n" in md


def test_position_table_strata_and_models():
    from sklearn.metrics import roc_auc_score

    signals, kind, cluster, position, ordinal = _row_fixture(seed=14, n_captions=30)
    rows = act.position_table(signals, kind, cluster, position, ordinal, n_clusters=30, bin_width=4,
                                  n_resamples=100, n_splits=3)
    pos = kind == "hallucinated"
    for r in (r for r in rows if r["comparison"] == "grounded"):
        keep = pos | (kind == "grounded")
        col = signals["s"][keep, r["layer"]]
        y = pos[keep]
        for by, strata in (("ordinal", np.minimum(ordinal, 4)[keep]), ("position", (position // 4)[keep])):
            num = den = 0.0
            for s in np.unique(strata):
                at = strata == s
                if y[at].any() and not y[at].all():
                    pairs = y[at].sum() * (~y[at]).sum()
                    num += roc_auc_score(y[at], col[at]) * pairs
                    den += pairs
            assert r[by]["auroc"] == pytest.approx(num / den, abs=1e-12) and r[by]["n_pairs"] == den
        assert r["auroc"] == pytest.approx(roc_auc_score(y, col), abs=1e-12)
        assert r["cv_position"] == pytest.approx(act.cv_auroc(act.position_features(
            position[keep], ordinal[keep]), y, cluster[keep], 3))
    md = act.position_markdown(rows)
    assert md.count("| signal | layer | AUROC pooled |") == 3 and "within position bins" in md


def test_first_token_table_subsets():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(15)
    present = np.arange(60) % 2 == 0
    wrong = rng.random(60) < 0.25
    sig = rng.normal(size=(60, 2))
    rows = act.first_token_table({"liae": sig}, wrong, present, n_resamples=100)
    assert [(r["subset"], r["layer"]) for r in rows] == [(s, l) for s in ("all", "absent", "present") for l in (0, 1)]
    for r in rows:
        keep = {"all": np.ones(60, bool), "absent": ~present, "present": present}[r["subset"]]
        assert (r["n_wrong"], r["n_right"]) == (wrong[keep].sum(), (~wrong[keep]).sum())
        assert r["auroc"] == pytest.approx(roc_auc_score(wrong[keep], sig[keep, r["layer"]]), abs=1e-12)
    assert "wrong, " in act.first_token_markdown(rows)
