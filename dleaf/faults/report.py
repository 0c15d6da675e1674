"""The fault benchmark's report: every table from the run folders (:func:`build_report`, statistics from
:mod:`dleaf.faults.measures`), as ``report.json``, Markdown tables (``faults.md``) and figures
(:mod:`dleaf.faults.figures`), each written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..eval import compare, runner
from ..io import read_json, read_jsonl, write_json_atomic, write_text_atomic
from .diagnose import sensitivity_markdown
from .figures import plot_flag_rates, plot_repair
from .grid import DIAGNOSIS, MARKDOWN, METHODS, REPORT, ROW_METHODS, FaultBenchConfig, run_dir_of
from .measures import damage, localization, num_layers_of, ratio_difference, repair, signal_profile, totals

def _read_rows(run_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    config = read_json(run_dir / runner.CONFIG, "run config")
    rows = [r for _, r in read_jsonl(run_dir / runner.GENERATIONS, "generations file")[0]]
    return config, rows, compare.read_scores(run_dir)


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if not k.startswith("_")}
    return d


def build_report(out: str | Path, cfg: FaultBenchConfig) -> dict:
    """Every table of the benchmark from the run folders under ``out`` (see the module docstring)."""
    out = Path(out)
    n, seed = cfg.n_resamples, cfg.seed
    report: dict[str, Any] = {"benchmark": cfg.benchmark, "model": cfg.model,
                              "model_weights_sha256": cfg.model_weights, "limit": cfg.limit, "seed": cfg.seed,
                              "knobs": dict(cfg.knobs),
                              "methods": list(cfg.methods), "faults": [f.record() for f in cfg.faults],
                              "fault_labels": [f.label() for f in cfg.faults], "splits": {}}
    for split in cfg.splits:
        base_cfg, base_rows, base_scores = _read_rows(run_dir_of(out, split, None, "greedy"))
        num_layers = num_layers_of(_read_rows(run_dir_of(out, split, None, "dleaf"))[1]) \
            if "dleaf" in cfg.methods else None
        sec: dict[str, Any] = {"n_images": len(base_scores), "protocol": base_cfg["protocol"], "unfaulted": {},
                               "faults": {}}
        if (out / split / DIAGNOSIS).is_file():
            sec["diagnosis"] = read_json(out / split / DIAGNOSIS, "diagnosis")
        for name in cfg.methods:
            config, rows, scores = _read_rows(run_dir_of(out, split, None, name))
            L = num_layers or (num_layers_of(rows) if name != "greedy" else None)
            entry = {"metrics": totals(scores), "knobs": config.get("knobs", {})}
            if name != "greedy":
                loc = localization(rows, config, None, L, METHODS[name].flags, n, seed)
                entry["localization"] = _strip(loc)
                if name == "dleaf":
                    entry["signal"] = signal_profile(rows, None, L)
            sec["unfaulted"][name] = entry
        for fault in cfg.faults:
            f_cfg, f_rows, f_scores = _read_rows(run_dir_of(out, split, fault, "greedy"))
            entry: dict[str, Any] = {"label": fault.label(), "damage": damage(base_scores, f_scores, n, seed),
                                     "methods": {}}
            locs = {}
            for name in cfg.methods:
                if name == "greedy":
                    continue
                config, rows, scores = _read_rows(run_dir_of(out, split, fault, name))
                L = num_layers or num_layers_of(rows)
                m: dict[str, Any] = {"knobs": config.get("knobs", {}), "metrics": totals(scores),
                                     "vs_faulted": compare.paired_differences(f_scores, scores, n, seed)[split],
                                     "repair": repair(base_scores, f_scores, scores, n, seed)}
                if name in ROW_METHODS:
                    loc = localization(rows, config, fault, L, METHODS[name].flags, n, seed)
                    locs[name] = loc
                    m["localization"] = _strip(loc)
                if name == "dleaf":
                    m["signal"] = signal_profile(rows, fault, L)
                entry["methods"][name] = m
            entry["comparisons"] = _comparisons(locs, n, seed)
            sec["faults"][fault.label()] = entry
        report["splits"][split] = sec
    return report


def _comparisons(locs: dict, n: int, seed: int = 0) -> dict:
    """Paired differences over images: each D-LEAF variant's precision minus random layers', and its share of
    change on faulted cells minus PAI's."""
    out = {}
    for name in ("dleaf", "dleaf_mass"):
        if name not in locs:
            continue
        a = locs[name]["_arrays"]
        if "random_layers" in locs:
            r = locs["random_layers"]["_arrays"]
            out[f"{name}_precision_minus_random"] = ratio_difference(a["hits"], a["flagged"], r["hits"], r["flagged"],
                                                                     n, seed)
        if "pai" in locs and "_change" in locs[name] and "_change" in locs["pai"]:
            c, p = locs[name]["_change"], locs["pai"]["_change"]
            out[f"{name}_share_minus_pai"] = ratio_difference(c["faulted"], c["total"], p["faulted"], p["total"], n,
                                                              seed)
    return out


