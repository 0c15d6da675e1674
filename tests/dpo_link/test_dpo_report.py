"""dpo_link.report: the one number format, the verdict in words, the terms, the scatter's outlier clipping, strict
JSON; on a report built from synthetic rewards (no model)."""

import json
import math
import re

import numpy as np
import pytest

from dpo_link import correspondence as C
from dpo_link import report as R
from dpo_link.rewards import dpo_loss


def synthetic_report(slope=8.9e-4, dleaf_shift=0.0, n=30, seed=0):
    """A report with every section measure_pairs writes, its statistics computed from random rewards."""
    rng = np.random.default_rng(seed)
    r_theta = rng.normal(size=(n, 2)) - np.array([0.0, 2.0])
    r_d = 1e-3 * rng.normal(size=(n, 2)) + dleaf_shift * r_theta
    r_d[0, 0] = 0.5  # one outlier far from the bulk
    kw = dict(n_resamples=50, seed=0)
    seq = {name: C.correlations(v, r_theta, permutations=50, **kw)
           for name, v in [("dleaf", r_d), ("random_target", r_d[::-1]), ("random_layers", r_d * 2),
                           ("dleaf_length_partial", r_d), ("matched_noise", C.matched_noise(r_d)),
                           ("shuffled", C.shuffled(r_d))]}
    lengths = rng.integers(5, 40, size=(n, 2)).astype(float)
    seq["length_vs_dpo"] = C.correlation(lengths, r_theta, "spearman", permutations=0, **kw)
    seq["length_vs_dleaf"] = C.correlation(lengths, r_d, "spearman", permutations=0, **kw)
    maps = rng.random((2, 4)), rng.normal(size=(2, 4))
    pr = {"n_pairs": n, "n_rows": 2 * n, "beta": 0.1, "flag_rate": 0.053, "corrected_share": 0.027,
          "dpo": {k: dpo_loss(v[:, 0], v[:, 1]) for k, v in [("adapter", r_theta), ("dleaf", r_d)]},
          "sequence": seq,
          "pairs": {"dleaf": C.pair_agreement(r_d[:, 0], r_d[:, 1], r_theta[:, 0], r_theta[:, 1], permutations=50,
                                              **kw)},
          "scale": C.scale_fit(r_d, r_theta, 0.1, **kw),
          "mechanism": {**C.mechanism(*maps, permutations=50), "n_positions": 100},
          "curve": [{"gamma": g, **dpo_loss(g * r_d[:, 0], g * r_d[:, 1])} for g in (0.0, 0.5, 1.0)],
          "slope": {"slope": slope, "finite_difference": {"h": 0.01, "central": slope, "forward": slope},
                    "sweep_forward_difference": slope},
          "arrays": {"r_theta": r_theta.T.ravel().tolist(), "r_dleaf": r_d.T.ravel().tolist(),
                     "r_random_target": r_d[::-1].T.ravel().tolist(), "chosen": list(range(n)),
                     "rejected": list(range(n, 2 * n)), "correction_frequency": maps[0].tolist(),
                     "mass_change": maps[1].tolist(), "mass_base": maps[0].tolist()}}
    return {"config": {"model": "data/organism", "adapter": "data/organism_dpo", "dleaf": "defaults",
                       "protocol": {"confidence": 0.95, "n_resamples": 50, "permutations": 50}},
            "pairs_report": pr}


def test_one_number_format():
    assert R.num(0.693714) == "0.694" and R.num(-41.0) == "-41.000" and R.num(0.0) == "0.000"
    assert R.num(5.67e-4) == "5.67e-4" and R.num(-3.3e-5) == "-3.30e-5" and R.num(0.00999) == "9.99e-3"
    assert R.num(None) == "-" and R.num(float("nan")) == "nan" and R.num(7) == "7"
    assert R.interval({"estimate": 0.25, "low": 0.1, "high": 0.38, "p_value": 0.0005}) == \
        "0.250 [0.100, 0.380], p = 5.00e-4"
    assert R.interval({"note": "undefined: r_D is constant"}) == "undefined: r_D is constant"


def test_markdown_opens_with_the_verdict_in_words_and_defines_its_terms():
    md = R.report_markdown(synthetic_report(slope=8.9e-4))
    head = md.split("## ")[0]
    assert "**D-LEAF is not a DPO descent step on these pairs**" in head and "positive (8.90e-4)" in head
    assert "do not agree" in head and "does not detectably correct" in head
    for term in ("matched noise", "shuffled", "sign-test p", "beta_D", "negative", "chance"):
        assert term in head, term
    assert "DPO loss - log 2" in md and "| 0.000 |" in md  # the curve at gamma 0
    assert "Positive: D-LEAF's correction ascends the DPO loss" in md and "Negative:" not in md
    flat = R.report_markdown(synthetic_report(slope=-8.9e-4))
    assert "Negative: D-LEAF's correction descends the DPO loss." in flat and "Positive:" not in flat
    assert "Zero:" in R.report_markdown(synthetic_report(slope=0.0))
    decimals = [t for t in re.findall(r"\d+\.(\d+)(?![\de])", md.replace("log 2 = 0.693147", "").replace("below 0.01", ""))]
    assert decimals and all(len(t) == 3 for t in decimals), sorted(set(decimals), key=len)[-3:]


def test_the_verdict_follows_the_descent_rule():
    rep = synthetic_report(slope=-1e-3, dleaf_shift=0.5)
    pr = rep["pairs_report"]
    assert pr["dpo"]["dleaf"]["loss"] < math.log(2) and pr["dpo"]["dleaf"]["accuracy_p_value"] < 0.05
    assert R.verdict_lines(pr)[0].startswith("**D-LEAF is a DPO descent step on these pairs**")
    pr["slope"]["slope"] = 2e-3
    assert R.verdict_lines(pr)[0].startswith("**D-LEAF is not a DPO descent step")


def test_clip_limits_keep_the_bulk_and_zero_and_drop_only_outliers():
    rng = np.random.default_rng(0)
    bulk = 1e-3 * rng.normal(size=200)
    lo, hi = R.clip_limits(np.r_[bulk, 0.5])
    assert lo <= bulk.min() and hi >= bulk.max() and lo <= 0 <= hi and hi < 0.5
    assert R.clip_limits(bulk) == pytest.approx((bulk.min() - 0.08 * np.ptp(bulk), bulk.max() + 0.08 * np.ptp(bulk)))
    assert R.clip_limits(np.full(5, 2.0))[0] <= 0  # constant values: the axis still shows 0


def test_write_report_strict_json_and_figures(tmp_path):
    rep = synthetic_report()
    rep["pairs_report"]["scale"]["low"] = float("nan")
    files = R.write_report(rep, tmp_path)
    assert set(files) == {"correspondence.json", "correspondence.md", "scatter.png", "loss_gamma.png", "heads.png"}

    def refuse(name):
        raise ValueError(name)

    back = json.loads((tmp_path / "correspondence.json").read_text(), parse_constant=refuse)
    assert back["pairs_report"]["scale"]["low"] is None
    assert not list(tmp_path.glob(".*"))
