"""The "premise check": does a layer's image attention flag hallucinations?

D-LEAF rests on a premise: at positions where the model hallucinates an
object word, the image attention of some decoder layers is anomalous.  Given,
for every generated object-word mention, one value per layer of one or more
signals and whether the mention is hallucinated, this module measures per
layer how well each signal separates hallucinated from grounded mentions:

* :func:`auroc` -- the area under the ROC curve, i.e.
  ``P(X_hall > X_ground) + 0.5 * P(X_hall == X_ground)``;
* :func:`auroc_interval` -- a stratified percentile-bootstrap interval for it;
* :func:`premise_table` -- one :class:`PremiseRow` per (signal, layer);
* :func:`premise_markdown` / :func:`plot_premise` -- report them.

Signals must be oriented so that LARGER means MORE anomalous (e.g. the layer
image-attention entropy, or the image-mass deficit ``-mass``); an AUROC above
0.5 then means the signal points the way the premise says.

What a flagging method sees, at every reply row rather than at object words
only, is measured by :mod:`dleaf.actionability`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "PremiseRow",
    "auroc",
    "auc_from_ranks",
    "auroc_interval",
    "premise_table",
    "premise_markdown",
    "plot_premise",
    "premise_figure",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _as_scores(x, name: str) -> np.ndarray:
    """Convert to a 1-D float64 array of finite values, or raise."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be array-like of numbers ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


