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
    premise_figure,
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


# ---------------------------------------------------------------------------
# Killing the survivors of a mutation run (tests/mutation.py)
# ---------------------------------------------------------------------------


def test_rank_statistic_on_three_dimensional_batches_and_its_default_axis():
    rng = np.random.default_rng(7)
    pos = rng.integers(0, 4, size=(2, 3, 9)).astype(float)
    neg = rng.integers(0, 4, size=(2, 3, 5)).astype(float)
    exp = np.array([[_bf_auroc(p, n) for p, n in zip(pp, nn)] for pp, nn in zip(pos, neg)])
    np.testing.assert_allclose(auc_from_ranks(pos, neg), exp, atol=1e-12)  # default: the last axis
    np.testing.assert_allclose(auc_from_ranks(np.moveaxis(pos, -1, 1), np.moveaxis(neg, -1, 1), axis=1), exp,
                               atol=1e-12)


def test_auroc_of_single_scores_and_empty_groups_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auroc([1.0], [0.0]) == 1.0 and auroc([0.0], [1.0]) == 0.0 and auroc([2.0], [2.0]) == 0.5
        assert math.isnan(auroc([], [1.0])) and math.isnan(auroc([1.0], [])) and math.isnan(auroc([], []))


def test_interval_edges_of_its_arguments():
    rng = np.random.default_rng(4)
    pos, neg = rng.normal(1, 1, 15), rng.normal(0, 1, 25)
    # the defaults are 2000 resamples and seed 0
    assert auroc_interval(pos, neg) == auroc_interval(pos, neg, n_resamples=2000, seed=0)
    assert auroc_interval(pos, neg, seed=1) != auroc_interval(pos, neg)
    # confidence must lie strictly inside (0, 1)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="confidence must be in"):
            auroc_interval(pos, neg, confidence=bad)
    # one resample is allowed (a degenerate interval); two scores per group are enough
    import warnings

    with warnings.catch_warnings():  # scipy's standard error of one replicate is undefined
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = auroc_interval(pos, neg, n_resamples=1)
    assert lo == hi and 0.0 <= lo <= 1.0
    lo, hi = auroc_interval([1.0, 3.0], [0.0, 2.0], n_resamples=200)
    assert not math.isnan(lo) and 0.0 <= lo <= hi <= 1.0
    # groups of different sizes are resampled independently (stratified), each at its own size
    lo, hi = auroc_interval(np.arange(5.0), np.arange(9.0) - 2, n_resamples=300)
    assert 0.0 <= lo <= auroc(np.arange(5.0), np.arange(9.0) - 2) <= hi <= 1.0


def test_interval_is_a_stratified_percentile_bootstrap():
    """Against an independent loop: each group resampled with replacement at its own size, the 2.5 and 97.5
    percentiles of the replicated AUROCs."""
    rng = np.random.default_rng(5)
    pos, neg = rng.normal(0.7, 1, 30), rng.normal(0, 1, 50)
    lo, hi = auroc_interval(pos, neg, n_resamples=4000, seed=0)
    draw = np.random.default_rng(11)
    reps = [_bf_auroc(draw.choice(pos, pos.size), draw.choice(neg, neg.size)) for _ in range(1500)]
    blo, bhi = np.percentile(reps, [2.5, 97.5])
    assert lo == pytest.approx(blo, abs=0.03) and hi == pytest.approx(bhi, abs=0.03)


def test_premise_table_defaults():
    signals, hal = _synthetic()
    assert premise_table(signals, hal) == premise_table(signals, hal, n_resamples=2000, seed=0)


def _row(signal, layer, au, lo, hi):
    return PremiseRow(signal, layer, 4, 9, 0.0, 0.0, au, lo, hi)


def test_premise_figure_geometry():
    rows = [_row("liae", 0, 0.6, 0.5, 0.7), _row("liae", 1, 0.9, 0.8, 1.2), _row("liae", 2, 0.3, math.nan, math.nan),
            _row("mass", 0, 0.4, -0.1, 0.45), _row("mass", 1, 0.5, 0.4, 0.6), _row("mass", 2, 0.55, 0.5, 0.6)]
    fig = premise_figure(rows, title="organism, run r, adversarial")
    ax = fig.axes[0]
    assert ax.get_ylim() == pytest.approx((-0.02, 1.02))
    assert list(ax.get_xticks()) == [0, 1, 2]
    chance = [ln for ln in ax.lines if ln.get_label() == "chance (0.5)"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.5, 0.5]
    assert ax.get_title() == "organism, run r, adversarial\npremise check: per-layer AUROC (4 hallucinated, 9 " \
                             "grounded words)"
    assert ax.get_xlabel() == "decoder layer" and "below 0.5" in fig.texts[0].get_text()
    bars = {c.get_label(): c for c in ax.containers}
    assert set(bars) == {"liae", "mass"}
    for name, offset, want in (("liae", -0.15, [(0.5, 0.7), (0.8, 1.0), (0.3, 0.3)]),
                               ("mass", 0.15, [(0.0, 0.45), (0.4, 0.6), (0.5, 0.6)])):
        line, _, (segments,) = bars[name]
        assert list(line.get_xdata()) == pytest.approx([0 + offset, 1 + offset, 2 + offset])
        got = [(seg[0][1], seg[1][1]) for seg in segments.get_segments()]
        assert [tuple(map(float, g)) for g in got] == [pytest.approx(w) for w in want]  # clipped to [0, 1]
    one = premise_figure([_row("liae", 0, 0.6, 0.5, 0.7), _row("liae", 3, 0.6, 0.5, 0.7)])
    line, _, _ = one.axes[0].containers[0]
    assert list(line.get_xdata()) == [0.0, 3.0]  # a single signal is not dodged
    assert not one.axes[0].get_title().startswith("\n")


def test_markdown_of_rows_read_back_from_strict_json():
    row = PremiseRow("liae", 0, 2, 3, None, 0.25, 0.5, None, None)  # NaN written as null comes back as None
    md = premise_markdown([row])
    assert "| liae | 0 | 2 | 3 | nan | 0.250 | 0.500 | [nan, nan] |" in md
