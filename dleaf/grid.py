"""Methods compared on the organism: greedy decoding, D-LEAF (its variants, a gamma sweep, the ablations), PAI and
SPIN, each run through the evaluation harness (the organism's benchmarks and protocols, the one generation loop
with its EOS trimming and trailing-sentence rule, the metric core), with paired bootstrap intervals of every
difference from greedy decoding on the same images (:mod:`dleaf.eval.compare`).

Each setting is one harness run per benchmark under ``<out>/<split>/<setting>/``: ``captions`` (the split's first
``n_images`` scenes) and ``pope`` (two yes/no questions per scene, adversarial negatives). The harness resumes a run
that was interrupted and skips one that is finished, so a long grid resumes where it stopped.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from . import eval as harness
from .io import read_jsonl
from .settings import Setting


def setting(label: str, method: str = "greedy", **knobs) -> Setting:
    """``setting("dleaf gamma=1", "dleaf", gamma=1.0)``: a :class:`~dleaf.settings.Setting` with a label."""
    return Setting(method, knobs, label=label)


def grid(random_rate: float | None = None, learned: bool = True, detector: str = "organism") -> list[Setting]:
    """The grid: greedy, PAI, SPIN, D-LEAF and its variants and ablations; with ``learned`` D-LEAF's fusion at the
    flags of ``detector`` (a shipped detector's name or a detector file fitted on the model; default the shipped
    organism detector) (``dleaf_learned``, gamma 1 and 0.5), PAI (alpha 0.9, every layer) and SPIN there; with
    ``random_rate`` (D-LEAF's measured flag rate) also D-LEAF's fusion at random layers at that rate."""
    S = setting
    settings = [
        S("greedy"),
        S("pai", "pai"),
        S("spin", "spin"),
        S("dleaf", "dleaf"),
        S("dleaf gamma=0.25", "dleaf", gamma=0.25),
        S("dleaf gamma=1", "dleaf", gamma=1.0),
        S("dleaf liae=mean_head", "dleaf", liae_variant="mean_head"),
        S("dleaf iaf=focus", "dleaf", iaf_variant="focus"),
        S("dleaf threshold=best", "dleaf", threshold="best", margin=0.05),
        S("dleaf kappa=0", "dleaf", kappa=0.0),
        S("dleaf signal=mass_deficit", "dleaf", layer_signal="mass_deficit"),
        S("dleaf heads=all_but_best", "dleaf", head_selection="all_but_best"),
        S("no_localization", "no_localization"),
    ]
    if learned:
        own = {} if detector == "organism" else {"detector": str(detector)}  # dleaf_learned's default: "organism"
        settings += [S("dleaf_learned", "dleaf_learned", **own),
                     S("dleaf_learned gamma=0.5", "dleaf_learned", gamma=0.5, **own),
                     S("pai alpha=0.9 learned", "pai", alpha=0.9, layer_start=0, localization="learned",
                       detector=str(detector)),
                     S("spin learned", "spin", localization="learned", detector=str(detector))]
    if random_rate is not None:
        settings.append(S("random_layers", "random_layers", random_rate=round(random_rate, 4)))
    return settings


def slug(label: str) -> str:
    """A folder name for a setting label."""
    return re.sub(r"[^\w.=-]+", "_", label).strip("_") or "setting"


def _args(s: Setting, benchmark: str, out: Path, split: str, n_images: int, batch_size: int, model: str,
          progress: bool) -> harness.EvalArguments:
    extra = {"negatives": ["adversarial"]} if benchmark == "organism_pope" else {}
    return harness.EvalArguments(benchmark=benchmark, output_dir=str(out), model=model, method=s.method,
                                 knobs=s.knob_args(),
                                 splits=[split], limit=n_images, batch_size=batch_size, progress=progress,
                                 record_flags=getattr(s.config(), "traces_flags", False),
                                 **extra)


def flag_rate(run_dir: str | os.PathLike) -> float | None:
    """The share of (position, watched layer) cells flagged over a run's replies (None without flag counts)."""
    rows = [r for _, r in read_jsonl(Path(run_dir) / harness.GENERATIONS, "generations file")[0]]
    if not rows or "flags" not in rows[0]:
        return None
    flagged, watched = (sum(r["flags"][k] for r in rows) for k in (0, 1))
    return flagged / watched if watched else None


def run_setting(model, processor, s: Setting, split: str, n_images: int, out_dir: str | os.PathLike,
                pope: bool = True, batch_size: int = 100, model_name: str = "organism", progress: bool = False
                ) -> dict:
    """One setting on one split through the harness (resumed or skipped when already there); returns its record:
    label, method, knobs, split, n_images, flag rate, the caption and POPE per-item scores and metrics."""
    base = Path(out_dir) / split / slug(s.label)
    cap = harness.run_evaluation(_args(s, "organism_caption", base / "captions", split, n_images, batch_size,
                                       model_name, progress), model, processor)
    rec = {"label": s.label, "method": s.method, "knobs": s.knob_dict, "split": split, "n_images": n_images,
           "flag_rate": flag_rate(base / "captions"), "captions": harness.read_scores(base / "captions"),
           "caption_metrics": cap["sections"][split], "dirs": {"captions": str(base / "captions")}}
    if pope:
        res = harness.run_evaluation(_args(s, "organism_pope", base / "pope", split, n_images, batch_size,
                                           model_name, progress), model, processor)
        rec["pope"] = harness.read_scores(base / "pope")
        rec["pope_metrics"] = res["sections"][f"{split}/adversarial"]
        rec["dirs"]["pope"] = str(base / "pope")
    return rec


def run_grid(model, processor, settings: Sequence[Setting], split: str, n_images: int,
             out_dir: str | os.PathLike, pope: bool = True, batch_size: int = 100, say: Callable = print,
             model_name: str = "organism") -> dict[str, dict]:
    """Every setting on ``n_images`` scenes of ``split``; returns ``{label: record}`` (see :func:`run_setting`)."""
    results = {}
    for s in settings:
        say(f"[{split}] {s.label}")
        results[s.label] = run_setting(model, processor, s, split, n_images, out_dir, pope, batch_size, model_name)
    return results


def compare_to_base(base: dict, rec: dict, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Paired differences (this setting - base) of every caption and POPE statistic, on the same items (bootstrap
    intervals seeded with ``seed``)."""
    out = dict(harness.paired_differences(base["captions"], rec["captions"], n_resamples, seed)[rec["split"]])
    if "pope" in rec and "pope" in base:
        section = f"{rec['split']}/adversarial"
        out.update(harness.paired_differences(base["pope"], rec["pope"], n_resamples, seed)[section])
    return out


def _rate(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_table(results: dict[str, dict], base: str = "greedy", n_resamples: int = 2000, seed: int = 0
                  ) -> tuple[list[dict], str]:
    """Rows (one per setting) with the statistics and the paired differences from ``base``, and a markdown table."""
    table = []
    for label, rec in results.items():
        row = {"label": label, "method": rec["method"], "knobs": rec["knobs"], "flag_rate": rec.get("flag_rate"),
               **harness.caption_stats(rec["captions"])}
        m = rec["caption_metrics"]
        row.update({"n_additions": m["n_additions"], "n_substitutions": m["n_substitutions"]})
        if "pope_metrics" in rec:
            p = rec["pope_metrics"]
            row.update({"pope_accuracy": p["accuracy"], "pope_f1": p["f1"], "pope_yes_ratio": p["yes_ratio"]})
        if label != base and base in results:
            row["vs_base"] = compare_to_base(results[base], rec, n_resamples, seed)
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

    lines = ["| setting | CHAIR_s % | CHAIR_i % | recall % | hall. mentions | grounded mentions | additions | "
             "substitutions | words | POPE acc % | POPE F1 % | flag rate |", "|" + "---|" * 12]
    for row in table:
        lines.append(
            f"| {row['label']} | {cell(row, 'chair_s')} | {cell(row, 'chair_i')} | {cell(row, 'recall')} | "
            f"{count(row, 'n_hallucinated_mentions')} | {count(row, 'n_grounded_mentions')} | "
            f"{count(row, 'n_additions')} | {count(row, 'n_substitutions')} | {cell(row, 'mean_length', False)} | "
            f"{cell(row, 'pope_accuracy')} | {cell(row, 'pope_f1')} | {_rate(row['flag_rate'])} |")
    return table, "\n".join(lines) + "\n"


LEGEND = ("Cells: value (difference from greedy [95% paired bootstrap interval]), in percentage points for rates; "
          "counts are totals over the split's captions (difference from greedy). Every setting runs through the "
          "evaluation harness: the organism's protocols, EOS trimming, the trailing-sentence rule.\n")


def has_shipped_detector(model) -> bool:
    """Whether a shipped detector was fitted on ``model`` (so the ``dleaf_learned`` settings can run)."""
    from .detect import shipped_detector_for

    return shipped_detector_for(model) is not None


def grid_detector(model, detector: str | os.PathLike | None = None) -> str | None:
    """The detector the grid's learned settings use on ``model``: ``detector`` (a shipped detector's name or a
    detector file), checked to have been fitted on ``model``; by default the shipped detector fitted on it, or None
    (the learned settings are left out) when none was."""
    from .detect import checked_detector, shipped_detector_for

    if detector is None:
        return shipped_detector_for(model)
    checked_detector(str(detector), model)
    return str(detector)


def run_organism_grid(model, processor, out_dir: str | os.PathLike, n_images: int = 1000,
                      only: Sequence[str] | None = None, replicate: Sequence[str] = (), pope: bool = True,
                      batch_size: int = 100, say: Callable = print, model_name: str = "organism", seed: int = 0,
                      detector: str | os.PathLike | None = None) -> dict:
    """The whole grid on the adversarial split (greedy and D-LEAF first: D-LEAF's flag rate sets the random-layer
    ablation's rate), then the ``replicate`` labels (and greedy) on the replication split; ``seed`` seeds the paired
    bootstrap intervals; the learned settings use ``detector`` (:func:`grid_detector`). Returns ``{"report":
    {split: table rows}, "markdown": text}``."""
    chosen_detector = grid_detector(model, detector)  # checked before any setting runs
    first = [s for s in grid() if s.label in ("greedy", "dleaf")]
    results = run_grid(model, processor, first, "adversarial", n_images, out_dir, pope, batch_size, say, model_name)
    settings = grid(results["dleaf"]["flag_rate"], learned=chosen_detector is not None,
                    detector=chosen_detector or "organism")
    labels = [s.label for s in settings]
    for name, chosen in (("--only", only or ()), ("--replicate", replicate)):
        unknown = sorted(set(chosen) - set(labels))
        if unknown:
            raise harness.InputError(f"{name}: unknown setting(s) {unknown}; the grid has {labels}")
    if only is not None:
        settings = [s for s in settings if s.label in set(only) | {"greedy", "dleaf"}]
    results = run_grid(model, processor, settings, "adversarial", n_images, out_dir, pope, batch_size, say,
                       model_name)
    table, md = summary_table(results, seed=seed)
    sections = [f"## Adversarial split, {n_images} images\n\n{md}"]
    report = {"adversarial": table}
    if replicate:
        rep = [s for s in settings if s.label in set(replicate) | {"greedy"}]
        rep_results = run_grid(model, processor, rep, "replication", n_images, out_dir, pope, batch_size, say,
                               model_name)
        rep_table, rep_md = summary_table(rep_results, seed=seed)
        sections.append(f"## Replication split, {n_images} images\n\n{rep_md}")
        report["replication"] = rep_table
    markdown = "# Decoding methods on the organism\n\n" + LEGEND + "\n" + "\n\n".join(sections)
    return {"report": report, "markdown": markdown}
