"""The fault benchmark's figures: per fault kind, each method's flag rate per layer with the faulted layers marked
(:func:`plot_flag_rates`), and repair against fault strength (:func:`plot_repair`)."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import numpy as np

from ..io import save_figure_atomic
from .config import fault_config


def plot_flag_rates(report: dict, kind: str, path: str | Path, split: str | None = None) -> Path | None:
    """Per fault of ``kind``: per layer, each flagging method's flag rate at the faulted positions (solid) and at the
    other positions (dashed), and PAI's share of its change to the attention rows (dotted), on a log scale, faulted
    layers shaded. A method that localizes the fault flags more often on the solid line inside the shaded layers
    than on the dashed one. None if the report has no fault of that kind."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    split = split or next(iter(report["splits"]))
    sec = report["splits"][split]
    labels = [(lab, rec) for lab, rec in zip(report["fault_labels"], report["faults"]) if rec["kind"] == kind]
    if not labels:
        return None
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig = Figure(figsize=(max(3.3 * cols, 8.0), 2.7 * rows + 1.1), dpi=110)
    FigureCanvasAgg(fig)
    styles = {"dleaf": ("tab:blue", "o", "D-LEAF (LIAE)"), "dleaf_mass": ("tab:orange", "s", "D-LEAF (mass deficit)"),
              "random_layers": ("tab:gray", "^", "random layers")}
    shown = set()
    for k, (label, rec) in enumerate(labels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ms = sec["faults"][label]["methods"]
        fault = fault_config(rec)
        L = None
        for name, (color, marker, text) in styles.items():
            loc = ms.get(name, {}).get("localization", {})
            if "layer_flag_rate_faulted_positions" not in loc:
                continue
            for key, style in (("layer_flag_rate_faulted_positions", "-"), ("layer_flag_rate_other_positions", "--")):
                y = np.array(loc[key], float)
                L = len(y)
                ax.plot(range(L), np.where(y > 0, y, np.nan), marker=marker, color=color, linestyle=style,
                        markersize=3.5, linewidth=1.2)
            shown.add(name)
        pai = ms.get("pai", {}).get("localization", {})
        if "layer_change_share" in pai:
            y = np.array(pai["layer_change_share"], float)
            L = L or len(y)
            ax.plot(range(len(y)), np.where(y > 0, y, np.nan), linestyle=":", color="tab:green", linewidth=1.5)
            shown.add("pai")
        if L:
            for layer in fault.layer_indices(L):
                ax.axvspan(layer - 0.4, layer + 0.4, color="tab:red", alpha=0.15, linewidth=0)
            ax.set_xticks(range(L))
        ax.set_yscale("log")
        ax.set_ylim(1e-3, 1.2)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        if k % cols == 0:
            ax.set_ylabel("flag rate / share (log)", fontsize=7)
        if k >= len(labels) - cols:
            ax.set_xlabel("decoder layer", fontsize=7)
    handles = [Line2D([], [], color=c, marker=m, label=t, markersize=4) for n, (c, m, t) in styles.items()
               if n in shown]
    if "pai" in shown:
        handles.append(Line2D([], [], color="tab:green", linestyle=":", label="PAI: share of its change"))
    handles += [Line2D([], [], color="black", linestyle="-", label="flag rate at faulted positions"),
                Line2D([], [], color="black", linestyle="--", label="flag rate at other positions"),
                Patch(color="tab:red", alpha=0.15, label="faulted layer")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(textwrap.fill(f"{kind} faults, {split} split: per layer, how often each method flags a row at the "
                               "faulted positions and at the other positions, and PAI's share of its change to the "
                               "attention rows (faulted layers shaded; zeros not drawn)", 120), fontsize=9)
    fig.tight_layout(rect=(0, 0.09, 1, 0.93))
    return save_figure_atomic(fig, Path(path))


def plot_repair(report: dict, path: str | Path) -> Path | None:
    """Repair against strength: for each kind and split, the faults that differ only in strength (the longest such
    series), restored and removed fractions per method with intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[tuple, list] = {}
    for label, rec in zip(report["fault_labels"], report["faults"]):
        key = tuple((k, str(v)) for k, v in sorted(rec.items()) if k != "strength")
        series.setdefault(key, []).append((rec["strength"], label, rec["kind"]))
    best: dict[str, list] = {}
    for key, items in series.items():
        kind = items[0][2]
        if len(items) > 1 and len(items) > len(best.get(kind, [])):
            best[kind] = sorted(items)
    if not best:
        return None
    methods = [m for m in report["methods"] if m != "greedy"]
    splits = list(report["splits"])
    fig = Figure(figsize=(max(4.5 * len(best), 8.0), 3.0 * len(splits) + 1.0), dpi=110)
    FigureCanvasAgg(fig)
    colors = dict(zip(methods, ["tab:blue", "tab:orange", "tab:gray", "tab:green", "tab:purple", "tab:brown"]))
    for i, split in enumerate(splits):
        for j, (kind, items) in enumerate(sorted(best.items())):
            ax = fig.add_subplot(len(splits), len(best), i * len(best) + j + 1)
            xs = [s for s, _, _ in items]
            for m in methods:
                for what, style in (("restored", "-"), ("removed", ":")):
                    ys, lo, hi = [], [], []
                    for _, label, _ in items:
                        r = report["splits"][split]["faults"][label]["methods"][m]["repair"][what]
                        v = r["value"] if r["value"] is not None else math.nan
                        ys.append(v)
                        lo.append(v - r["low"] if r["low"] is not None and math.isfinite(r["low"]) else 0)
                        hi.append(r["high"] - v if r["high"] is not None and math.isfinite(r["high"]) else 0)
                    ax.errorbar(xs, ys, yerr=[np.nan_to_num(lo), np.nan_to_num(hi)], linestyle=style,
                                color=colors[m], marker="o", markersize=3, capsize=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xticks(xs)
            ax.set_xlabel("fault strength", fontsize=7)
            ax.set_ylabel("fraction", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.set_title(f"{split}: " + re.sub(r" s[0-9.]+", " s=x", items[0][1]), fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], label=m) for m in methods]
    handles += [Line2D([], [], color="black", linestyle="-", label="restored (lost grounded objects named again)"),
                Line2D([], [], color="black", linestyle=":", label="removed (added hallucinations gone)")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle("repair against fault strength, per method (bars: 95% bootstrap intervals over images)", fontsize=9)
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    return save_figure_atomic(fig, Path(path))


