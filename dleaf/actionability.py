"""What a flagging method sees: the premise check at every reply row.

D-LEAF does not compare object words with object words (:mod:`dleaf.premise`): it watches every row of a reply and
flags the rows whose signal is high. The statistics here measure a signal on that footing. ``score`` is one value
per row (one layer of one signal, larger = more anomalous), ``label`` marks the positive rows (those that predict a
hallucinated object word), ``cluster`` the caption each row belongs to (rows of one caption share its image and its
earlier tokens, so they are not independent: intervals resample captions), ``stratum`` an optional position stratum.

* :func:`stratified_auroc` -- the AUROC over pairs within the same stratum (e.g. a token-position bin), i.e. the
  pair-weighted mean of the within-stratum AUROCs;
* :func:`clustered_auroc` -- it, with a percentile-bootstrap interval that resamples clusters (captions);
* :func:`percentile_flags` -- recall and precision of a flag raised above a percentile of all rows;
* :func:`cv_auroc` -- the cross-validated AUROC of a logistic model (position alone, or position and the signal),
  folds grouped by caption (scikit-learn);
* :func:`actionability_table`, :func:`position_table`, :func:`first_token_table` and their ``*_markdown``
  renderers -- the tables of :mod:`dleaf.premise_check`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from .premise import _as_scores, _fmt

__all__ = ["FLAG_PERCENTILES", "ROW_KINDS", "COMPARISONS", "ANSWER_SUBSETS", "POSITION_BIN", "ORDINAL_STRATA",
           "cluster_pairs", "resampled_pairs", "stratified_auroc", "clustered_auroc", "percentile_flags",
           "position_features", "cv_auroc", "comparison_masks", "actionability_table", "position_table",
           "first_token_table", "actionability_markdown", "position_markdown", "first_token_markdown"]


#: The percentiles of all rows at which :func:`percentile_flags` puts a flag threshold.
FLAG_PERCENTILES = (90, 95, 99)


def cluster_pairs(score: np.ndarray, label: np.ndarray, stratum: np.ndarray, cluster: np.ndarray, n_clusters: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pair counts of a stratified AUROC, by cluster: ``M`` (C, C), ``M[a, b]`` the number of (positive of
    cluster ``a``, negative of cluster ``b``) pairs of the same stratum in which the positive scores higher (ties
    count one half); ``pos`` and ``neg`` (C, S), the numbers of positive and negative rows of each cluster in each
    stratum. A resample that takes cluster ``a`` ``k_a`` times then has ``U = k M k`` concordant pairs out of
    ``P = sum_s (k pos_s)(k neg_s)`` (:func:`resampled_pairs`)."""
    strata, g = np.unique(stratum, return_inverse=True)
    m = np.zeros((n_clusters, n_clusters))
    pos = np.zeros((n_clusters, strata.size))
    neg = np.zeros((n_clusters, strata.size))
    np.add.at(pos, (cluster[label], g[label]), 1.0)
    np.add.at(neg, (cluster[~label], g[~label]), 1.0)
    for k in range(strata.size):
        at = g == k
        p_at, n_at = at & label, at & ~label
        if not p_at.any() or not n_at.any():
            continue
        pv, pc = score[p_at], cluster[p_at]
        nv, nc = score[n_at], cluster[n_at]
        order = np.lexsort((nv, nc))  # negatives sorted by cluster, then score
        nv, nc = nv[order], nc[order]
        bounds = np.searchsorted(nc, np.arange(n_clusters + 1))
        x = np.zeros((pv.size, n_clusters))  # per positive, its concordant count against each cluster's negatives
        for b in np.flatnonzero(bounds[1:] > bounds[:-1]):
            vals = nv[bounds[b]:bounds[b + 1]]
            below = np.searchsorted(vals, pv, side="left")
            x[:, b] = below + 0.5 * (np.searchsorted(vals, pv, side="right") - below)
        np.add.at(m, pc, x)
    return m, pos, neg


