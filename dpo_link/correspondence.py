"""The correspondence statistics: how closely D-LEAF's reward shift r_D matches the implicit reward r_theta of a DPO
adapter (both defined in :mod:`dpo_link.rewards`), with scipy.stats intervals and permutation p-values. What each
statistic means for the comparison is in ``docs/correspondence.md``.

Every function is pure (numpy in, a dict of plain floats out) and states its formula. Conventions:

- Intervals are bootstrap percentile intervals (``scipy.stats.bootstrap``, ``paired=True`` over rows, or over rows
  as clusters for token-level statistics), at ``confidence`` (0.95), from ``n_resamples`` resamples with ``seed``.
- p-values are two-sided permutation p-values (``scipy.stats.permutation_test`` with ``permutation_type="pairings"``:
  the pairing of the two reward vectors is shuffled, which is the null "r_D carries no information about
  r_theta").
- Degenerate data never gives a silent number. Mismatched lengths, non-finite values or fewer than
  :data:`MIN_ROWS` rows raise ``ValueError`` naming the input. A constant input (for example r_D = 0 on every row
  when D-LEAF corrects nothing) makes a correlation undefined: its estimate, interval and p-value are NaN and
  ``note`` says which input is constant. A bootstrap resample in which one side happens to be constant has no
  correlation; those resamples are dropped and their share is reported (``degenerate_resamples``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

MIN_ROWS = 3
NAN = float("nan")
CORRELATIONS = ("pearson", "spearman", "kendall")


# --------------------------------------------------------------------------------------------------- checks
def _vectors(x, y, names: tuple[str, str] = ("x", "y"), units: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        if not (units and x.ndim == 2 and y.ndim == 2):
            raise ValueError(f"{names[0]} and {names[1]} must be 1-d{' (or 2-d: units x rows)' if units else ''}, got "
                             f"shapes {x.shape} and {y.shape}")
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} has {x.shape[0]} rows but {names[1]} has {y.shape[0]}; the statistics pair "
                         "them row by row, so both must score the same rows in the same order")
    for n, v in zip(names, (x, y)):
        if not np.isfinite(v).all():
            raise ValueError(f"{n} has {int((~np.isfinite(v)).sum())} non-finite values")
    if x.shape[0] < MIN_ROWS:
        raise ValueError(f"a correlation needs at least {MIN_ROWS} rows, got {x.shape[0]} (a single pair gives "
                         "one margin: no correlation, interval or test is defined)")
    if units and x.ndim == 1:
        x, y = x[:, None], y[:, None]
    return x, y


def _constant(v: np.ndarray) -> bool:
    return bool(np.all(v == v[0]))


def _constant_note(x, y, names) -> str | None:
    const = [n for n, v in zip(names, (x, y)) if _constant(v)]
    if const:
        return f"undefined: {' and '.join(const)} {'is' if len(const) == 1 else 'are'} constant"
    return None


def _undefined(note: str, n: int) -> dict:
    return {"estimate": NAN, "low": NAN, "high": NAN, "p_value": NAN, "n": n, "note": note}


def _corr(method: str):
    if method == "pearson":
        return lambda a, b: stats.pearsonr(a, b).statistic
    if method == "spearman":
        return lambda a, b: stats.spearmanr(a, b).statistic
    if method == "kendall":
        return lambda a, b: stats.kendalltau(a, b).statistic
    raise ValueError(f"unknown correlation {method!r}; valid: {', '.join(CORRELATIONS)}")


def _safe(fn):
    def stat(*args):
        if any(_constant(np.asarray(a)) for a in args):
            return NAN
        return float(fn(*args))
    return stat


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    ok = np.isfinite(values)
    share_bad = float(1 - ok.mean()) if values.size else 1.0
    if not ok.any():
        return NAN, NAN, share_bad
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(values[ok], [alpha, 1 - alpha])
    return float(lo), float(hi), share_bad


def _bootstrap(data: tuple, statistic, n_resamples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """Percentile interval of ``statistic`` over paired bootstrap resamples (scipy.stats.bootstrap draws them); the
    resamples where the statistic is undefined are dropped and their share returned."""
    with warnings.catch_warnings():  # resamples with an undefined statistic are handled below, not warned about
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(data, statistic, paired=True, vectorized=False, n_resamples=n_resamples,
                              confidence_level=confidence, method="percentile",
                              random_state=np.random.default_rng(seed))
    return _percentile_interval(np.asarray(res.bootstrap_distribution), confidence)


def _bootstrap_units(x: np.ndarray, y: np.ndarray, fn, n_resamples: int, confidence: float, seed: int):
    """Percentile interval of ``fn(x.ravel(), y.ravel())`` over bootstrap resamples of the units (rows of the 2-d
    ``x``, ``y``; a unit is, e.g., a pair's chosen and rejected reply, which share an image and a prompt)."""
    def stat(idx):
        idx = np.asarray(idx, dtype=int)
        return fn(x[idx].ravel(), y[idx].ravel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((np.arange(x.shape[0]),), stat, vectorized=False, n_resamples=n_resamples,
                              confidence_level=confidence, method="percentile",
                              random_state=np.random.default_rng(seed))
    return _percentile_interval(np.asarray(res.bootstrap_distribution), confidence)


def _permutation_p_units(x: np.ndarray, y: np.ndarray, fn, n_resamples: int, seed: int) -> float:
    """Two-sided permutation p-value of ``fn``: the units of ``x`` are shuffled against those of ``y``."""
    yr = y.ravel()
    res = stats.permutation_test((np.arange(x.shape[0]),), lambda idx: fn(x[np.asarray(idx, dtype=int)].ravel(), yr),
                                 permutation_type="pairings", vectorized=False, n_resamples=n_resamples,
                                 alternative="two-sided", random_state=np.random.default_rng(seed))
    return float(res.pvalue)


def _permutation_p(x, y, statistic, n_resamples: int, seed: int) -> float:
    res = stats.permutation_test((x, y), statistic, permutation_type="pairings", vectorized=False,
                                 n_resamples=n_resamples, alternative="two-sided",
                                 random_state=np.random.default_rng(seed))
    return float(res.pvalue)


# ------------------------------------------------------------------------------------------- correlations
def correlation(x, y, method: str = "pearson", n_resamples: int = 2000, permutations: int = 2000,
                confidence: float = 0.95, seed: int = 0, names: tuple[str, str] = ("x", "y")) -> dict:
    """One correlation of paired values: ``estimate`` (Pearson r, Spearman rho or Kendall tau-b of all values),
    bootstrap ``low``/``high``, permutation ``p_value`` (0 permutations skips it: NaN), ``n`` values,
    ``n_units``, ``degenerate_resamples``.

    ``x`` and ``y`` are 1-d (each row its own unit) or 2-d (units x rows per unit, e.g. pairs x [chosen,
    rejected]): the bootstrap resamples whole units and the permutation shuffles whole units of ``x`` against
    ``y``, so that rows that share an image and a prompt are not counted as independent.
    """
    x, y = _vectors(x, y, names, units=True)
    note = _constant_note(x.ravel(), y.ravel(), names)
    if note:
        return {**_undefined(note, x.size), "n_units": x.shape[0]}
    fn = _safe(_corr(method))
    est = fn(x.ravel(), y.ravel())
    low, high, bad = _bootstrap_units(x, y, fn, n_resamples, confidence, seed)
    p = _permutation_p_units(x, y, fn, permutations, seed + 1) if permutations > 0 else NAN
    return {"estimate": est, "low": low, "high": high, "p_value": p, "n": x.size, "n_units": x.shape[0],
            "degenerate_resamples": bad, "note": None}


def correlations(x, y, methods: Sequence[str] = CORRELATIONS, **kwargs) -> dict:
    """:func:`correlation` for each of ``methods`` (Pearson, Spearman, Kendall by default)."""
    return {m: correlation(x, y, m, **kwargs) for m in methods}


def residualize(v, covariate) -> np.ndarray:
    """``v`` minus its least-squares fit ``a + b * covariate`` (to take a shared covariate such as reply length out
    of a correlation: the partial correlation is the correlation of the residuals). Any shape; fitted over all
    values."""
    v = np.asarray(v, dtype=np.float64)
    c = np.asarray(covariate, dtype=np.float64)
    if v.shape != c.shape:
        raise ValueError(f"residualize: values of shape {v.shape} but covariate of shape {c.shape}")
    design = np.stack([np.ones(c.size), c.ravel()], axis=1)
    coef, *_ = np.linalg.lstsq(design, v.ravel(), rcond=None)
    return (v.ravel() - design @ coef).reshape(v.shape)


# --------------------------------------------------------------------------------------------- pair level
def pair_agreement(dleaf_chosen, dleaf_rejected, dpo_chosen, dpo_rejected, n_resamples: int = 2000,
                   permutations: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Pair-level agreement of D-LEAF and DPO.

    Margins ``m_D = r_D(y_w) - r_D(y_l)`` and ``m_theta`` likewise: their correlations (:func:`correlations`);
    ``sign_agreement`` = share of pairs with ``sign(m_D) == sign(m_theta)`` among pairs where neither margin is 0
    (``n_signed`` of them), with a bootstrap interval, its permutation p-value and the agreement expected by chance
    from the two marginal sign rates ``p_D p_theta + (1 - p_D)(1 - p_theta)``; each side's reward accuracy
    (share of pairs with a positive margin).
    """
    dc, dr = _vectors(dleaf_chosen, dleaf_rejected, ("r_D(chosen)", "r_D(rejected)"))
    tc, tr = _vectors(dpo_chosen, dpo_rejected, ("r_theta(chosen)", "r_theta(rejected)"))
    md, mt = _vectors(dc - dr, tc - tr, ("D-LEAF margins", "DPO margins"))
    out = {"n": len(md), "dleaf_accuracy": float((md > 0).mean()), "dpo_accuracy": float((mt > 0).mean()),
           "dleaf_ties": float((md == 0).mean()), "dpo_ties": float((mt == 0).mean()),
           "margins": correlations(md, mt, n_resamples=n_resamples, permutations=permutations, confidence=confidence,
                                   seed=seed, names=("D-LEAF margins", "DPO margins"))}
    keep = (md != 0) & (mt != 0)
    sd, st = np.sign(md[keep]), np.sign(mt[keep])
    out["n_signed"] = int(keep.sum())
    if keep.sum() < MIN_ROWS:
        out["sign_agreement"] = _undefined(f"undefined: only {int(keep.sum())} pairs where both margins are nonzero",
                                           int(keep.sum()))
        return out
    agree = lambda a, b: float(np.mean(a == b))  # noqa: E731
    pd, pt = float((sd > 0).mean()), float((st > 0).mean())
    low, high, _ = _bootstrap((sd, st), agree, n_resamples, confidence, seed)
    p = _permutation_p(sd, st, agree, permutations, seed + 1) if permutations > 0 else NAN
    out["sign_agreement"] = {"estimate": agree(sd, st), "low": low, "high": high, "p_value": p, "n": len(sd),
                             "chance": pd * pt + (1 - pd) * (1 - pt), "note": None}
    return out


# -------------------------------------------------------------------------------------------- token level
def token_correlations(dleaf_tokens: Sequence[np.ndarray], dpo_tokens: Sequence[np.ndarray],
                       kinds: Sequence[np.ndarray], kind_names: dict[int, str], methods=("pearson", "spearman"),
                       n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Per-token log-ratio agreement, overall and separately per token kind (grounded / hallucinated object tokens).

    For the tokens of a kind (pooled over rows): the correlation of ``log pi_D(y_t)/pi_0(y_t)`` with
    ``log pi_theta(y_t)/pi_0(y_t)``, and each one's mean; intervals by a cluster bootstrap over rows (tokens of one
    reply are not independent), via ``scipy.stats.bootstrap`` on row indices. A kind with fewer than
    :data:`MIN_ROWS` tokens or a constant side gets NaN with a note.
    """
    if not (len(dleaf_tokens) == len(dpo_tokens) == len(kinds)):
        raise ValueError(f"token lists of different lengths: {len(dleaf_tokens)} D-LEAF rows, {len(dpo_tokens)} DPO "
                         f"rows, {len(kinds)} kind rows")
    for i, (a, b, k) in enumerate(zip(dleaf_tokens, dpo_tokens, kinds)):
        if not (len(a) == len(b) == len(k)):
            raise ValueError(f"row {i}: {len(a)} D-LEAF tokens, {len(b)} DPO tokens, {len(k)} kinds")
    d = [np.asarray(a, dtype=np.float64) for a in dleaf_tokens]
    t = [np.asarray(b, dtype=np.float64) for b in dpo_tokens]
    kd = [np.asarray(k) for k in kinds]
    rows = np.arange(len(d))
    out = {}
    for name, sel in [("all", None)] + [(n, k) for k, n in kind_names.items()]:
        def pick(idx, sel=sel):
            idx = np.asarray(idx, dtype=int)
            a = np.concatenate([d[i] if sel is None else d[i][kd[i] == sel] for i in idx]) if len(idx) else np.zeros(0)
            b = np.concatenate([t[i] if sel is None else t[i][kd[i] == sel] for i in idx]) if len(idx) else np.zeros(0)
            return a, b
        a, b = pick(rows)
        n_rows = int(sum(1 for i in rows if (len(d[i]) if sel is None else int((kd[i] == sel).sum())) > 0))
        entry: dict = {"n_tokens": int(len(a)), "n_rows": n_rows,
                       "mean_dleaf": float(a.mean()) if len(a) else NAN, "mean_dpo": float(b.mean()) if len(b) else NAN}
        if len(a) < MIN_ROWS or n_rows < 2:
            note = f"undefined: {len(a)} tokens in {n_rows} rows"
            for m in methods:
                entry[m] = _undefined(note, len(a))
            entry["mean_dleaf_interval"] = entry["mean_dpo_interval"] = [NAN, NAN]
            out[name] = entry
            continue
        for m in methods:
            note = _constant_note(a, b, ("D-LEAF log-ratios", "DPO log-ratios"))
            if note:
                entry[m] = _undefined(note, len(a))
                continue
            fn = _safe(_corr(m))

            def stat(idx, fn=fn):
                x, y = pick(idx)
                return fn(x, y) if len(x) >= MIN_ROWS else NAN
            low, high, bad = _cluster_bootstrap(rows, stat, n_resamples, confidence, seed)
            entry[m] = {"estimate": fn(a, b), "low": low, "high": high, "p_value": NAN, "n": len(a),
                        "degenerate_resamples": bad, "note": None}
        for side, j in (("dleaf", 0), ("dpo", 1)):
            low, high, _ = _cluster_bootstrap(rows, lambda idx, j=j: float(np.mean(pick(idx)[j])) if len(pick(idx)[j])
                                              else NAN, n_resamples, confidence, seed + 2 + j)
            entry[f"mean_{side}_interval"] = [low, high]
        out[name] = entry
    return out


def _cluster_bootstrap(rows: np.ndarray, stat, n_resamples: int, confidence: float, seed: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((rows,), stat, vectorized=False, n_resamples=n_resamples, confidence_level=confidence,
                              method="percentile", random_state=np.random.default_rng(seed))
    return _percentile_interval(np.asarray(res.bootstrap_distribution), confidence)


# ---------------------------------------------------------------------------------------------------- scale
def scale_fit(dleaf_rewards, dpo_rewards, beta: float | None = None, n_resamples: int = 2000,
              confidence: float = 0.95, seed: int = 0) -> dict:
    """The least-squares scale ``s = sum r_D r_theta / sum r_D^2`` of ``r_theta ~ s r_D`` (no intercept: both
    rewards are 0 for an unchanged policy), with a bootstrap interval (over units when the inputs are 2-d, as in
    :func:`correlation`) and the uncentred R^2
    ``1 - sum (r_theta - s r_D)^2 / sum r_theta^2``. Since r_D is proportional to beta, ``s * beta`` is the
    temperature at which D-LEAF's implicit reward best matches DPO's (``beta_match``). NaN with a note when r_D is
    0 on every row."""
    xu, yu = _vectors(dleaf_rewards, dpo_rewards, ("r_D", "r_theta"), units=True)
    x, y = xu.ravel(), yu.ravel()
    if not np.any(x != 0):
        return {"s": NAN, "low": NAN, "high": NAN, "r2": NAN, "beta_match": NAN, "n": len(x),
                "note": "undefined: r_D is 0 on every row (D-LEAF changed no reply's probability)"}

    def s_of(a, b):
        den = float(np.dot(a, a))
        return float(np.dot(a, b)) / den if den > 0 else NAN
    s = s_of(x, y)
    low, high, bad = _bootstrap_units(xu, yu, s_of, n_resamples, confidence, seed)
    ss = float(np.dot(y, y))
    r2 = 1 - float(np.sum((y - s * x) ** 2)) / ss if ss > 0 else NAN
    return {"s": s, "low": low, "high": high, "r2": r2, "beta_match": s * beta if beta else NAN, "n": len(x),
            "degenerate_resamples": bad, "note": None}


# ------------------------------------------------------------------------------------------------ mechanism
def head_maps(corrected: Sequence[np.ndarray], mass_base: Sequence[np.ndarray],
              mass_adapter: Sequence[np.ndarray]) -> dict:
    """Per (layer, head), pooled over every position that predicts a reply token:
    ``correction_frequency[l, h]`` = share of positions where D-LEAF corrected head h of layer l;
    ``mass_change[l, h]`` = mean over positions of (image mass under pi_theta - image mass under pi_0), the same
    tokens teacher-forced; ``mass_base`` the mean image mass under pi_0. Arrays of shape (L, H)."""
    if not (len(corrected) == len(mass_base) == len(mass_adapter)):
        raise ValueError(f"{len(corrected)} rows of corrections but {len(mass_base)} / {len(mass_adapter)} of mass")
    if not corrected:
        raise ValueError("no rows to pool")
    for i, (c, a, b) in enumerate(zip(corrected, mass_base, mass_adapter)):
        if not (c.shape == a.shape == b.shape):
            raise ValueError(f"row {i}: corrections {c.shape}, base mass {a.shape}, adapter mass {b.shape} differ")
    c = np.concatenate([np.asarray(x, dtype=np.float64) for x in corrected])
    a = np.concatenate([np.asarray(x, dtype=np.float64) for x in mass_base])
    b = np.concatenate([np.asarray(x, dtype=np.float64) for x in mass_adapter])
    return {"correction_frequency": c.mean(0), "mass_change": np.nanmean(b - a, 0), "mass_base": np.nanmean(a, 0),
            "n_positions": int(c.shape[0])}


def top_k_overlap(a, b, k: int) -> float:
    """``|top_k(a) & top_k(b)| / k`` over flattened cells (ties broken by the stable order of the cells)."""
    a, b = np.ravel(a), np.ravel(b)
    if not 1 <= k <= a.size:
        raise ValueError(f"k must lie in [1, {a.size}], got {k}")
    ta = set(np.argsort(-a, kind="stable")[:k].tolist())
    tb = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(ta & tb) / k


def mechanism(correction_frequency, mass_change, k: int | None = None, permutations: int = 2000, seed: int = 0) -> dict:
    """Does D-LEAF correct the heads whose image mass DPO raised? Over the L x H cells: Spearman and Kendall
    correlation of correction frequency with DPO's image-mass change (permutation p-values over cells), and the
    overlap of the top-k cells of each (k defaults to the number of cells D-LEAF ever corrects, clipped to
    [1, cells / 4]) against its chance value k / cells, with a permutation p-value (one-sided: overlap at least as
    large)."""
    f = np.ravel(np.asarray(correction_frequency, dtype=np.float64))
    m = np.ravel(np.asarray(mass_change, dtype=np.float64))
    f, m = _vectors(f, m, ("correction frequency", "image-mass change"))
    n = f.size
    if k is None:
        k = int(np.clip((f > 0).sum(), 1, max(1, n // 4)))
    out: dict = {"cells": n, "k": k, "cells_corrected": int((f > 0).sum())}
    note = _constant_note(f, m, ("correction frequency", "image-mass change"))
    for method in ("spearman", "kendall"):
        if note:
            out[method] = _undefined(note, n)
            continue
        fn = _safe(_corr(method))
        out[method] = {"estimate": fn(f, m), "p_value": _permutation_p(f, m, fn, permutations, seed), "n": n,
                       "note": None}
    ov = top_k_overlap(f, m, k)
    perm = stats.permutation_test((f, m), lambda a, b: top_k_overlap(a, b, k), permutation_type="pairings",
                                  vectorized=False, n_resamples=permutations, alternative="greater",
                                  random_state=np.random.default_rng(seed + 1))
    out["top_k_overlap"] = {"estimate": ov, "chance": k / n, "p_value": float(perm.pvalue)}
    return out


# ----------------------------------------------------------------------------------------------------- nulls
def matched_noise(rewards, seed: int = 0) -> np.ndarray:
    """A by-construction null at the reward level: Gaussian values with the mean and standard deviation of
    ``rewards`` and no relation to anything."""
    r = np.asarray(rewards, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return rng.normal(r.mean(), r.std() if r.std() > 0 else 1.0, size=r.shape)


def shuffled(values, seed: int = 0) -> np.ndarray:
    """``values`` in a random order (the pairing with the other reward broken, the marginal kept)."""
    return np.random.default_rng(seed).permutation(np.asarray(values))
