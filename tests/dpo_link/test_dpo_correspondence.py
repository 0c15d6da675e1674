"""dpo_link.correspondence: every statistic against an independent computation (numpy, scipy, exact enumeration,
a hand-written bootstrap), by-construction nulls, and bad input."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from dpo_link import correspondence as C


def test_correlations_against_numpy_and_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = 0.6 * x + rng.normal(size=60)
    out = C.correlations(x, y, n_resamples=200, permutations=200)
    from scipy import stats

    assert out["pearson"]["estimate"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert out["spearman"]["estimate"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert out["kendall"]["estimate"] == pytest.approx(stats.kendalltau(x, y).statistic)
    for m in C.CORRELATIONS:
        e = out[m]
        assert e["low"] < e["estimate"] < e["high"] and e["low"] > 0 and e["p_value"] < 0.05


def test_scale_pairs_and_overlap_against_hand_computation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = 2.5 * x + 0.1 * rng.normal(size=40)
    sc = C.scale_fit(x, y, beta=0.1, n_resamples=200)
    s_ls = np.linalg.lstsq(x[:, None], y, rcond=None)[0][0]
    assert sc["s"] == pytest.approx(s_ls) and sc["beta_match"] == pytest.approx(0.1 * s_ls)
    assert sc["low"] < 2.5 < sc["high"] and sc["r2"] > 0.99
    dc, dr, tc, tr = (rng.normal(size=20) for _ in range(4))
    pa = C.pair_agreement(dc, dr, tc, tr, n_resamples=200, permutations=200)
    md, mt = dc - dr, tc - tr
    assert pa["sign_agreement"]["estimate"] == pytest.approx(np.mean(np.sign(md) == np.sign(mt)))
    assert pa["dleaf_accuracy"] == pytest.approx(np.mean(md > 0))
    assert pa["margins"]["pearson"]["estimate"] == pytest.approx(np.corrcoef(md, mt)[0, 1])
    a = np.array([[0.9, 0.1], [0.5, 0.0]])
    b = np.array([[0.8, 0.7], [0.1, 0.2]])
    assert C.top_k_overlap(a, b, 1) == 1.0 and C.top_k_overlap(a, b, 2) == 0.5


def test_head_maps_and_mechanism():
    c = [np.array([[[True, False], [False, False]]]), np.array([[[True, True], [False, False]]] * 2)]
    m0 = [np.full((1, 2, 2), 0.5), np.full((2, 2, 2), 0.5)]
    m1 = [np.full((1, 2, 2), 0.6), np.full((2, 2, 2), 0.4)]
    maps = C.head_maps(c, m0, m1)
    np.testing.assert_allclose(maps["correction_frequency"], [[1.0, 2 / 3], [0.0, 0.0]])
    np.testing.assert_allclose(maps["mass_change"], np.full((2, 2), (0.1 - 0.2) / 3))
    assert maps["n_positions"] == 3
    rng = np.random.default_rng(0)
    f = rng.random((4, 8))
    mech = C.mechanism(f, f + 0.01 * rng.normal(size=(4, 8)), k=4, permutations=200)
    assert mech["spearman"]["estimate"] > 0.9 and mech["spearman"]["p_value"] < 0.02
    assert mech["top_k_overlap"]["estimate"] >= 0.75 and mech["top_k_overlap"]["chance"] == 4 / 32
    const = C.mechanism(f, np.zeros((4, 8)), permutations=50)
    assert math.isnan(const["spearman"]["estimate"]) and "constant" in const["spearman"]["note"]


def test_matched_noise_null_intervals_include_zero():
    """A reward vector with no relation to r_theta (matched noise): its 95% intervals cover 0 about 95% of the time."""
    rng = np.random.default_rng(3)
    r_theta = rng.normal(size=80) ** 3
    covered = dict.fromkeys(C.CORRELATIONS, 0)
    for seed in range(20):
        out = C.correlations(C.matched_noise(r_theta * 0.01 + 0.5, seed), r_theta, n_resamples=200, permutations=0,
                             seed=seed)
        for m in C.CORRELATIONS:
            covered[m] += out[m]["low"] <= 0 <= out[m]["high"]
    assert min(covered.values()) >= 16, covered
    out = C.correlations(C.matched_noise(r_theta, 0), r_theta, n_resamples=300, permutations=0)
    assert all(out[m]["low"] <= 0 <= out[m]["high"] for m in C.CORRELATIONS)


def test_shuffled_pairs_give_permutation_p_values_that_are_not_small():
    rng = np.random.default_rng(4)
    x = rng.normal(size=60)
    y = 0.8 * x + 0.5 * rng.normal(size=60)
    assert C.correlation(x, y, "pearson", n_resamples=50, permutations=200)["p_value"] < 0.01
    ps = [C.correlation(C.shuffled(x, s), y, "spearman", n_resamples=20, permutations=200, seed=s)["p_value"]
          for s in range(10)]
    assert sum(p < 0.05 for p in ps) <= 2 and np.median(ps) > 0.2
    sh = C.shuffled(np.arange(30), 0)
    pa = C.pair_agreement(x[:30][sh], x[30:][sh], y[:30], y[30:], n_resamples=50, permutations=200)
    assert pa["sign_agreement"]["p_value"] > 0.05


def test_pairs_as_units_of_resampling_and_permutation():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 2))
    y = x + rng.normal(size=(30, 2))
    by_unit = C.correlation(x, y, "pearson", n_resamples=100, permutations=100)
    assert by_unit["estimate"] == pytest.approx(np.corrcoef(x.ravel(), y.ravel())[0, 1])
    assert by_unit["n"] == 60 and by_unit["n_units"] == 30
    assert by_unit["low"] < by_unit["estimate"] < by_unit["high"]
    lengths = rng.integers(5, 50, size=(30, 2)).astype(float)
    res = C.residualize(x + 0.3 * lengths, lengths)
    assert res.shape == (30, 2) and abs(np.corrcoef(res.ravel(), lengths.ravel())[0, 1]) < 1e-10
    with pytest.raises(ValueError, match="at least 3 rows"):
        C.correlation(x[:1], y[:1])


def test_token_correlations_split_by_kind():
    rng = np.random.default_rng(0)
    d = [rng.normal(size=12) for _ in range(30)]
    t = [a + 0.5 * rng.normal(size=12) for a in d]
    k = [rng.integers(0, 3, size=12) for _ in range(30)]
    out = C.token_correlations(d, t, k, {1: "grounded", 2: "hallucinated"}, n_resamples=100)
    for name in ("all", "grounded", "hallucinated"):
        sel = [np.ones(12, bool) if name == "all" else kk == {"grounded": 1, "hallucinated": 2}[name] for kk in k]
        a = np.concatenate([x[s] for x, s in zip(d, sel)])
        b = np.concatenate([x[s] for x, s in zip(t, sel)])
        assert out[name]["pearson"]["estimate"] == pytest.approx(np.corrcoef(a, b)[0, 1])
        assert out[name]["n_tokens"] == len(a) and out[name]["mean_dleaf"] == pytest.approx(a.mean())
        assert out[name]["pearson"]["low"] < out[name]["pearson"]["estimate"] < out[name]["pearson"]["high"]
    none = C.token_correlations(d, t, [np.zeros(12, int)] * 30, {2: "hallucinated"}, n_resamples=50)
    hall = none["hallucinated"]["pearson"]
    assert math.isnan(hall["estimate"]) and "0 tokens" in hall["note"]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="has 5 rows but r_theta has 4"):
        C.correlation(np.zeros(5), np.ones(4), names=("r_D", "r_theta"))
    with pytest.raises(ValueError, match="at least 3 rows"):
        C.correlation([1.0], [2.0])
    with pytest.raises(ValueError, match="at least 3 rows"):
        C.pair_agreement([1.0], [0.0], [1.0], [0.5])
    with pytest.raises(ValueError, match="non-finite"):
        C.correlation([1.0, np.nan, 2.0], [1.0, 2.0, 3.0])
    const = C.correlations(np.zeros(10), np.arange(10.0), names=("r_D", "r_theta"), n_resamples=20, permutations=20)
    assert all(math.isnan(const[m]["estimate"]) and const[m]["note"] == "undefined: r_D is constant"
               for m in C.CORRELATIONS)
    sc = C.scale_fit(np.zeros(5), np.arange(5.0))
    assert math.isnan(sc["s"]) and "0 on every row" in sc["note"]
    with pytest.raises(ValueError, match="row 0: 2 D-LEAF tokens, 3 DPO tokens"):
        C.token_correlations([np.zeros(2)], [np.zeros(3)], [np.zeros(2)], {})
    with pytest.raises(ValueError, match="k must lie"):
        C.top_k_overlap(np.zeros(4), np.zeros(4), 5)


def test_mechanism_p_values_equal_exact_enumeration():
    """On 6 cells there are 720 pairings: the exact permutation p-values are computed here by enumerating them all
    (top-k overlap one-sided: at least as large; rank correlations two-sided); scipy's Monte Carlo p-values from
    2000 random pairings agree within sampling error (standard error below 0.011)."""
    f = np.array([0.9, 0.7, 0.0, 0.1, 0.0, 0.3])
    m = np.array([0.5, 0.8, -0.1, 0.0, 0.2, -0.3])
    k = 2
    out = C.mechanism(f, m, k=k, permutations=2000)
    observed = C.top_k_overlap(f, m, k)
    perms = [np.array(p) for p in itertools.permutations(m)]
    exact = np.mean([C.top_k_overlap(f, p, k) >= observed - 1e-12 for p in perms])
    assert out["top_k_overlap"]["estimate"] == observed == 1.0
    assert out["top_k_overlap"]["chance"] == k / 6
    assert out["top_k_overlap"]["p_value"] == pytest.approx(exact, abs=0.03) and exact < 0.1
    rho = stats.spearmanr(f, m).statistic
    exact_rho = np.mean([abs(stats.spearmanr(f, p).statistic) >= abs(rho) - 1e-12 for p in perms])
    assert out["spearman"]["estimate"] == pytest.approx(rho)
    assert out["spearman"]["p_value"] == pytest.approx(exact_rho, abs=0.035)
    assert out["cells_corrected"] == 4 and out["k"] == k


def test_sign_agreement_chance_from_the_marginal_sign_rates():
    """Chance agreement of two independent signs is p_D p_theta + (1 - p_D)(1 - p_theta), not 1/2."""
    md = np.array([1.0] * 16 + [-1.0] * 4)  # 80% positive
    mt = np.array([1.0] * 9 + [-1.0] + [1.0] * 9 + [-1.0])  # 90% positive
    pa = C.pair_agreement(md, np.zeros(20), mt, np.zeros(20), n_resamples=50, permutations=200)
    sa = pa["sign_agreement"]
    assert sa["chance"] == pytest.approx(0.8 * 0.9 + 0.2 * 0.1)
    assert sa["estimate"] == pytest.approx(np.mean(np.sign(md) == np.sign(mt)))
    assert pa["n_signed"] == 20 and pa["dleaf_accuracy"] == 0.8 and pa["dpo_accuracy"] == 0.9
    tied = C.pair_agreement([1.0, 0.0, 2.0, -1.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0] * 4,
                            n_resamples=20, permutations=20)
    assert tied["n_signed"] == 2 and "only 2 pairs" in tied["sign_agreement"]["note"]
    assert tied["dleaf_ties"] == 0.25 and tied["dpo_ties"] == 0.25


def test_bootstrap_resamples_whole_pairs():
    """When a pair's two replies carry the same values, resampling pairs sees half as many independent units as
    resampling replies: the interval is about sqrt(2) wider. The interval equals a hand-written pair bootstrap."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    xs, ys = np.stack([x, x], 1), np.stack([y, y], 1)  # (pairs, [chosen, rejected])
    out = C.correlation(xs, ys, "pearson", n_resamples=4000, permutations=0, seed=1)
    draws = rng.integers(0, 40, size=(4000, 40))
    by_pair = np.array([np.corrcoef(xs[d].ravel(), ys[d].ravel())[0, 1] for d in draws])
    lo, hi = np.quantile(by_pair, [0.025, 0.975])
    assert out["low"] == pytest.approx(lo, abs=0.04) and out["high"] == pytest.approx(hi, abs=0.04)
    draws = rng.integers(0, 80, size=(4000, 80))
    by_reply = np.array([np.corrcoef(xs.ravel()[d], ys.ravel()[d])[0, 1] for d in draws])
    width_reply = np.subtract(*np.quantile(by_reply, [0.975, 0.025]))
    assert (out["high"] - out["low"]) / width_reply > 1.25
    assert out["n"] == 80 and out["n_units"] == 40
    sc = C.scale_fit(xs, ys, n_resamples=2000, seed=1)
    s_hand = np.array([np.dot(xs[d].ravel(), ys[d].ravel()) / np.dot(xs[d].ravel(), xs[d].ravel())
                       for d in rng.integers(0, 40, size=(2000, 40))])
    assert sc["high"] - sc["low"] == pytest.approx(np.subtract(*np.quantile(s_hand, [0.975, 0.025])), rel=0.15)