def resampled_pairs(m: np.ndarray, pos: np.ndarray, neg: np.ndarray, counts: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(U, P)`` per row of ``counts`` (R, C): how often each cluster is taken (see :func:`cluster_pairs`)."""
    u = ((counts @ m) * counts).sum(1)
    p = ((counts @ pos) * (counts @ neg)).sum(1)
    return u, p


def _rows(score, label, stratum) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = _as_scores(score, "score")
    y = np.asarray(label)
    if y.dtype != np.bool_ or y.shape != s.shape:
        raise ValueError(f"label must be a bool array of the score's shape {s.shape}, got {y.dtype} {y.shape}")
    g = np.zeros(s.shape, np.int64) if stratum is None else np.asarray(stratum)
    if g.shape != s.shape:
        raise ValueError(f"stratum must have the score's shape {s.shape}, got {g.shape}")
    return s, y, g


def stratified_auroc(score, label, stratum=None) -> float:
    """The AUROC of ``score`` for ``label`` against the other rows, comparing only pairs in the same ``stratum``.

    ``sum_s U_s / sum_s P_s N_s``: ``U_s`` is the Mann-Whitney count of stratum ``s`` (pairs of a positive and a
    negative row of ``s`` in which the positive scores higher, ties one half), ``P_s`` and ``N_s`` its numbers of
    positive and negative rows. That is the mean of the within-stratum AUROCs weighted by their numbers of
    positive-negative pairs; a stratum lacking either class has no pairs and drops out. Without strata, the plain
    AUROC (:func:`auroc`). NaN where no stratum holds both classes."""
    s, y, g = _rows(score, label, stratum)
    u, p = resampled_pairs(*cluster_pairs(s, y, g, np.zeros(s.size, np.int64), 1), np.ones((1, 1)))
    return float(u[0] / p[0]) if p[0] > 0 else math.nan


def clustered_auroc(score, label, cluster, stratum=None, n_clusters: int | None = None, n_resamples: int = 2000,
                    seed: int | None = 0, confidence: float = 0.95) -> dict:
    """:func:`stratified_auroc` with a percentile-bootstrap interval that resamples clusters (captions).

    A replicate draws ``C`` clusters with replacement (``C`` = ``n_clusters``, default the number of distinct
    ``cluster`` codes; ``cluster`` holds integer codes ``0 .. C-1``) and takes every row of each drawn cluster as
    often as it was drawn; a replicate without a positive-negative pair in any stratum is left out. Clusters
    without rows of the compared classes still count among the ``C`` drawn, so comparisons on the same clusters
    with the same ``seed`` use the same draws (common random numbers). The interval is the ``(1-confidence)/2``
    and ``(1+confidence)/2`` quantiles of the replicates (NaN with fewer than 2 clusters or no pair).

    Returns ``{"auroc", "ci_low", "ci_high", "n_positive", "n_negative", "n_pairs", "n_strata"}``: ``n_pairs``
    the number of within-stratum positive-negative pairs, ``n_strata`` the strata that hold both classes.
    """
    s, y, g = _rows(score, label, stratum)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}")
    c = np.asarray(cluster)
    if c.shape != s.shape or (c.size and (not np.issubdtype(c.dtype, np.integer) or c.min() < 0)):
        raise ValueError("cluster must hold non-negative integer codes, one per score")
    n_c = int(n_clusters) if n_clusters is not None else (int(c.max()) + 1 if c.size else 0)
    if c.size and c.max() >= n_c:
        raise ValueError(f"cluster codes must lie below n_clusters={n_c}")
    pairs = cluster_pairs(s, y, g, c.astype(np.int64), n_c)
    u, p = resampled_pairs(*pairs, np.ones((1, n_c)))
    strata = int(((pairs[1].sum(0) > 0) & (pairs[2].sum(0) > 0)).sum())
    out = {"auroc": float(u[0] / p[0]) if p[0] > 0 else math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "n_positive": int(y.sum()), "n_negative": int((~y).sum()), "n_pairs": int(p[0]), "n_strata": strata}
    if p[0] == 0 or n_c < 2:
        return out
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, int(n_resamples), 500):
        counts = rng.multinomial(n_c, np.full(n_c, 1.0 / n_c), size=min(500, int(n_resamples) - start))
        ur, pr = resampled_pairs(*pairs, counts.astype(np.float64))
        reps.append(np.where(pr > 0, ur / np.where(pr > 0, pr, 1.0), np.nan))
    reps = np.concatenate(reps)
    reps = reps[np.isfinite(reps)]
    if reps.size:
        alpha = (1.0 - confidence) / 2.0
        out["ci_low"], out["ci_high"] = (float(q) for q in np.quantile(reps, [alpha, 1.0 - alpha]))
    return out


def percentile_flags(score, positive, negative=None, percentiles: Sequence[float] = FLAG_PERCENTILES
                     ) -> list[dict]:
    """A flag raised where ``score`` exceeds its ``q``-th percentile over *all* rows given (``numpy.percentile``,
    linear interpolation), for each ``q``: ``threshold``, ``recall`` (flagged positives / positives),
    ``precision`` (flagged positives / flagged rows among ``positive | negative``; NaN when none is flagged) and
    ``flag_rate`` (the flagged share of ``positive | negative``). ``negative`` defaults to every non-positive row.
    The threshold does not depend on which rows are compared, so recall is the same for every choice of
    ``negative``."""
    s = _as_scores(score, "score")
    pos = np.asarray(positive, bool)
    neg = ~pos if negative is None else np.asarray(negative, bool)
    if pos.shape != s.shape or neg.shape != s.shape:
        raise ValueError(f"positive and negative must have the score's shape {s.shape}")
    if (pos & neg).any():
        raise ValueError("a row cannot be both positive and negative")
    out = []
    for q in percentiles:
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentiles must lie in [0, 100], got {q}")
        t = float(np.percentile(s, q)) if s.size else math.nan
        flag = s > t
        tp, fp = int((flag & pos).sum()), int((flag & neg).sum())
        n_pos, n_cmp = int(pos.sum()), int((pos | neg).sum())
        out.append({"percentile": q, "threshold": t, "recall": tp / n_pos if n_pos else math.nan,
                    "precision": tp / (tp + fp) if tp + fp else math.nan,
                    "flag_rate": (tp + fp) / n_cmp if n_cmp else math.nan})
    return out


ORDINAL_STRATA = 4  # mentions 1, 2, 3 and 4 or later


def position_features(position, ordinal) -> np.ndarray:
    """The position-only design matrix of :func:`cv_auroc`: the row's token position in the reply, its log
    (``log(1 + position)``) and indicators of the mention ordinal 2, 3 and 4 or later (1 is the base)."""
    pos = np.asarray(position, np.float64)
    o = np.minimum(np.asarray(ordinal, np.int64), ORDINAL_STRATA)
    return np.column_stack([pos, np.log1p(pos)] + [(o == k).astype(np.float64)
                                                    for k in range(2, ORDINAL_STRATA + 1)])


def cv_auroc(features, label, groups, n_splits: int = 5) -> float:
    """Cross-validated AUROC of a logistic model of ``label`` on ``features`` (scikit-learn: standardised
    features, ``LogisticRegression`` with its defaults, L2 penalty C = 1): ``GroupKFold`` over ``groups``
    (captions, so no caption is in both a training and its test fold), the out-of-fold predicted probabilities of
    every fold pooled into one AUROC (``sklearn.metrics.roc_auc_score``). A fold whose training rows hold one class only
    predicts its positive share. NaN when ``label`` holds one class or there are fewer than 2 groups."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    y = np.asarray(label, bool)
    g = np.asarray(groups)
    k = min(int(n_splits), len(np.unique(g)))
    if y.all() or not y.any() or k < 2:
        return math.nan
    pred = np.zeros(y.size)
    for train, test in GroupKFold(n_splits=k).split(x, y, g):
        if y[train].all() or not y[train].any():
            pred[test] = float(y[train].mean())
            continue
        fit = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[train], y[train])
        pred[test] = fit.predict_proba(x[test])[:, 1]
    return float(roc_auc_score(y, pred))


