"""Tests for dleaf.premise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dleaf.premise import (
    PremiseRow,
    auc_from_ranks,
    auroc,
    auroc_interval,
    plot_premise,
    premise_markdown,
    premise_table,
)


def _bf_auroc(pos, neg):
    """Independent double loop: P(pos > neg) + 0.5 P(tie)."""
    total = 0.0
    for x in pos:
        for y in neg:
            total += 1.0 if x > y else (0.5 if x == y else 0.0)
    return total / (len(pos) * len(neg))


# ---------------------------------------------------------------------------
# auroc
# ---------------------------------------------------------------------------


def test_auroc_hand_example():
    # pairs: 1 beats {0}; 2 ties {2, 2} and beats {0}; 3 beats all -> 6 / 9
    assert auroc([1, 2, 3], [2, 2, 0]) == pytest.approx(2 / 3, abs=1e-15)
    assert auroc([5, 6], [1, 2, 3]) == 1.0
    assert auroc([1, 2, 3], [5, 6]) == 0.0
    assert auroc([1, 1], [1, 1, 1]) == 0.5


def test_auroc_against_double_loop_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos = rng.integers(0, 5, size=rng.integers(1, 30))  # many ties
        neg = rng.integers(0, 5, size=rng.integers(1, 30))
        assert auroc(pos, neg) == pytest.approx(_bf_auroc(pos, neg), abs=1e-12)
    pos, neg = rng.normal(0.3, 1, 40), rng.normal(0, 1, 25)
    assert auroc(pos, neg) == pytest.approx(_bf_auroc(pos, neg), abs=1e-12)
    # symmetry: swapping groups gives 1 - AUROC
    assert auroc(neg, pos) == pytest.approx(1 - auroc(pos, neg), abs=1e-12)


def test_vectorised_rank_statistic_matches_auroc():
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 4, size=(6, 11)).astype(float)
    neg = rng.integers(0, 4, size=(6, 7)).astype(float)
    got = auc_from_ranks(pos, neg, axis=-1)
    exp = [_bf_auroc(p, n) for p, n in zip(pos, neg)]
    np.testing.assert_allclose(got, exp, atol=1e-12)
    np.testing.assert_allclose(auc_from_ranks(pos.T, neg.T, axis=0), exp, atol=1e-12)


def test_auroc_nan_when_group_empty():
    assert math.isnan(auroc([], [1.0, 2.0]))
    assert math.isnan(auroc([1.0], []))


def test_auroc_bad_inputs():
    with pytest.raises(ValueError, match="scores_positive must be 1-D"):
        auroc([[1.0, 2.0]], [1.0])
    with pytest.raises(ValueError, match="scores_negative contains non-finite"):
        auroc([1.0], [np.nan])
    with pytest.raises(TypeError, match="scores_positive must be array-like of numbers"):
        auroc(["a", "b"], [1.0])


# ---------------------------------------------------------------------------
# auroc_interval
# ---------------------------------------------------------------------------


def test_interval_contains_estimate_and_narrows():
    rng = np.random.default_rng(2)
    small = (rng.normal(0.8, 1, 20), rng.normal(0, 1, 30))
    large = (rng.normal(0.8, 1, 400), rng.normal(0, 1, 600))
    lo_s, hi_s = auroc_interval(*small, n_resamples=500)
    lo_l, hi_l = auroc_interval(*large, n_resamples=500)
    for (lo, hi), data in (((lo_s, hi_s), small), ((lo_l, hi_l), large)):
        assert 0.0 <= lo <= auroc(*data) <= hi <= 1.0
    assert (hi_l - lo_l) < 0.5 * (hi_s - lo_s)
    # wider at higher confidence, reproducible with a seed
    lo99, hi99 = auroc_interval(*small, confidence=0.99, n_resamples=500)
    assert lo99 <= lo_s and hi99 >= hi_s
    assert auroc_interval(*small, n_resamples=500) == (lo_s, hi_s)


def test_interval_stratified_perfect_separation():
    # every replicate keeps both groups -> AUROC is always 1 (BCa would fail here)
    assert auroc_interval([5, 6, 7], [1, 2], n_resamples=200) == (1.0, 1.0)


def test_interval_nan_cases():
    for pos, neg in (([1.0], [1.0, 2.0]), ([1.0, 2.0], [0.5]), ([], [1.0, 2.0]), ([3.0] * 4, [3.0] * 5)):
        lo, hi = auroc_interval(pos, neg, n_resamples=50)
        assert math.isnan(lo) and math.isnan(hi)


def test_interval_bad_inputs():
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        auroc_interval([1, 2], [3, 4], confidence=1.5)
    with pytest.raises(ValueError, match="n_resamples must be a positive integer"):
        auroc_interval([1, 2], [3, 4], n_resamples=0)
    with pytest.raises(ValueError, match="pos must be 1-D"):
        auroc_interval(np.zeros((2, 2)), [3, 4])
    with pytest.raises(ValueError, match="neg contains non-finite"):
        auroc_interval([1, 2], [3, np.inf])


# ---------------------------------------------------------------------------
# premise_table
# ---------------------------------------------------------------------------


def _synthetic(n=120, seed=3):
    rng = np.random.default_rng(seed)
    hal = rng.random(n) < 0.3
    liae = rng.normal(size=(n, 3))
    liae[:, 1] += 1.5 * hal  # layer 1 separates hallucinated mentions
    deficit = rng.normal(size=(n, 2))
    deficit[:, 0] -= 1.5 * hal  # points the wrong way
    return {"liae": liae, "mass_deficit": deficit}, hal


def test_premise_table_values():
    signals, hal = _synthetic()
    rows = premise_table(signals, hal, n_resamples=200)
    assert [(r.signal, r.layer) for r in rows] == [
        ("liae", 0), ("liae", 1), ("liae", 2), ("mass_deficit", 0), ("mass_deficit", 1)
    ]
    for r in rows:
        col = signals[r.signal][:, r.layer]
        assert isinstance(r, PremiseRow)
        assert (r.n_hallucinated, r.n_grounded) == (int(hal.sum()), int((~hal).sum()))
        assert r.mean_hallucinated == pytest.approx(col[hal].mean())
        assert r.mean_grounded == pytest.approx(col[~hal].mean())
        assert r.auroc == pytest.approx(_bf_auroc(col[hal], col[~hal]), abs=1e-12)
        assert r.ci_low <= r.auroc <= r.ci_high
    by = {(r.signal, r.layer): r for r in rows}
    assert by["liae", 1].auroc > 0.8 and by["liae", 1].ci_low > 0.5
    assert by["mass_deficit", 0].auroc < 0.2 and by["mass_deficit", 0].ci_high < 0.5


def test_premise_table_single_class():
    signals, hal = _synthetic(n=10)
    rows = premise_table({"liae": signals["liae"]}, np.zeros(10, dtype=bool), n_resamples=20)
    r = rows[0]
    assert r.n_hallucinated == 0 and r.n_grounded == 10
    assert math.isnan(r.auroc) and math.isnan(r.mean_hallucinated)
    assert math.isnan(r.ci_low) and math.isnan(r.ci_high)


def test_premise_table_bad_inputs():
    signals, hal = _synthetic(n=10)
    with pytest.raises(TypeError, match="signals must be a mapping"):
        premise_table([signals["liae"]], hal)
    with pytest.raises(ValueError, match="signals must contain at least one signal"):
        premise_table({}, hal)
    with pytest.raises(TypeError, match="hallucinated must have a bool dtype"):
        premise_table(signals, hal.astype(int))
    with pytest.raises(ValueError, match=r"hallucinated must be 1-D"):
        premise_table(signals, hal[:, None])
    with pytest.raises(ValueError, match=r"signal 'liae' must be 2-D"):
        premise_table({"liae": signals["liae"][:, 0]}, hal)
    with pytest.raises(ValueError, match=r"signal 'liae' has 9 mentions but hallucinated has 10"):
        premise_table({"liae": signals["liae"][:9]}, hal)
    bad = signals["liae"].copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"signal 'liae' contains non-finite"):
        premise_table({"liae": bad}, hal)
    with pytest.raises(TypeError, match="signal names must be str"):
        premise_table({3: signals["liae"]}, hal)
    with pytest.raises(TypeError, match=r"signal 'x' must be a numeric array"):
        premise_table({"x": [["a"] * 2] * 10}, hal)


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------


def _rows():
    return [
        PremiseRow("liae", 0, 3, 7, 1.23456, -0.5, 2 / 3, 0.41234, 0.9),
        PremiseRow("liae", 1, 3, 7, 0.1, 0.2, 0.5, math.nan, math.nan),
        PremiseRow("mass_deficit", 0, 3, 7, 0.0, 0.0, 0.25, 0.1, 0.45),
    ]


def test_premise_markdown():
    md = premise_markdown(_rows())
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 3
    assert lines[0].startswith("| signal | layer |") and "AUROC" in lines[0] and "CI" in lines[0]
    assert set(lines[1]) <= set("|-: ")
    assert lines[2] == "| liae | 0 | 3 | 7 | 1.235 | -0.500 | 0.667 | [0.412, 0.900] |"
    assert lines[3].endswith("| 0.500 | [nan, nan] |")
    assert lines[4].startswith("| mass_deficit | 0 |")
    assert premise_markdown([]).strip().count("\n") == 1  # header only


def test_plot_premise_writes_png(tmp_path):
    out = tmp_path / "premise.png"
    out.write_bytes(b"old")  # replaced atomically
    signals, hal = _synthetic(n=60)
    rows = premise_table(signals, hal, n_resamples=50) + _rows()[1:2]
    assert plot_premise(rows, out) == out
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["premise.png"]  # no temp left
    with pytest.raises(ValueError, match="rows is empty"):
        plot_premise([], tmp_path / "empty.png")