def test_permutation_shuffles_whole_pairs():
    """When a pair's two replies carry the same values, shuffling pairs against pairs sees half as many independent
    units as shuffling replies: the p-value is larger. It equals a hand-written permutation test over pairs."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=30)
    y = 0.35 * x + rng.normal(size=30)
    xs, ys = np.stack([x, x], 1), np.stack([y, y], 1)
    out = C.correlation(xs, ys, "pearson", n_resamples=20, permutations=4000, seed=0)
    observed = abs(np.corrcoef(xs.ravel(), ys.ravel())[0, 1])
    null_pairs = [abs(np.corrcoef(xs[rng.permutation(30)].ravel(), ys.ravel())[0, 1]) for _ in range(4000)]
    null_replies = [abs(np.corrcoef(rng.permutation(xs.ravel()), ys.ravel())[0, 1]) for _ in range(4000)]
    p_pairs = np.mean(np.array(null_pairs) >= observed - 1e-12)
    p_replies = np.mean(np.array(null_replies) >= observed - 1e-12)
    assert p_pairs > 3 * p_replies and p_pairs > 0.02
    assert out["p_value"] == pytest.approx(p_pairs, abs=0.015)


def test_token_level_bootstrap_resamples_whole_replies():
    """Token-level intervals resample replies (clusters of tokens): equal to a hand-written cluster bootstrap."""
    rng = np.random.default_rng(3)
    d = [np.full(5, v) for v in rng.normal(size=30)]  # every token of a reply shares its value
    t = [a + 0.5 * rng.normal() for a in d]
    kinds = [np.ones(5, int)] * 30
    out = C.token_correlations(d, t, kinds, {1: "grounded"}, methods=("pearson",), n_resamples=1000,
                               seed=2)["all"]["pearson"]
    draws = rng.integers(0, 30, size=(1000, 30))
    hand = np.array([np.corrcoef(np.concatenate([d[i] for i in s]), np.concatenate([t[i] for i in s]))[0, 1]
                     for s in draws])
    lo, hi = np.quantile(hand, [0.025, 0.975])
    assert out["low"] == pytest.approx(lo, abs=0.06) and out["high"] == pytest.approx(hi, abs=0.06)


def test_minimum_sizes_are_inclusive():
    """Three rows (or three signed pairs, three tokens in two replies, k = every cell) are enough; fewer are not."""
    x, y = np.array([0.1, 0.5, 0.2]), np.array([1.0, 3.0, 2.5])
    three = C.correlation(x, y, "pearson", n_resamples=20, permutations=0)
    assert three["estimate"] == pytest.approx(np.corrcoef(x, y)[0, 1]) and three["note"] is None
    assert math.isnan(three["p_value"]) and three["n_units"] == 3
    pa = C.pair_agreement([1.0, -1.0, 2.0, 0.0], [0.0] * 4, [1.0, 1.0, 2.0, 5.0], [0.0] * 4, n_resamples=20,
                          permutations=20)
    assert pa["n_signed"] == 3 and pa["sign_agreement"]["note"] is None
    assert pa["sign_agreement"]["estimate"] == pytest.approx(2 / 3)
    assert pa["dleaf_accuracy"] == 0.5 and pa["dpo_accuracy"] == 1.0  # a tied pair is not a win
    with pytest.raises(ValueError, match="must be 1-d"):
        C.pair_agreement(np.zeros((4, 2)), np.zeros((4, 2)), np.zeros((4, 2)), np.zeros((4, 2)))
    a = np.array([[0.9, 0.1], [0.5, 0.0]])
    assert C.top_k_overlap(a, -a, a.size) == 1.0 and C.top_k_overlap(a, -a, 1) == 0.0
    # token level: three tokens of a kind in two replies are enough, five in one reply are not
    d = [np.array([0.1, 0.4, 9.0]), np.array([0.3, 9.0, 9.0]), np.array([1.0, 2.0, 3.0, 4.0, 5.0])]
    t = [np.array([1.0, 2.0, 0.0]), np.array([1.5, 0.0, 0.0]), np.array([1.0, 3.0, 2.0, 5.0, 4.0])]
    k = [np.array([1, 1, 0]), np.array([1, 0, 0]), np.array([2, 2, 2, 2, 2])]
    out = C.token_correlations(d, t, k, {1: "grounded", 2: "hallucinated"}, methods=("pearson",), n_resamples=20)
    assert out["grounded"]["n_tokens"] == 3 and out["grounded"]["n_rows"] == 2
    assert out["grounded"]["pearson"]["estimate"] == pytest.approx(np.corrcoef([0.1, 0.4, 0.3], [1, 2, 1.5])[0, 1])
    assert out["hallucinated"]["n_rows"] == 1 and "5 tokens in 1 rows" in out["hallucinated"]["pearson"]["note"]
    assert out["all"]["n_tokens"] == 11 and out["all"]["n_rows"] == 3


def test_scale_fit_r2_and_beta_match_by_hand():
    rng = np.random.default_rng(2)
    x = rng.normal(size=30)
    y = 1.7 * x + 0.8 * rng.normal(size=30)
    sc = C.scale_fit(x, y, beta=0.2, n_resamples=100)
    s = np.dot(x, y) / np.dot(x, x)
    assert sc["s"] == pytest.approx(s) and sc["beta_match"] == pytest.approx(0.2 * s)
    assert sc["r2"] == pytest.approx(1 - np.sum((y - s * x) ** 2) / np.sum(y ** 2))
    assert 0.5 < sc["r2"] < 0.95 and sc["degenerate_resamples"] == 0.0 and sc["n"] == 30
    assert math.isnan(C.scale_fit(x, y, n_resamples=20)["beta_match"])  # no beta given


def test_degenerate_resamples_are_dropped_and_counted():
    """x is 0 on 9 of 10 rows: a bootstrap resample that misses the tenth has a constant x and no correlation. Such
    resamples (about 0.9 ** 10 = 35% of them) are dropped from the interval and their share reported."""
    x = np.r_[np.zeros(9), 1.0]
    y = np.arange(10.0)
    out = C.correlation(x, y, "pearson", n_resamples=2000, permutations=0)
    assert out["degenerate_resamples"] == pytest.approx(0.9 ** 10, abs=0.04)
    assert -1 <= out["low"] <= out["high"] <= 1
    clean = C.correlation(np.arange(10.0), y + np.sin(y), "pearson", n_resamples=200, permutations=0)
    assert clean["degenerate_resamples"] == 0.0


def test_default_top_k_is_the_number_of_corrected_cells_clipped():
    """k defaults to the number of cells D-LEAF ever corrects, clipped to [1, cells / 4]."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=32)
    for corrected, k in ((3, 3), (20, 8), (0, 1)):
        f = np.zeros(32)
        f[:corrected] = rng.random(corrected) + 0.1
        out = C.mechanism(f, m, permutations=20)
        assert out["k"] == k and out["cells_corrected"] == corrected and out["top_k_overlap"]["chance"] == k / 32


def test_matched_noise_has_the_rewards_mean_and_spread():
    r = np.random.default_rng(1).normal(3.0, 2.0, size=20000)
    noise = C.matched_noise(r, seed=5)
    assert noise.shape == r.shape and not np.allclose(noise, r)
    assert noise.mean() == pytest.approx(r.mean(), abs=0.06) and noise.std() == pytest.approx(r.std(), rel=0.03)
    flat = C.matched_noise(np.full(5000, 4.0), seed=0)  # a constant reward: unit spread around it
    assert flat.mean() == pytest.approx(4.0, abs=0.06) and flat.std() == pytest.approx(1.0, rel=0.05)
    assert np.array_equal(C.matched_noise(r, seed=5), noise)
    assert sorted(C.shuffled(np.arange(10), 3).tolist()) == list(range(10))
