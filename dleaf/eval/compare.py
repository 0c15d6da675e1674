"""Comparing runs: a markdown table of run folders side by side, and paired bootstrap intervals of the
difference between two runs on the same items.

The paired comparison reads each run's per-item scores (``scores.jsonl``, :mod:`dleaf.eval.scores`) and resamples
items jointly (``scipy.stats.bootstrap`` with ``paired=True``, percentile intervals): for caption sections the
differences in CHAIR_s, CHAIR_i, recall, mean length and hallucinated and grounded mentions per item, for yes/no
sections in POPE accuracy and F1.

Definitions, over a section's items: CHAIR_s = share of captions naming at least one absent object; CHAIR_i =
hallucinated mentions / all object mentions; recall = grounded objects named / ground-truth objects; POPE accuracy
= (tp + tn) / n with an unparsed answer counted wrong; F1 = 2 tp / (2 tp + fp + fn), an unparsed answer being
neither a false positive nor a false negative.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from ..io import InputError, read_json, read_jsonl

METRICS = "metrics.json"
SCORES = "scores.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# Per-item arrays and statistics
# ---------------------------------------------------------------------------------------------------------------


def caption_arrays(scores: Sequence[dict]) -> tuple[np.ndarray, ...]:
    """``(hallucinated caption, hallucinated mentions, grounded mentions, hallucinated objects, grounded objects,
    ground-truth objects, words)`` per item, as float arrays."""
    def col(f):
        return np.array([f(r) for r in scores], float)

    return (col(lambda r: bool(r["hallucinated"])), col(lambda r: r["n_hallucinated_mentions"]),
            col(lambda r: r["n_mentions"] - r["n_hallucinated_mentions"]), col(lambda r: len(r["hallucinated"])),
            col(lambda r: len(r["grounded"])), col(lambda r: r["n_truth"]), col(lambda r: r["n_words"]))


def _ratio(a, b, axis=-1):
    a, b = np.sum(a, axis=axis), np.sum(b, axis=axis)
    return np.divide(a, b, out=np.full(np.shape(a), np.nan), where=np.asarray(b) != 0)


CAPTION_STATISTICS: dict[str, Callable] = {
    "chair_s": lambda hc, hm, gm, ho, go, n, w, axis=-1: np.mean(hc, axis=axis),
    "chair_i": lambda hc, hm, gm, ho, go, n, w, axis=-1: _ratio(hm, hm + gm, axis),
    "recall": lambda hc, hm, gm, ho, go, n, w, axis=-1: _ratio(go, n, axis),
    "mean_length": lambda hc, hm, gm, ho, go, n, w, axis=-1: np.mean(w, axis=axis),
    "hallucinated_mentions_per_image": lambda hc, hm, gm, ho, go, n, w, axis=-1: np.mean(hm, axis=axis),
    "grounded_mentions_per_image": lambda hc, hm, gm, ho, go, n, w, axis=-1: np.mean(gm, axis=axis),
}


def pope_arrays(scores: Sequence[dict]) -> tuple[np.ndarray, ...]:
    """``(yes, no, label)`` indicators per item (``yes`` and ``no`` both 0 for an unparsed answer)."""
    yes = np.array([r["answer"] is True for r in scores], float)
    no = np.array([r["answer"] is False for r in scores], float)
    label = np.array([bool(r["label"]) for r in scores], float)
    return yes, no, label


def pope_accuracy(yes, no, label, axis=-1):
    """(tp + tn) / n: an unparsed answer counts as wrong (as in :func:`dleaf.metrics.pope`)."""
    return np.mean(yes * label + no * (1 - label), axis=axis)


def pope_f1(yes, no, label, axis=-1):
    """2 tp / (2 tp + fp + fn); an unparsed answer is neither a false positive nor a false negative."""
    tp = np.sum(yes * label, axis=axis)
    fp = np.sum(yes * (1 - label), axis=axis)
    fn = np.sum(no * label, axis=axis)
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros(np.shape(tp), float), where=den != 0)


POPE_STATISTICS: dict[str, Callable] = {"accuracy": pope_accuracy, "f1": pope_f1}


def caption_stats(scores: Sequence[dict]) -> dict:
    """CHAIR_s, CHAIR_i, recall, mean length and mention and object totals of per-item caption scores."""
    arr = caption_arrays(scores)
    return {k: float(f(*arr)) for k, f in CAPTION_STATISTICS.items()} | {
        "n_images": len(scores), "n_hallucinated_mentions": int(arr[1].sum()),
        "n_grounded_mentions": int(arr[2].sum()), "n_hallucinated_objects": int(arr[3].sum()),
        "n_grounded_objects": int(arr[4].sum())}


def paired_difference(base: tuple, other: tuple, statistic: Callable, n_resamples: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> dict:
    """Difference ``statistic(other) - statistic(base)`` over the same items, with a paired percentile bootstrap
    interval (``scipy.stats.bootstrap``, items resampled jointly in both runs)."""
    k = len(base)

    def diff(*arrays, axis=-1):
        return statistic(*arrays[k:], axis=axis) - statistic(*arrays[:k], axis=axis)

    point = float(diff(*base, *other))
    with warnings.catch_warnings():  # a difference equal in every resample has the interval [d, d]: no warning
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(tuple(base) + tuple(other), diff, paired=True, vectorized=True,
                              n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                              random_state=seed)
    lo, hi = res.confidence_interval
    return {"diff": point, "low": float(lo), "high": float(hi)}


def paired_differences(base: Sequence[dict], other: Sequence[dict], n_resamples: int = 2000, seed: int = 0
                       ) -> dict[str, dict[str, dict]]:
    """Per section, the paired differences (other - base) of every statistic, with intervals. Both runs must hold
    the same items (ids) in the same sections."""
    base_by, other_by = {r["id"]: r for r in base}, {r["id"]: r for r in other}
    if set(base_by) != set(other_by):
        only = sorted(set(base_by) ^ set(other_by))
        raise InputError(f"the two runs do not score the same items ({len(only)} differ, first {only[0]!r}); "
                         "compare runs of the same benchmark, sections and limit")
    out: dict[str, dict[str, dict]] = {}
    sections = list(dict.fromkeys(r["section"] for r in base))
    for section in sections:
        ids = [r["id"] for r in base if r["section"] == section]
        b, o = [base_by[i] for i in ids], [other_by[i] for i in ids]
        if b[0]["kind"] == "caption":
            ab, ao, table = caption_arrays(b), caption_arrays(o), CAPTION_STATISTICS
        else:
            ab, ao, table = pope_arrays(b), pope_arrays(o), {f"pope_{k}": f for k, f in POPE_STATISTICS.items()}
        out[section] = {name: paired_difference(ab, ao, f, n_resamples, seed) for name, f in table.items()}
    return out


def read_scores(run_dir: str | os.PathLike) -> list[dict]:
    """The per-item scores of a finished run folder."""
    path = Path(run_dir) / SCORES
    if not path.is_file():
        raise InputError(f"{run_dir} has no {SCORES}: is it a finished run of the evaluation harness?")
    return [r for _, r in read_jsonl(path, "scores file")[0]]


def compare_runs(base_dir: str | os.PathLike, other_dir: str | os.PathLike, n_resamples: int = 2000, seed: int = 0
                 ) -> dict[str, dict[str, dict]]:
    """:func:`paired_differences` of two finished run folders (``other - base``)."""
    return paired_differences(read_scores(base_dir), read_scores(other_dir), n_resamples, seed)


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


def pct(x) -> str:
    return "nan" if x is None or x != x else f"{100 * x:.1f}"


def method_label(run: dict) -> str:
    """A run's method, knobs, adapter and decoding as one label."""
    label = run.get("method", "?")
    if run.get("knobs"):
        label += " (" + ", ".join(f"{k}={v}" for k, v in sorted(run["knobs"].items())) + ")"
    if run.get("adapter"):
        label += " + adapter"
    dec = run.get("decoding", {})
    if dec.get("strategy") not in (None, "greedy"):
        label += f", {dec['strategy']}"
    return label