def auc_from_ranks(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """Vectorised AUROC along ``axis`` from mid-ranks of the pooled sample.

    ``U_pos = R_pos - n_pos (n_pos + 1) / 2`` with ``R_pos`` the sum of the
    (tie-averaged) ranks of the positives; ``AUROC = U_pos / (n_pos n_neg)``.
    Identical to the Mann-Whitney statistic, about twice as fast because no
    p-value is computed (used for the bootstrap replicates).
    """
    pos = np.moveaxis(pos, axis, -1)
    neg = np.moveaxis(neg, axis, -1)
    n_pos, n_neg = pos.shape[-1], neg.shape[-1]
    ranks = stats.rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    u = ranks[..., :n_pos].sum(axis=-1) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


def auroc(scores_positive, scores_negative) -> float:
    """Area under the ROC curve of ``scores_positive`` vs ``scores_negative``.

    Formula: ``AUROC = P(X_pos > X_neg) + 0.5 * P(X_pos == X_neg)`` over all
    ``n_pos * n_neg`` pairs, computed as the Mann-Whitney statistic of the
    positive sample divided by the number of pairs, ``U_pos / (n_pos * n_neg)``
    (``scipy.stats.mannwhitneyu``; ties count one half).

    Returns NaN if either group is empty.
    """
    pos = _as_scores(scores_positive, "scores_positive")
    neg = _as_scores(scores_negative, "scores_negative")
    if pos.size == 0 or neg.size == 0:
        return math.nan
    u = stats.mannwhitneyu(pos, neg, method="asymptotic").statistic
    return float(u / (pos.size * neg.size))


def auroc_interval(
    pos,
    neg,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int | None = 0,
) -> tuple[float, float]:
    """Stratified percentile-bootstrap confidence interval for :func:`auroc`.

    Each group is resampled independently with replacement at its own size
    (``scipy.stats.bootstrap`` with the two samples and ``paired=False``), so
    every replicate keeps the observed numbers of positives and negatives;
    the interval is the ``(1-confidence)/2`` and ``(1+confidence)/2``
    percentiles of the replicated AUROCs.

    The percentile method is used rather than BCa: on the degenerate data that
    occurs here (few mentions, heavy ties, perfectly separated groups) the
    bootstrap distribution can collapse to a point and the BCa acceleration /
    bias terms become undefined, whereas percentiles are always defined.

    Returns ``(nan, nan)`` if a group has fewer than 2 items or if all values
    (of both groups together) are equal, where the AUROC is identically 0.5
    and carries no information.
    """
    p = _as_scores(pos, "pos")
    n = _as_scores(neg, "neg")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}")
    nan = (math.nan, math.nan)
    if p.size < 2 or n.size < 2:
        return nan
    allv = np.concatenate([p, n])
    if np.all(allv == allv[0]):
        return nan
    res = stats.bootstrap(
        (p, n),
        auc_from_ranks,
        n_resamples=int(n_resamples),
        # bound memory: about 2e7 pooled values per batch of replicates
        batch=max(1, int(2e7 // allv.size)),
        paired=False,
        vectorized=True,
        axis=-1,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    lo, hi = res.confidence_interval
    return float(lo), float(hi)


@dataclass(frozen=True)
class PremiseRow:
    """Separation of hallucinated vs grounded mentions by one signal at one layer.

    ``auroc`` > 0.5 means larger signal values go with hallucinated mentions;
    ``ci_low``/``ci_high`` is its bootstrap interval (NaN when undefined);
    means are NaN for an empty group.
    """

    signal: str
    layer: int
    n_hallucinated: int
    n_grounded: int
    mean_hallucinated: float
    mean_grounded: float
    auroc: float
    ci_low: float
    ci_high: float


def premise_table(
    signals: Mapping[str, np.ndarray],
    hallucinated: np.ndarray,
    n_resamples: int = 2000,
    seed: int | None = 0,
    confidence: float = 0.95,
) -> list[PremiseRow]:
    """Per-(signal, layer) AUROC of hallucinated vs grounded mentions.

    Args:
        signals: name -> array of shape ``(n_mentions, n_layers)``, oriented so
            that larger = more anomalous.  Different signals may have
            different numbers of layers.
        hallucinated: bool array ``(n_mentions,)``; True = hallucinated
            mention (the positive class).
        n_resamples, seed, confidence: passed to :func:`auroc_interval`.  The
            same seed is used for every (signal, layer), so all layers are
            resampled with the same mention indices (common random numbers),
            which makes their intervals directly comparable.

    Returns:
        Rows ordered by signal (mapping order), then layer ``0..n_layers-1``.
    """
    if not isinstance(signals, Mapping):
        raise TypeError(
            f"signals must be a mapping of name -> array, got {type(signals).__name__}"
        )
    if len(signals) == 0:
        raise ValueError("signals must contain at least one signal")
    hal = np.asarray(hallucinated)
    if hal.dtype != np.bool_:
        raise TypeError(f"hallucinated must have a bool dtype, got {hal.dtype}")
    if hal.ndim != 1:
        raise ValueError(f"hallucinated must be 1-D (n_mentions,), got shape {hal.shape}")
    n_mentions = hal.shape[0]

    arrays: dict[str, np.ndarray] = {}
    for name, sig in signals.items():
        if not isinstance(name, str):
            raise TypeError(f"signal names must be str, got {type(name).__name__}")
        try:
            arr = np.asarray(sig, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"signal {name!r} must be a numeric array ({exc})") from None
        if arr.ndim != 2:
            raise ValueError(
                f"signal {name!r} must be 2-D (n_mentions, n_layers), got shape {arr.shape}"
            )
        if arr.shape[0] != n_mentions:
            raise ValueError(
                f"signal {name!r} has {arr.shape[0]} mentions but hallucinated has "
                f"{n_mentions}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"signal {name!r} contains non-finite values (NaN or inf)")
        arrays[name] = arr

    n_h = int(hal.sum())
    n_g = n_mentions - n_h
    rows: list[PremiseRow] = []
    for name, arr in arrays.items():
        for layer in range(arr.shape[1]):
            col = arr[:, layer]
            pos, neg = col[hal], col[~hal]
            lo, hi = auroc_interval(
                pos, neg, confidence=confidence, n_resamples=n_resamples, seed=seed
            )
            rows.append(
                PremiseRow(
                    signal=name,
                    layer=layer,
                    n_hallucinated=n_h,
                    n_grounded=n_g,
                    mean_hallucinated=float(pos.mean()) if n_h else math.nan,
                    mean_grounded=float(neg.mean()) if n_g else math.nan,
                    auroc=auroc(pos, neg),
                    ci_low=lo,
                    ci_high=hi,
                )
            )
    return rows


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.3f}"


def premise_markdown(rows: Sequence[PremiseRow]) -> str:
    """Markdown table, one line per (signal, layer); numbers to 3 decimals.

    Columns: signal, layer, #hallucinated, #grounded, mean (hallucinated),
    mean (grounded), AUROC, CI as ``[lo, hi]``.  Undefined values print as
    ``nan``.
    """
    header = (
        "| signal | layer | n_hallucinated | n_grounded | mean_hallucinated "
        "| mean_grounded | AUROC | CI |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r.signal} | {r.layer} | {r.n_hallucinated} | {r.n_grounded} "
            f"| {_fmt(r.mean_hallucinated)} | {_fmt(r.mean_grounded)} "
            f"| {_fmt(r.auroc)} | [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] |"
        )
    return "\n".join(lines) + "\n"


def plot_premise(rows: Sequence[PremiseRow], path, title: str | None = None) -> Path:
    """Draw :func:`premise_figure` and save it atomically to ``path``; the format follows the file suffix (PNG if
    none). Returns the path."""
    from .io import save_figure_atomic

    return save_figure_atomic(premise_figure(rows, title), Path(path))


def premise_figure(rows: Sequence[PremiseRow], title: str | None = None):
    """AUROC per layer for each signal, with interval error bars, as a matplotlib ``Figure`` (Agg canvas; no pyplot
    or global backend change).

    A dashed horizontal line marks chance (0.5) and the caption says how to read the values on either side of it.
    Signals are dodged along the layer axis (spread over 0.3 of a layer, centred on it) so their error bars do not
    overlap; an interval reaching past [0, 1] is clipped to it and an undefined one is drawn as no bar. ``title``
    (for example the model, run and split) heads the figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty: nothing to plot")

    by_signal: dict[str, list[PremiseRow]] = {}
    for r in rows:
        by_signal.setdefault(r.signal, []).append(r)

    fig = Figure(figsize=(7.0, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    k = len(by_signal)
    width = 0.3 if k > 1 else 0.0
    for j, (name, rs) in enumerate(by_signal.items()):
        rs = sorted(rs, key=lambda r: r.layer)
        off = (j - (k - 1) / 2) * (width / max(k - 1, 1))
        x = np.array([r.layer for r in rs], dtype=float) + off
        y = np.array([r.auroc for r in rs], dtype=float)
        lo = np.clip(np.array([r.ci_low for r in rs], dtype=float), 0.0, 1.0)
        hi = np.clip(np.array([r.ci_high for r in rs], dtype=float), 0.0, 1.0)
        yerr = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
        yerr = np.nan_to_num(yerr, nan=0.0)
        ax.errorbar(x, y, yerr=yerr, marker="o", markersize=3, capsize=2, label=name)
    ax.axhline(0.5, linestyle="--", color="gray", linewidth=1, label="chance (0.5)")
    layers = sorted({r.layer for r in rows})
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("AUROC (hallucinated vs grounded)")
    ax.set_ylim(-0.02, 1.02)
    n_h, n_g = rows[0].n_hallucinated, rows[0].n_grounded
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}premise check: per-layer AUROC ({n_h} hallucinated, {n_g} grounded words)", fontsize=9)
    ax.legend(loc="best", fontsize="small")
    fig.text(0.01, 0.01, "above 0.5: the signal is larger at hallucinated words (as the premise says); below 0.5: "
             "it is smaller there (it points the other way); bars: 95% bootstrap intervals", fontsize=6.5,
             color="dimgray")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig
