"""Methods compared on the organism: captions and yes/no answers of one decoding setting (greedy, D-LEAF, a
baseline, an ablation), scored per image against the world's exact ground truth, with paired bootstrap intervals
of every difference from plain greedy decoding on the same images.

Each setting's rows are appended to a JSONL file as soon as they are computed, so that a long grid resumes where it
stopped (:func:`run_grid`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from .. import engine, metrics
from ..config import METHODS, method_config
from . import world
from .profile import VOCAB, generate


@dataclasses.dataclass(frozen=True)
class Setting:
    """One decoding setting: a label, a method name (``"greedy"`` for none) and its knobs."""

    label: str
    method: str = "greedy"
    knobs: tuple = ()

    def __post_init__(self):
        if self.method != "greedy":
            method_config(self.method, **dict(self.knobs))

    @property
    def knob_dict(self) -> dict:
        return dict(self.knobs)


def setting(label: str, method: str = "greedy", **knobs) -> Setting:
    return Setting(label, method, tuple(sorted(knobs.items())))


def caption_rows(model, processor, scenes: Sequence[world.Scene], s: Setting, max_new_tokens: int = 80,
                 batch_size: int = 100, prompt: str = world.CAPTION_PROMPTS[0]) -> tuple[list[dict], float | None]:
    """Per-image caption measures under setting ``s``, and D-LEAF's flag rate (None for other methods)."""
    trace = s.method != "greedy" and METHODS[s.method][0].__name__ == "DLeafConfig"
    flagged = total = 0
    captions = []
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i:i + batch_size]
        with engine.attached(model, None if s.method == "greedy" else s.method, trace=trace, **s.knob_dict) as iv:
            caps, _ = generate(model, processor, chunk, [prompt] * len(chunk), max_new_tokens, batch_size)
        captions += caps
        if trace:
            rate = iv.flag_rate()
            n = sum(int(step["active"].sum()) * len(step["layers"]) for step in iv.trace.steps)
            flagged += rate * n
            total += n
    res = metrics.chair(captions, [sc.objects for sc in scenes], VOCAB)
    rows = []
    for sc, cap, pc in zip(scenes, captions, res.per_caption):
        rows.append({"objects": list(sc.objects), "caption": cap, "n_words": pc.n_words,
                     "n_mentions": pc.n_mentions, "n_hallucinated_mentions": pc.n_hallucinated_mentions,
                     "hallucinated": sorted(pc.hallucinated), "grounded": sorted(pc.mentioned - pc.hallucinated)})
    return rows, (flagged / total if total else None)


def pope_rows(model, processor, scenes: Sequence[world.Scene], s: Setting, negatives: str = "adversarial",
              batch_size: int = 100) -> list[dict]:
    questions = world.pope_questions(scenes, negatives)
    with engine.attached(model, None if s.method == "greedy" else s.method, **s.knob_dict):
        answers, _ = generate(model, processor, [q.scene for q in questions],
                              [world.QUESTION_TEMPLATE.format(obj=q.obj) for q in questions], 8, batch_size)
    return [{"obj": q.obj, "label": bool(q.label), "answer": a} for q, a in zip(questions, answers)]


# ----------------------------------------------------------------------------- statistics

def caption_stats(rows: Sequence[dict]) -> dict:
    """CHAIR_s, CHAIR_i, recall, mean length and mention counts from per-image rows (same formulas as
    :func:`dleaf.metrics.chair`)."""
    arr = _caption_arrays(rows)
    return {k: float(f(*arr)) for k, f in CAPTION_STATISTICS.items()} | {
        "n_images": len(rows),
        "n_hallucinated_mentions": int(arr[1].sum()), "n_grounded_mentions": int(arr[2].sum()),
        "n_hallucinated_objects": int(arr[3].sum()), "n_grounded_objects": int(arr[4].sum()),
    }


def _caption_arrays(rows):
    hall_caption = np.array([bool(r["hallucinated"]) for r in rows], float)
    hall_mentions = np.array([r["n_hallucinated_mentions"] for r in rows], float)
    grounded_mentions = np.array([r["n_mentions"] - r["n_hallucinated_mentions"] for r in rows], float)
    hall_objects = np.array([len(r["hallucinated"]) for r in rows], float)
    grounded_objects = np.array([len(r["grounded"]) for r in rows], float)
    n_gt = np.array([len(r["objects"]) for r in rows], float)
    words = np.array([r["n_words"] for r in rows], float)
    return hall_caption, hall_mentions, grounded_mentions, hall_objects, grounded_objects, n_gt, words


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


def pope_stats(rows: Sequence[dict]) -> dict:
    res = metrics.pope([r["answer"] for r in rows], [r["label"] for r in rows])
    return res.as_dict()


def _pope_arrays(rows):
    """``yes`` and ``no`` indicators per answer (both 0 for an unparsed answer) and the labels."""
    parsed = [metrics.parse_yes_no(r["answer"]) for r in rows]
    yes = np.array([p is True for p in parsed], float)
    no = np.array([p is False for p in parsed], float)
    label = np.array([r["label"] for r in rows], float)
    return yes, no, label


def _pope_accuracy(yes, no, label, axis=-1):
    """(tp + tn) / n: an unparsed answer counts as wrong (as in :func:`dleaf.metrics.pope`)."""
    return np.mean(yes * label + no * (1 - label), axis=axis)


def _pope_f1(yes, no, label, axis=-1):
    """2 tp / (2 tp + fp + fn); an unparsed answer is neither a false positive nor a false negative."""
    tp = np.sum(yes * label, axis=axis)
    fp = np.sum(yes * (1 - label), axis=axis)
    fn = np.sum(no * label, axis=axis)
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros(np.shape(tp), float), where=den != 0)


