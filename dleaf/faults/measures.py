"""The fault benchmark's statistics, from per-item scores and per-reply cell records
(:mod:`dleaf.faults.record`):

* **damage**: the faulted model against the unfaulted one on the same images (greedy decoding): CHAIR_s, CHAIR_i,
  recall, hallucinated and grounded mentions (:func:`dleaf.eval.compare.paired_differences`, images resampled
  jointly), additions and substitutions per image likewise;
* **localization**: for a method that flags layers, the precision and recall of its flagged cells against the
  faulted (position, layer) cells and the per-cell AUROC (:func:`dleaf.premise.auroc`) of its signal's margin over
  its causal threshold (what a flag thresholds at zero), faulted against unfaulted cells; for a method that changes
  attention rows, the share of its change (the L1 change to the rows it is handed) that lands on faulted cells,
  beside the faulted share of the cells it acts on (what a uniform spread gets);
* **repair**: per image, the grounded objects the unfaulted model names and the faulted one does not (lost), and the
  hallucinated objects the faulted model names and the unfaulted one does not (added); the fraction of lost objects
  a method names again (restored) and of added ones it no longer names (removed).

Ratios of sums over images get percentile bootstrap intervals, images resampled (``scipy.stats.bootstrap``); a
difference of two methods' ratios on the same images is paired (:func:`dleaf.eval.compare.paired_difference`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from .. import premise
from ..eval import compare, runner
from ..io import InputError, read_json, read_jsonl
from ..settings import Setting
from .config import FaultConfig, faulted_cells


def measured_flag_rate(run_dir: str | Path) -> float:
    """A flagging run's flag rate: flagged cells over (rows x watched layers) of every reply."""
    rows = [r for _, r in read_jsonl(Path(run_dir) / runner.GENERATIONS, "generations file")[0]]
    config = read_json(Path(run_dir) / runner.CONFIG, "run config")
    watched = watched_layers(config, num_layers_of(rows))
    flagged = sum(bin(m & _mask(watched)).count("1") for r in rows for m in r["cells"]["flags"])
    cells = sum(r["cells"]["rows"] for r in rows) * len(watched)
    return flagged / cells if cells else 0.0


def _mask(layers) -> int:
    return sum(1 << j for j in layers)


def num_layers_of(rows: Sequence[dict]) -> int:
    for r in rows:
        c = r["cells"]
        for key in ("mass_sum", "signal_sum"):
            if key in c:
                return len(c[key])
        if "change" in c:
            return len(c["change"]["clean"])
    raise InputError("the run's rows record no per-layer cells")


def watched_layers(config: dict, num_layers: int) -> list[int]:
    """The layers a run's method acts on (its ``[layer_start, layer_end)``; none for greedy)."""
    setting = Setting.from_record(config)
    cfg = setting.config()
    if cfg is None or not hasattr(cfg, "layer_start"):
        return []
    end = cfg.layer_end if cfg.layer_end is not None else num_layers
    return list(range(cfg.layer_start, min(end, num_layers)))