# ---------------------------------------------------------------------------
# Row tables: actionability, position control, first-token answers
# ---------------------------------------------------------------------------

#: What the reply rows are, by the token they predict: the first token of a hallucinated or of a grounded object
#: mention, a later token of a mention (a multi-token object name), or no object word.
ROW_KINDS = ("hallucinated", "grounded", "object_rest", "other")

#: The negatives each comparison sets against the hallucinated rows.
COMPARISONS = {"all": "every other reply row",
               "grounded": "rows that predict the first token of a grounded object word",
               "non_object": "rows that predict no object word"}


def comparison_masks(kind) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{comparison: (positive, negative)}`` row masks from the per-row ``kind`` (:data:`ROW_KINDS`): positives
    are always the ``hallucinated`` rows; negatives every other row (``all``), the ``grounded`` rows, or the
    ``other`` rows (``non_object``)."""
    k = np.asarray(kind)
    bad = sorted(set(k.tolist()) - set(ROW_KINDS))
    if bad:
        raise ValueError(f"unknown row kind(s) {', '.join(map(repr, bad))}; expected {', '.join(ROW_KINDS)}")
    pos = k == "hallucinated"
    return {"all": (pos, ~pos), "grounded": (pos, k == "grounded"), "non_object": (pos, k == "other")}


def _signal_arrays(signals: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    if not isinstance(signals, Mapping) or not signals:
        raise ValueError("signals must be a non-empty mapping of name -> (n_rows, n_layers) array")
    out = {}
    for name, sig in signals.items():
        arr = np.asarray(sig, np.float64)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise ValueError(f"signal {name!r} must have shape ({n}, n_layers), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"signal {name!r} contains non-finite values (NaN or inf)")
        out[name] = arr
    return out


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else math.nan


def actionability_table(signals: Mapping[str, np.ndarray], kind, cluster, n_clusters: int | None = None,
                        n_resamples: int = 2000, seed: int | None = 0, confidence: float = 0.95,
                        percentiles: Sequence[float] = FLAG_PERCENTILES) -> list[dict]:
    """Per comparison (:data:`COMPARISONS`), signal and layer: hallucinated rows against the comparison's
    negatives, with the AUROC and its caption-bootstrap interval (:func:`clustered_auroc`) and the recall and
    precision of flags at ``percentiles`` of all rows (:func:`percentile_flags`; the threshold is a percentile of
    every row of the set, whatever the comparison).

    ``signals``: name -> ``(n_rows, n_layers)``, larger = more anomalous; ``kind``: per row, one of
    :data:`ROW_KINDS`; ``cluster``: per row, its caption's code ``0 .. n_clusters-1``.
    Each row: ``comparison, signal, layer, n_positive, n_negative, mean_positive, mean_negative, base_rate``
    (positives / compared rows: the precision of a flag at random), ``auroc, ci_low, ci_high`` and ``flags``
    (one dict per percentile, :func:`percentile_flags`, with ``kinds``: the share of each row kind among every
    row of the set that the flag raises on, the same in each comparison)."""
    masks = comparison_masks(kind)
    k = np.asarray(kind)
    c = np.asarray(cluster)
    arrays = _signal_arrays(signals, c.size)
    rows = []
    for comparison, (pos, neg) in masks.items():
        keep = pos | neg
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        for name, arr in arrays.items():
            for layer in range(arr.shape[1]):
                col = arr[:, layer]
                est = clustered_auroc(col[keep], pos[keep], c[keep], n_clusters=n_clusters,
                                      n_resamples=n_resamples, seed=seed, confidence=confidence)
                flags = percentile_flags(col, pos, neg, percentiles)
                for f in flags:  # what the flagged rows are, over every row of the set
                    flagged = k[col > f["threshold"]]
                    f["kinds"] = {kk: float((flagged == kk).mean()) if flagged.size else math.nan for kk in ROW_KINDS}
                rows.append({"comparison": comparison, "signal": name, "layer": layer, "n_positive": n_pos,
                             "n_negative": n_neg, "mean_positive": _mean(col[pos]), "mean_negative": _mean(col[neg]),
                             "base_rate": n_pos / (n_pos + n_neg) if n_pos + n_neg else math.nan,
                             "auroc": est["auroc"], "ci_low": est["ci_low"], "ci_high": est["ci_high"],
                             "flags": flags})
    return rows


POSITION_BIN = 8  # tokens per token-position stratum


def position_table(signals: Mapping[str, np.ndarray], kind, cluster, position, ordinal,
                   n_clusters: int | None = None, bin_width: int = POSITION_BIN, n_resamples: int = 2000,
                   seed: int | None = 0, confidence: float = 0.95, n_splits: int = 5) -> list[dict]:
    """Per comparison, signal and layer, the AUROC of hallucinated rows against the comparison's negatives with
    position held fixed, two ways:

    * stratified (:func:`clustered_auroc` with strata, caption-bootstrap intervals): within the mention ordinal
      (``ordinal``: 1 + the number of object mentions that begin before the row's token, so a mention's own row
      holds its rank among the reply's mentions; strata 1, 2, 3, 4 or later) and within token-position bins
      (``position // bin_width``, ``position`` the index of the predicted token in the reply); the stratified AUROC
      is the mean of the within-stratum AUROCs weighted by their numbers of positive-negative pairs;
    * a logistic model cross-validated by caption (:func:`cv_auroc`): position alone
      (:func:`position_features`: position, its log, ordinal indicators) against position and the signal's value.

    Each row: ``comparison, signal, layer, n_positive, n_negative, auroc`` (pooled, no strata), ``ordinal`` and
    ``position`` (each ``{auroc, ci_low, ci_high, n_pairs, n_strata}``), ``cv_position``, ``cv_position_signal``.
    """
    masks = comparison_masks(kind)
    c = np.asarray(cluster)
    arrays = _signal_arrays(signals, c.size)
    pos_arr = np.asarray(position, np.int64)
    ordl = np.asarray(ordinal, np.int64)
    if pos_arr.shape != c.shape or ordl.shape != c.shape:
        raise ValueError("position and ordinal must hold one value per row")
    if int(bin_width) < 1:
        raise ValueError(f"bin_width must be a positive integer, got {bin_width}")
    strata = {"ordinal": np.minimum(ordl, ORDINAL_STRATA), "position": pos_arr // int(bin_width)}
    base_x = position_features(pos_arr, ordl)
    rows = []
    for comparison, (pos, neg) in masks.items():
        keep = pos | neg
        y, groups = pos[keep], c[keep]
        cv_base = cv_auroc(base_x[keep], y, groups, n_splits)
        for name, arr in arrays.items():
            for layer in range(arr.shape[1]):
                col = arr[keep, layer]
                row = {"comparison": comparison, "signal": name, "layer": layer, "n_positive": int(pos.sum()),
                       "n_negative": int(neg.sum()), "auroc": stratified_auroc(col, y)}
                for by, g in strata.items():
                    est = clustered_auroc(col, y, groups, g[keep], n_clusters=n_clusters, n_resamples=n_resamples,
                                          seed=seed, confidence=confidence)
                    row[by] = {k: est[k] for k in ("auroc", "ci_low", "ci_high", "n_pairs", "n_strata")}
                row["cv_position"] = cv_base
                row["cv_position_signal"] = cv_auroc(np.column_stack([base_x[keep], col]), y, groups, n_splits)
                rows.append(row)
    return rows


#: The question subsets of :func:`first_token_table`.
ANSWER_SUBSETS = {"all": "every parsed answer", "absent": "questions about an absent object (wrong = yes)",
                  "present": "questions about a present object (wrong = no)"}


def first_token_table(signals: Mapping[str, np.ndarray], wrong, present, cluster=None, n_resamples: int = 2000,
                      seed: int | None = 0, confidence: float = 0.95) -> list[dict]:
    """Per question subset (:data:`ANSWER_SUBSETS`), signal and layer: the AUROC of the signal at the row that
    predicts a yes/no reply's first token, wrong answers against right ones, with a bootstrap interval that
    resamples ``cluster`` (default: each question on its own). ``wrong``, ``present``: bool per question (the
    answer disagrees with the truth; the asked object is in the image). Each row: ``subset, signal, layer,
    n_wrong, n_right, mean_wrong, mean_right, auroc, ci_low, ci_high``."""
    w = np.asarray(wrong)
    pr = np.asarray(present)
    if w.dtype != np.bool_ or pr.dtype != np.bool_ or w.ndim != 1 or pr.shape != w.shape:
        raise ValueError("wrong and present must be 1-D bool arrays of one length")
    arrays = _signal_arrays(signals, w.size)
    c = np.arange(w.size) if cluster is None else np.asarray(cluster)
    rows = []
    for subset, keep in (("all", np.ones(w.size, bool)), ("absent", ~pr), ("present", pr)):
        y = w[keep]
        for name, arr in arrays.items():
            for layer in range(arr.shape[1]):
                col = arr[keep, layer]
                est = clustered_auroc(col, y, c[keep], n_clusters=int(c.max()) + 1 if c.size else 0,
                                      n_resamples=n_resamples, seed=seed, confidence=confidence)
                rows.append({"subset": subset, "signal": name, "layer": layer, "n_wrong": int(y.sum()),
                             "n_right": int((~y).sum()), "mean_wrong": _mean(col[y]), "mean_right": _mean(col[~y]),
                             "auroc": est["auroc"], "ci_low": est["ci_low"], "ci_high": est["ci_high"]})
    return rows


def _ci(lo, hi) -> str:
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def _pct1(x) -> str:
    return "nan" if x is None or x != x else f"{100 * x:.1f}"


def actionability_markdown(rows: Sequence[dict]) -> str:
    """One table per comparison present in ``rows`` (:func:`actionability_table`), each headed by a line with its
    row counts and base rate; recall and precision in percent."""
    out = []
    for comparison, what in COMPARISONS.items():
        part = [r for r in rows if r["comparison"] == comparison]
        if not part:
            continue
        r0 = part[0]
        qs = [f["percentile"] for f in r0["flags"]]
        out += [f"Hallucinated rows ({r0['n_positive']}) against {what} ({r0['n_negative']}); a flag at random "
                f"would have precision {_pct1(r0['base_rate'])}%.", ""]
        kinds = comparison == "all" and bool(qs) and "kinds" in r0["flags"][-1]
        out.append("| signal | layer | mean hallucinated | mean other | AUROC | CI | "
                   + " | ".join(f"p{q:g} recall % | p{q:g} precision %" for q in qs)
                   + (f" | p{qs[-1]:g} flags on non-object rows %" if kinds else "") + " |")
        out.append("|---|---:|---:|---:|---:|---|" + "---:|---:|" * len(qs) + ("---:|" if kinds else ""))
        for r in part:
            out.append(f"| {r['signal']} | {r['layer']} | {_fmt(r['mean_positive'])} | {_fmt(r['mean_negative'])} "
                       f"| {_fmt(r['auroc'])} | {_ci(r['ci_low'], r['ci_high'])} | "
                       + " | ".join(f"{_pct1(f['recall'])} | {_pct1(f['precision'])}" for f in r["flags"])
                       + (f" | {_pct1(r['flags'][-1]['kinds']['other'])}" if kinds else "") + " |")
        out.append("")
    return "\n".join(out)


def position_markdown(rows: Sequence[dict]) -> str:
    """One table per comparison present in ``rows`` (:func:`position_table`): pooled AUROC, the two stratified
    AUROCs with intervals, and the cross-validated AUROCs of position alone and of position with the signal."""
    out = []
    for comparison, what in COMPARISONS.items():
        part = [r for r in rows if r["comparison"] == comparison]
        if not part:
            continue
        r0 = part[0]
        out += [f"Hallucinated rows ({r0['n_positive']}) against {what} ({r0['n_negative']}); position alone "
                f"(cross-validated logistic model): AUROC {_fmt(r0['cv_position'])}.", "",
                "| signal | layer | AUROC pooled | within ordinal | CI | within position bins | CI "
                "| CV position + signal |", "|---|---:|---:|---:|---|---:|---|---:|"]
        for r in part:
            o, p = r["ordinal"], r["position"]
            out.append(f"| {r['signal']} | {r['layer']} | {_fmt(r['auroc'])} | {_fmt(o['auroc'])} "
                       f"| {_ci(o['ci_low'], o['ci_high'])} | {_fmt(p['auroc'])} | {_ci(p['ci_low'], p['ci_high'])} "
                       f"| {_fmt(r['cv_position_signal'])} |")
        out.append("")
    return "\n".join(out)


def first_token_markdown(rows: Sequence[dict]) -> str:
    """One table per question subset present in ``rows`` (:func:`first_token_table`)."""
    out = []
    for subset, what in ANSWER_SUBSETS.items():
        part = [r for r in rows if r["subset"] == subset]
        if not part:
            continue
        r0 = part[0]
        out += [f"{what.capitalize()}: {r0['n_wrong']} wrong, {r0['n_right']} right.", "",
                "| signal | layer | mean wrong | mean right | AUROC | CI |", "|---|---:|---:|---:|---:|---|"]
        for r in part:
            out.append(f"| {r['signal']} | {r['layer']} | {_fmt(r['mean_wrong'])} | {_fmt(r['mean_right'])} "
                       f"| {_fmt(r['auroc'])} | {_ci(r['ci_low'], r['ci_high'])} |")
        out.append("")
    return "\n".join(out)