POPE_STATISTICS = {"accuracy": _pope_accuracy, "f1": _pope_f1}


def paired_difference(base: tuple, other: tuple, statistic: Callable, n_resamples: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> dict:
    """Difference ``statistic(other) - statistic(base)`` over the same items, with a paired percentile bootstrap
    interval (``scipy.stats.bootstrap``, resampling items jointly)."""
    k = len(base)

    def diff(*arrays, axis=-1):
        return statistic(*arrays[k:], axis=axis) - statistic(*arrays[:k], axis=axis)

    point = float(diff(*base, *other))
    res = stats.bootstrap(tuple(base) + tuple(other), diff, paired=True, vectorized=True, n_resamples=n_resamples,
                          confidence_level=confidence, method="percentile", random_state=seed)
    lo, hi = res.confidence_interval
    return {"diff": point, "low": float(lo), "high": float(hi)}


def compare_to_base(base_rows: dict, rows: dict, n_resamples: int = 2000) -> dict:
    """Paired differences from the base setting for each caption and POPE statistic."""
    out = {}
    if "captions" in rows and "captions" in base_rows:
        b, o = _caption_arrays(base_rows["captions"]), _caption_arrays(rows["captions"])
        for name, f in CAPTION_STATISTICS.items():
            out[name] = paired_difference(b, o, f, n_resamples)
    if "pope" in rows and "pope" in base_rows:
        b, o = _pope_arrays(base_rows["pope"]), _pope_arrays(rows["pope"])
        for name, f in POPE_STATISTICS.items():
            out[f"pope_{name}"] = paired_difference(b, o, f, n_resamples)
    return out


# ----------------------------------------------------------------------------- grid with resume

def _read_done(path: Path) -> dict[str, dict]:
    done = {}
    if not path.exists():
        return done
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # a line cut by an interrupted write: dropped, recomputed
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: malformed JSON line ({err}); delete the line to recompute it") from None
            done[rec["key"]] = rec
    return done


def run_grid(model, processor, settings: Sequence[Setting], split: str, n_images: int, out_path: str | os.PathLike,
             pope: bool = True, world_seed: int = 0, batch_size: int = 100, say=print) -> dict[str, dict]:
    """Evaluate every setting on ``n_images`` of ``split``; results are appended to ``out_path`` (JSONL, one line
    per setting and split) and settings already there are skipped. Returns {label: record}."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_done(out_path)
    # rewrite the file without a possibly cut last line before appending
    with open(out_path, "w") as f:
        for rec in done.values():
            f.write(json.dumps(rec) + "\n")
    scenes = world.scenes(split, n_images, world_seed)
    results = {}
    for s in settings:
        key = f"{split}/{n_images}/{s.label}"
        if key in done:
            results[s.label] = done[key]
            continue
        say(f"[{split}] {s.label}")
        caps, rate = caption_rows(model, processor, scenes, s, batch_size=batch_size)
        rec = {"key": key, "label": s.label, "method": s.method, "knobs": s.knob_dict, "split": split,
               "n_images": n_images, "flag_rate": rate, "captions": caps}
        if pope:
            rec["pope"] = pope_rows(model, processor, scenes, s, batch_size=batch_size)
        with open(out_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        results[s.label] = rec
    return results


def _rate(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_table(results: dict[str, dict], base: str = "greedy", n_resamples: int = 2000) -> tuple[list[dict], str]:
    """Rows (one per setting) with the statistics and the paired differences from ``base``, and a markdown table."""
    table = []
    for label, rec in results.items():
        row = {"label": label, "method": rec["method"], "knobs": rec["knobs"], "flag_rate": rec.get("flag_rate"),
               **caption_stats(rec["captions"])}
        if "pope" in rec:
            p = pope_stats(rec["pope"])
            row.update({"pope_accuracy": p["accuracy"], "pope_f1": p["f1"], "pope_yes_ratio": p["yes_ratio"]})
        if label != base and base in results:
            row["vs_base"] = compare_to_base(results[base], rec, n_resamples)
        table.append(row)

    def cell(row, key, pct=True):
        v = row.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        text = f"{100 * v:.1f}" if pct else f"{v:.2f}"
        d = row.get("vs_base", {}).get(key)
        if d is not None:
            f = 100 if pct else 1
            text += f" ({f * d['diff']:+.1f} [{f * d['low']:+.1f}, {f * d['high']:+.1f}])" if pct else \
                f" ({d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}])"
        return text

    base_row = next((r for r in table if r["label"] == base), None)

    def count(row, key):
        text = str(row[key])
        if base_row is not None and row is not base_row:
            text += f" ({row[key] - base_row[key]:+d})"
        return text

    lines = ["| setting | CHAIR_s % | CHAIR_i % | recall % | hall. mentions | grounded mentions | words | "
             "POPE acc % | POPE F1 % | flag rate |", "|" + "---|" * 10]
    for row in table:
        lines.append(
            f"| {row['label']} | {cell(row, 'chair_s')} | {cell(row, 'chair_i')} | {cell(row, 'recall')} | "
            f"{count(row, 'n_hallucinated_mentions')} | {count(row, 'n_grounded_mentions')} | "
            f"{cell(row, 'mean_length', False)} | "
            f"{cell(row, 'pope_accuracy')} | {cell(row, 'pope_f1')} | "
            f"{_rate(row['flag_rate'])} |")
    return table, "\n".join(lines) + "\n"