def ratio_interval(num, den, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """``sum(num) / sum(den)`` over items, with a percentile bootstrap interval (items resampled, ``num`` and
    ``den`` together: ``scipy.stats.bootstrap`` with ``paired=True``); NaN where the denominator is 0."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    point = float(num.sum() / den.sum()) if den.sum() > 0 else math.nan
    out = {"value": point, "low": math.nan, "high": math.nan, "num": float(num.sum()), "den": float(den.sum())}
    if not math.isfinite(point) or len(num) < 2:
        return out

    def stat(n, d, axis=-1):
        dd = d.sum(axis)
        return np.divide(n.sum(axis), dd, out=np.full(np.shape(dd), np.nan), where=dd > 0)

    res = stats.bootstrap((num, den), stat, paired=True, vectorized=True, n_resamples=n_resamples,
                          confidence_level=confidence, method="percentile", random_state=seed)
    lo, hi = res.confidence_interval
    out["low"], out["high"] = float(lo), float(hi)
    return out


def _ratio(n, d, axis=-1):
    dd = np.sum(d, axis=axis)
    return np.divide(np.sum(n, axis=axis), dd, out=np.full(np.shape(dd), np.nan), where=dd > 0)


def ratio_difference(num_a, den_a, num_b, den_b, n_resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """``sum(num_a)/sum(den_a) - sum(num_b)/sum(den_b)`` over the same items, with the harness's paired percentile
    bootstrap interval (:func:`dleaf.eval.compare.paired_difference`: items resampled jointly in both); NaN where a
    denominator is 0."""
    a = tuple(np.asarray(x, float) for x in (num_a, den_a))
    b = tuple(np.asarray(x, float) for x in (num_b, den_b))
    point = float(_ratio(*a) - _ratio(*b))
    if not math.isfinite(point) or len(a[0]) < 2:
        return {"diff": point, "low": math.nan, "high": math.nan}
    with np.errstate(invalid="ignore"):
        return compare.paired_difference(b, a, _ratio, n_resamples, seed, confidence)


def error_kinds(score: dict) -> tuple[int, int]:
    """``(additions, substitutions)`` of one caption's per-item score, as :func:`dleaf.metrics.chair` counts them:
    ``sub = min(|hallucinated|, |missed|)``, ``add = |hallucinated| - sub``, ``missed = n_truth - |grounded|``."""
    hall = len(score["hallucinated"])
    missed = score["n_truth"] - len(score["grounded"])
    sub = min(hall, missed)
    return hall - sub, sub


def damage(base: Sequence[dict], faulted: Sequence[dict], n_resamples: int = 2000, seed: int = 0) -> dict:
    """The faulted model against the unfaulted one on the same items (one caption section): every statistic of
    :func:`dleaf.eval.paired_differences` (faulted - unfaulted, with its paired interval), additions and
    substitutions per image likewise, and the totals of both runs."""
    diffs = compare.paired_differences(base, faulted, n_resamples, seed)
    (section,) = diffs.values()
    by_id = {r["id"]: r for r in faulted}
    b_kinds = np.array([error_kinds(r) for r in base], float)
    f_kinds = np.array([error_kinds(by_id[r["id"]]) for r in base], float)
    mean = lambda x, axis=-1: np.mean(x, axis=axis)  # noqa: E731
    out = dict(section)
    out["additions_per_image"] = compare.paired_difference((b_kinds[:, 0],), (f_kinds[:, 0],), mean, n_resamples,
                                                           seed)
    out["substitutions_per_image"] = compare.paired_difference((b_kinds[:, 1],), (f_kinds[:, 1],), mean,
                                                               n_resamples, seed)
    out["totals"] = {"unfaulted": totals(base), "faulted": totals(faulted)}
    return out


def totals(scores: Sequence[dict]) -> dict:
    """A run's caption totals: CHAIR_s, CHAIR_i, recall, mention and object counts, additions and substitutions."""
    st = compare.caption_stats(scores)
    kinds = np.array([error_kinds(r) for r in scores], int).reshape(-1, 2)
    return {**{k: st[k] for k in ("chair_s", "chair_i", "recall", "n_images", "n_hallucinated_mentions",
                                  "n_grounded_mentions", "n_hallucinated_objects", "n_grounded_objects")},
            "n_additions": int(kinds[:, 0].sum()), "n_substitutions": int(kinds[:, 1].sum())}


def repair_counts(base: Sequence[dict], faulted: Sequence[dict], repaired: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per image (in ``base``'s order), from the per-item scores of the unfaulted model, the faulted model and a
    method on the faulted model: ``lost`` = |grounded(unfaulted) - grounded(faulted)|, ``restored`` = |lost objects
    the method names|, ``added`` = |hallucinated(faulted) - hallucinated(unfaulted)|, ``removed`` = |added objects
    the method does not name|; also ``new_lost`` (grounded objects of the faulted model the method drops) and
    ``new_hallucinated`` (hallucinations of the method the faulted model did not make)."""
    f_by, r_by = {r["id"]: r for r in faulted}, {r["id"]: r for r in repaired}
    out = {k: [] for k in ("lost", "restored", "added", "removed", "new_lost", "new_hallucinated")}
    for b in base:
        f, m = f_by[b["id"]], r_by[b["id"]]
        g0, gf, gm = set(b["grounded"]), set(f["grounded"]), set(m["grounded"])
        h0, hf, hm = set(b["hallucinated"]), set(f["hallucinated"]), set(m["hallucinated"])
        lost, added = g0 - gf, hf - h0
        out["lost"].append(len(lost))
        out["restored"].append(len(lost & gm))
        out["added"].append(len(added))
        out["removed"].append(len(added - hm))
        out["new_lost"].append(len(gf - gm))
        out["new_hallucinated"].append(len(hm - hf))
    return {k: np.array(v, float) for k, v in out.items()}


def repair(base, faulted, repaired, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Fractions of lost grounded objects restored and of added hallucinated objects removed
    (:func:`repair_counts`), with bootstrap intervals over images, and the counts."""
    c = repair_counts(base, faulted, repaired)
    return {"restored": ratio_interval(c["restored"], c["lost"], n_resamples, seed),
            "removed": ratio_interval(c["removed"], c["added"], n_resamples, seed),
            **{f"n_{k}": int(v.sum()) for k, v in c.items()}}


def localization_arrays(rows: Sequence[dict], fault: FaultConfig | None, layers: Sequence[int],
                        num_layers: int) -> dict[str, np.ndarray]:
    """Per reply (in ``rows``' order), over the cells of ``layers`` (the method's watched layers): ``cells``,
    ``faulted``, ``flagged``, ``hits`` (flagged and faulted); per layer (L,) totals ``layer_cells``,
    ``layer_flagged``, and the same at the faulted positions only (``layer_cells_at_faulted``,
    ``layer_flagged_at_faulted``: rows the fault touches in its layers, in every layer); and the flat per-cell ``margin`` values at faulted and at unfaulted cells (where a threshold
    exists)."""
    keep = np.zeros(num_layers, bool)
    keep[list(layers)] = True
    out = {k: [] for k in ("cells", "faulted", "flagged", "hits")}
    layer_cells, layer_flagged = np.zeros(num_layers), np.zeros(num_layers)
    layer_cells_f, layer_flagged_f = np.zeros(num_layers), np.zeros(num_layers)
    margins = []
    for r in rows:
        c = r["cells"]
        n = c["rows"]
        fc = faulted_cells(fault, n, num_layers) if fault is not None else np.zeros((n, num_layers), bool)
        flags = np.array([[(m >> j) & 1 for j in range(num_layers)] for m in c.get("flags", [0] * n)],
                         bool).reshape(n, num_layers)
        fc, flags = fc & keep, flags & keep
        out["cells"].append(n * keep.sum())
        out["faulted"].append(fc.sum())
        out["flagged"].append(flags.sum())
        out["hits"].append((fc & flags).sum())
        layer_cells += n * keep
        layer_flagged += flags.sum(0)
        at = fault.position_faulted(np.arange(n)) if fault is not None else np.zeros(n, bool)
        layer_cells_f += at.sum() * keep
        layer_flagged_f += flags[at].sum(0)
        if "margin" in c:
            margin = np.array([[np.nan if v is None else v for v in row] for row in c["margin"]],
                              float).reshape(n, num_layers)
            ok = np.isfinite(margin) & keep
            margins.append((margin[ok], fc[ok], np.nonzero(ok)[1]))
    res = {k: np.array(v, float) for k, v in out.items()}
    res["layer_cells"], res["layer_flagged"] = layer_cells, layer_flagged
    res["layer_cells_at_faulted"], res["layer_flagged_at_faulted"] = layer_cells_f, layer_flagged_f
    res["margins"] = margins
    res["margin_faulted"] = np.concatenate([m[f] for m, f, _ in margins]) if margins else np.zeros(0)
    res["margin_clean"] = np.concatenate([m[~f] for m, f, _ in margins]) if margins else np.zeros(0)
    return res


def stratified_auroc(score, label, stratum=None) -> float:
    """The AUROC of ``score`` for ``label`` (faulted) against the rest, comparing only pairs in the same
    ``stratum`` (a layer): ``sum_l U_l / sum_l P_l N_l`` with ``U_l`` the Mann-Whitney count of layer ``l``'s pairs
    (ties one half), ``P_l`` and ``N_l`` its faulted and unfaulted cells; without strata, the plain AUROC. NaN where
    no stratum holds both kinds."""
    score, label = np.asarray(score, float), np.asarray(label, bool)
    stratum = np.zeros(score.shape, int) if stratum is None else np.asarray(stratum)
    u = pairs = 0.0
    for s in np.unique(stratum):
        at = stratum == s
        pos, neg = score[at & label], score[at & ~label]
        if pos.size and neg.size:
            u += float(premise.auc_from_ranks(pos, neg)) * pos.size * neg.size
            pairs += pos.size * neg.size
    return u / pairs if pairs else math.nan


def auroc_by_reply(margins: Sequence[tuple], within_layer: bool, n_resamples: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> dict | None:
    """:func:`stratified_auroc` of per-reply ``(score, faulted, layer)`` cell arrays (pooled over layers, or within
    layers), with a percentile bootstrap interval that resamples replies (the cells of one reply share its running
    threshold, so they are not independent). None where no pair can be compared."""
    if not margins:
        return None
    score, label, layer = (np.concatenate([m[k] for m in margins]) for k in range(3))
    strata = layer if within_layer else None
    value = stratified_auroc(score, label, strata)
    if not math.isfinite(value):
        return None
    out = {"value": value, "low": math.nan, "high": math.nan, "n_faulted": int(label.sum()),
           "n_clean": int((~label).sum()), "n_replies": len(margins)}
    if len(margins) < 2:
        return out
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_resamples):
        pick = [margins[i] for i in rng.integers(0, len(margins), len(margins))]
        s, y, g = (np.concatenate([m[k] for m in pick]) for k in range(3))
        reps.append(stratified_auroc(s, y, g if within_layer else None))
    reps = np.array(reps)
    reps = reps[np.isfinite(reps)]
    if reps.size:
        alpha = (1 - confidence) / 2
        out["low"], out["high"] = (float(q) for q in np.quantile(reps, [alpha, 1 - alpha]))
    return out


def _rate(num: np.ndarray, den: np.ndarray) -> list:
    return (num / np.where(den > 0, den, np.nan)).tolist()


def change_arrays(rows: Sequence[dict], num_layers: int) -> dict[str, np.ndarray]:
    """Per reply, the method's change to the attention rows on faulted cells and in all; per layer (L,) totals."""
    faulted, total, layer = [], [], np.zeros(num_layers)
    for r in rows:
        ch = r["cells"]["change"]
        f = np.array([v or 0.0 for v in ch["faulted"]], float)
        c = np.array([v or 0.0 for v in ch["clean"]], float)
        faulted.append(f.sum())
        total.append(f.sum() + c.sum())
        layer += f + c
    return {"faulted": np.array(faulted), "total": np.array(total), "layer": layer}


def localization(rows: Sequence[dict], config: dict, fault: FaultConfig | None, num_layers: int,
                 flags: bool, n_resamples: int = 2000, seed: int = 0) -> dict:
    """One run's localization (see the module docstring): for a flagging method precision, recall, flag rate,
    the chance precision (faulted share of its cells), the per-layer flag rate and the AUROC of the signal's margin
    over its threshold, faulted against unfaulted cells, pooled over the watched layers (``auroc``: what the flags
    see) and within each layer (``auroc_within_layer``: faulted against unfaulted positions of the same layer, free
    of differences between layers), each with an interval over replies; for a method with a row-change record, the
    share of its change on faulted cells beside the faulted share of the cells it acts on, and its per-layer share
    of change."""
    layers = watched_layers(config, num_layers)
    a = localization_arrays(rows, fault, layers, num_layers)
    out: dict[str, Any] = {"layers": layers, "cells": int(a["cells"].sum()), "faulted_cells": int(a["faulted"].sum())}
    out["faulted_share"] = ratio_interval(a["faulted"], a["cells"], n_resamples, seed)
    if flags:
        out["flag_rate"] = ratio_interval(a["flagged"], a["cells"], n_resamples, seed)
        out["precision"] = ratio_interval(a["hits"], a["flagged"], n_resamples, seed)
        out["recall"] = ratio_interval(a["hits"], a["faulted"], n_resamples, seed)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["layer_flag_rate"] = _rate(a["layer_flagged"], a["layer_cells"])
            out["layer_flag_rate_faulted_positions"] = _rate(a["layer_flagged_at_faulted"],
                                                             a["layer_cells_at_faulted"])
            out["layer_flag_rate_other_positions"] = _rate(a["layer_flagged"] - a["layer_flagged_at_faulted"],
                                                           a["layer_cells"] - a["layer_cells_at_faulted"])
        n_auc = min(n_resamples, 500)
        out["auroc"] = auroc_by_reply(a["margins"], within_layer=False, n_resamples=n_auc, seed=seed)
        out["auroc_within_layer"] = auroc_by_reply(a["margins"], within_layer=True, n_resamples=n_auc, seed=seed)
    if rows and "change" in rows[0]["cells"]:
        ch = change_arrays(rows, num_layers)
        out["change_share"] = ratio_interval(ch["faulted"], ch["total"], n_resamples, seed)
        total = ch["layer"].sum()
        out["layer_change_share"] = (ch["layer"] / total).tolist() if total > 0 else [math.nan] * num_layers
        out["_change"] = ch
    out["_arrays"] = a
    return out


def signal_profile(rows: Sequence[dict], fault: FaultConfig | None, num_layers: int) -> dict:
    """Per layer, from a D-LEAF run's cells: the signal's mean and within-reply standard deviation over unfaulted
    rows, its mean over faulted rows, and the head-mean image mass over all rows."""
    n_clean, s, sq, n_f, sf, mass, n_all = (np.zeros(num_layers) for _ in range(7))
    within = []
    for r in rows:
        c = r["cells"]
        n = c["rows"]
        fc = faulted_cells(fault, n, num_layers) if fault is not None else np.zeros((n, num_layers), bool)
        k = (~fc).sum(0)
        rs = np.array([v or 0.0 for v in c["signal_sum"]])
        rq = np.array([v or 0.0 for v in c["signal_sq"]])
        n_clean += k
        s += rs
        sq += rq
        n_f += fc.sum(0)
        sf += np.array([v or 0.0 for v in c["signal_faulted_sum"]])
        mass += np.array([v or 0.0 for v in c["mass_sum"]])
        n_all += n
        with np.errstate(invalid="ignore", divide="ignore"):
            m = rs / k
            within.append(np.sqrt(np.clip(rq / k - m * m, 0, None)))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / n_clean
        return {"clean_mean": mean.tolist(), "clean_std": np.sqrt(np.clip(sq / n_clean - mean ** 2, 0, None)).tolist(),
                "within_reply_std": np.nanmean(np.array(within), 0).tolist() if within else [],
                "faulted_mean": (sf / np.where(n_f > 0, n_f, np.nan)).tolist(),
                "image_mass": (mass / n_all).tolist()}