def _interval(d: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if d is None:
        return ""
    if d["diff"] != d["diff"]:  # undefined in a run (no mentions, no ground truth): no difference to show
        return " (n/a)"
    return f" ({scale * d['diff']:+.{digits}f} [{scale * d['low']:+.{digits}f}, {scale * d['high']:+.{digits}f}])"


def comparison_table(run_dirs: Sequence[str | os.PathLike], paired: bool = False, n_resamples: int = 2000) -> str:
    """Markdown tables comparing run folders: one CHAIR table for caption sections and one POPE table for yes/no
    sections, a row per run and section. Runs on different protocols (name, version, overrides) are flagged. With
    ``paired``, every run after the first also shows its difference from the first run on the same items, with a
    95% paired bootstrap interval, in percentage points."""
    runs = []
    for d in run_dirs:
        path = Path(d) / METRICS
        res = read_json(path, "metrics file")
        if not isinstance(res, dict) or "sections" not in res or "run" not in res:
            raise InputError(f"metrics file {path} is not one written by the evaluation harness")
        runs.append((Path(d).name, res))
    diffs: dict[int, dict] = {}
    if paired and len(run_dirs) > 1:
        base = read_scores(run_dirs[0])
        for k, d in enumerate(run_dirs[1:], start=1):
            diffs[k] = paired_differences(base, read_scores(d), n_resamples)
    protocols: dict[str, set[str]] = {}
    for _, r in runs:
        protocols.setdefault(r["benchmark"], set()).add(json.dumps(r["protocol"], sort_keys=True))
    chair_rows, pope_rows = [], []
    for k, (name, res) in enumerate(runs):
        proto = res["protocol"]
        ptxt = f"{proto['name']} v{proto['version']}" + (" *" if proto.get("overrides") else "")
        for section, m in res["sections"].items():
            rule = m.get("chair_rules") or m.get("answer_rule")
            rtxt = f" ({rule})" if rule and (m.get("chair_rules") or rule != "dleaf") else ""
            lead = f"| {name} | {method_label(res['run'])} | {section} | {ptxt}{rtxt} |"
            d = diffs.get(k, {}).get(section, {})
            if m["kind"] == "caption":
                chair_rows.append(
                    f"{lead} {m['n_captions']} | {pct(m['chair_s'])}{_interval(d.get('chair_s'))} | "
                    f"{pct(m['chair_i'])}{_interval(d.get('chair_i'))} | {pct(m['recall'])}"
                    f"{_interval(d.get('recall'))} | {m['mean_length']:.1f} | {m['n_hallucinated_mentions']} | "
                    f"{m['n_grounded_mentions']} |")
            else:
                pope_rows.append(
                    f"{lead} {m['n']} | {pct(m['accuracy'])}{_interval(d.get('pope_accuracy'))} | "
                    f"{pct(m['precision'])} | {pct(m['recall'])} | {pct(m['f1'])}{_interval(d.get('pope_f1'))} | "
                    f"{pct(m['yes_ratio'])} | {m['n_unparsed']} |")
    lines = []
    if chair_rows:
        lines += ["| run | method | section | protocol | n | CHAIR_s % | CHAIR_i % | recall % | words | "
                  "hallucinated mentions | grounded mentions |", "|---|---|---|---|---|---|---|---|---|---|---|",
                  *chair_rows, ""]
    if pope_rows:
        lines += ["| run | method | section | protocol | n | accuracy % | precision % | recall % | F1 % | yes % | "
                  "unparsed |", "|---|---|---|---|---|---|---|---|---|---|---|", *pope_rows, ""]
    if diffs:
        lines.append(f"In parentheses: difference from {runs[0][0]} on the same items, in percentage points "
                     "[95% paired bootstrap interval]; n/a: the statistic is undefined in a run (for example CHAIR_i "
                     "of a run that names no object).")
    if any(r["protocol"].get("overrides") for _, r in runs):
        lines.append("\\* run with protocol overrides (token limit or item limit): not comparable to full runs.")
    mixed = sorted(b for b, ps in protocols.items() if len(ps) > 1)
    if mixed:
        lines.append(f"Warning: runs of {', '.join(mixed)} used different protocols (name, version, file hash or "
                     "overrides).")
    return "\n".join(lines).rstrip() + "\n"