def _pct(d, key="value") -> str:
    if d is None:
        return "n/a"
    v = d.get(key) if isinstance(d, dict) else d
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(d, dict) and d.get("low") is not None and math.isfinite(d.get("low", math.nan)):
        return f"{100 * v:.1f} [{100 * d['low']:.1f}, {100 * d['high']:.1f}]"
    return f"{100 * v:.1f}"


def _diff(d, scale=100.0, digits=1) -> str:
    if d is None or d.get("diff") is None or not math.isfinite(d["diff"]):
        return "n/a"
    if d.get("low") is None or not math.isfinite(d["low"]):
        return f"{scale * d['diff']:+.{digits}f}"
    return f"{scale * d['diff']:+.{digits}f} [{scale * d['low']:+.{digits}f}, {scale * d['high']:+.{digits}f}]"


def _auc(d) -> str:
    if not d or d.get("value") is None or not math.isfinite(d["value"]):
        return "n/a"
    if d.get("low") is None or not math.isfinite(d["low"]):
        return f"{d['value']:.2f}"
    return f"{d['value']:.2f} [{d['low']:.2f}, {d['high']:.2f}]"


def report_markdown(report: dict) -> str:
    """The tables of a report (damage, localization, repair per split; the signal profile of the unfaulted model)."""
    weights = f" (weights {report['model_weights_sha256']})" if report.get("model_weights_sha256") else ""
    lines = [f"Model: {report['model']}{weights}; benchmark {report['benchmark']}; "
             f"{'all' if report['limit'] is None else report['limit']} images per split. Intervals: 95% bootstrap "
             "over images (percentile); AUROC intervals resample replies.", ""]
    for split, sec in report["splits"].items():
        base = sec["unfaulted"]["greedy"]["metrics"]
        lines += [f"### {split} ({sec['n_images']} images)", "",
                  f"Unfaulted greedy: CHAIR_s {100 * base['chair_s']:.1f}%, CHAIR_i {100 * base['chair_i']:.1f}%, "
                  f"recall {100 * base['recall']:.1f}%, {base['n_hallucinated_mentions']} hallucinated and "
                  f"{base['n_grounded_mentions']} grounded mentions, {base['n_additions']} additions, "
                  f"{base['n_substitutions']} substitutions.", ""]
        lines += ["**Damage** (faulted greedy minus unfaulted greedy; points, [95% paired interval]; counts "
                  "faulted / unfaulted)", "",
                  "| fault | CHAIR_s | CHAIR_i | recall | halluc. mentions | grounded mentions | additions | "
                  "substitutions |", "|---|---|---|---|---|---|---|---|"]
        for label, e in sec["faults"].items():
            d, t = e["damage"], e["damage"]["totals"]
            lines.append(f"| {label} | {_diff(d['chair_s'])} | {_diff(d['chair_i'])} | {_diff(d['recall'])} | "
                         f"{t['faulted']['n_hallucinated_mentions']} / {t['unfaulted']['n_hallucinated_mentions']} | "
                         f"{t['faulted']['n_grounded_mentions']} / {t['unfaulted']['n_grounded_mentions']} | "
                         f"{t['faulted']['n_additions']} / {t['unfaulted']['n_additions']} | "
                         f"{t['faulted']['n_substitutions']} / {t['unfaulted']['n_substitutions']} |")
        flaggers = [m for m in ("dleaf", "dleaf_mass", "dleaf_learned", "random_layers") if m in report["methods"]]
        lines += ["", "**Localization**: flags against faulted (position, layer) cells, % [interval]; chance = "
                  "faulted share of the cells (the precision of flags placed at random); AUROC of the signal's "
                  "margin over its threshold, faulted against unfaulted cells, pooled over layers and within a "
                  "layer", "",
                  "| fault | chance | " + " | ".join(f"{m} precision | {m} recall" for m in flaggers)
                  + " | dleaf AUROC pooled | dleaf AUROC within layer | dleaf_mass AUROC pooled | "
                  "dleaf_mass AUROC within layer |",
                  "|---|---|" + "---|---|" * len(flaggers) + "---|---|---|---|"]
        for label, e in sec["faults"].items():
            ms = e["methods"]
            chance = ms[flaggers[0]]["localization"]["faulted_share"] if flaggers else None
            cells = " | ".join(f"{_pct(ms[m]['localization'].get('precision'))} | "
                               f"{_pct(ms[m]['localization'].get('recall'))}" for m in flaggers)
            aucs = [_auc(ms[m]["localization"].get(key)) if m in ms else "n/a" for m in ("dleaf", "dleaf_mass")
                    for key in ("auroc", "auroc_within_layer")]
            lines.append(f"| {label} | {_pct(chance)} | {cells} | " + " | ".join(aucs) + " |")
        rowm = [m for m in ROW_METHODS if m in report["methods"]]
        lines += ["", "**Share of each method's change to the attention rows that falls on faulted cells**, % "
                  "[interval] (uniform = the faulted share of the cells it acts on), and paired differences in "
                  "points", "",
                  "| fault | " + " | ".join(f"{m} (uniform)" for m in rowm) + " | dleaf precision - random | "
                  "dleaf_mass precision - random | dleaf share - pai | dleaf_mass share - pai |",
                  "|---|" + "---|" * len(rowm) + "---|---|---|---|"]
        for label, e in sec["faults"].items():
            ms, cmp_ = e["methods"], e["comparisons"]
            cells = " | ".join(f"{_pct(ms[m]['localization'].get('change_share'))} "
                               f"({_pct(ms[m]['localization']['faulted_share'], 'value')})" for m in rowm)
            lines.append(f"| {label} | {cells} | {_diff(cmp_.get('dleaf_precision_minus_random'))} | "
                         f"{_diff(cmp_.get('dleaf_mass_precision_minus_random'))} | "
                         f"{_diff(cmp_.get('dleaf_share_minus_pai'))} | "
                         f"{_diff(cmp_.get('dleaf_mass_share_minus_pai'))} |")
        reps = [m for m in report["methods"] if m != "greedy"]
        lines += ["", "**Repair**: % of the grounded objects the fault made the model drop that each method names "
                  "again (restored), and of the hallucinated objects the fault added that it no longer names "
                  "(removed), [interval]; lost / added counts", "",
                  "| fault | lost | added | " + " | ".join(f"{m} restored | {m} removed" for m in reps) + " |",
                  "|---|---|---|" + "---|---|" * len(reps)]
        for label, e in sec["faults"].items():
            ms = e["methods"]
            r0 = ms[reps[0]]["repair"] if reps else {"n_lost": 0, "n_added": 0}
            cells = " | ".join(f"{_pct(ms[m]['repair']['restored'])} | {_pct(ms[m]['repair']['removed'])}"
                               for m in reps)
            lines.append(f"| {label} | {r0['n_lost']} | {r0['n_added']} | {cells} |")
        lines += ["", "**Net effect on the faulted model** (each method minus faulted greedy, same images; points "
                  "[95% paired interval]): a method that changes many replies also restores and removes objects "
                  "by chance, and adds its own errors", "",
                  "| fault | " + " | ".join(f"{m} CHAIR_s | {m} recall" for m in reps) + " |",
                  "|---|" + "---|---|" * len(reps)]
        for label, e in sec["faults"].items():
            ms = e["methods"]
            lines.append(f"| {label} | " + " | ".join(f"{_diff(ms[m]['vs_faulted']['chair_s'])} | "
                                                      f"{_diff(ms[m]['vs_faulted']['recall'])}" for m in reps) + " |")
        un = sec["unfaulted"]
        lines += ["", "**Unfaulted model** (each method on the model without a fault): flag rate and its "
                  "interventions", "", "| method | CHAIR_s | recall | flag rate |", "|---|---|---|---|"]
        for name, e in un.items():
            loc = e.get("localization", {})
            lines.append(f"| {name} | {100 * e['metrics']['chair_s']:.1f} | {100 * e['metrics']['recall']:.1f} | "
                         f"{_pct(loc.get('flag_rate'))} |")
        if "dleaf" in un and "signal" in un["dleaf"]:
            s = un["dleaf"]["signal"]
            lines += ["", "**The unfaulted model's image attention per layer** (D-LEAF's trace on its own replies): "
                      "head-mean image mass, LIAE (normalised entropy of the head-mixed image profile, in [0, 1]): "
                      "mean, standard deviation over all rows and within a reply, headroom 1 - mean", "",
                      "| layer | image mass | LIAE mean | LIAE std | within-reply std | headroom |",
                      "|---|---|---|---|---|---|"]
            for layer, (m, mu, sd, w) in enumerate(zip(s["image_mass"], s["clean_mean"], s["clean_std"],
                                                       s["within_reply_std"])):
                lines.append(f"| {layer} | {m:.3f} | {mu:.4f} | {sd:.4f} | {w:.4f} | {1 - mu:.4f} |")
            shifts = []
            for label, e in sec["faults"].items():
                sig = e["methods"].get("dleaf", {}).get("signal")
                if sig is None:
                    continue
                fm, cm = np.array(sig["faulted_mean"], float), np.array(sig["clean_mean"], float)
                w = np.array(s["within_reply_std"], float)
                ok = np.isfinite(fm)
                if ok.any():
                    shifts.append(f"| {label} | " + ", ".join(
                        f"{j}: {fm[j] - cm[j]:+.4f}" + (f" ({(fm[j] - cm[j]) / w[j]:+.1f} sd)" if w[j] > 0 else "")
                        for j in np.nonzero(ok)[0]) + " |")
            if shifts:
                lines += ["", "LIAE at faulted rows minus unfaulted rows of the same layer, same run (in units of "
                          "the unfaulted model's within-reply standard deviation):", "",
                          "| fault | layer: shift |", "|---|---|", *shifts]
        if "diagnosis" in sec:
            d = sec["diagnosis"]
            lines += ["", f"**Can LIAE see a diffuse fault?** On the unfaulted model's {d['n_replies']} greedy "
                      "replies, teacher-forced: each LIAE variant (normalised, in [0, 1]; `mixed` = entropy of the "
                      "head-mixed profile, D-LEAF's default; `mean_head` = mean of the heads' entropies) without a "
                      "fault, its within-reply standard deviation, its headroom 1 - mean (the most a diffuse fault "
                      "can add), and the rise a diffuse fault of every head and position of strength s causes, in "
                      "within-reply standard deviations", "", sensitivity_markdown(d)]
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out: str | Path) -> list[Path]:
    """``report.json``, ``faults.md`` and the figures (``flags_<kind>_<split>.png``, ``repair_strength.png``),
    each written atomically."""
    out = Path(out)
    paths = [write_json_atomic(report, out / REPORT), write_text_atomic(report_markdown(report), out / MARKDOWN)]
    kinds = list(dict.fromkeys(rec["kind"] for rec in report["faults"]))
    for split in report["splits"]:
        for kind in kinds:
            p = plot_flag_rates(report, kind, out / f"flags_{kind}_{split}.png", split)
            if p is not None:
                paths.append(p)
    p = plot_repair(report, out / "repair_strength.png")
    if p is not None:
        paths.append(p)
    return paths
