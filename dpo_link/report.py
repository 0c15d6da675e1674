"""The correspondence report, rendered: ``correspondence.md`` (every statistic with its interval and p-value),
``correspondence.json`` (everything, per-row arrays included) and the figures, each written atomically.

Measuring lives in :mod:`dpo_link.suite`; this module only renders the dict it returns.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from dleaf.io import write_json_atomic, write_text_atomic

from . import correspondence as C


# ------------------------------------------------------------------------------------------------- markdown
def _f(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def interval(e: dict, digits: int = 3) -> str:
    """``estimate [low, high], p = ...`` of a statistic (its note when undefined)."""
    if e.get("note"):
        return e["note"]
    s = f"{_f(e['estimate'], digits)} [{_f(e['low'], digits)}, {_f(e['high'], digits)}]"
    if "p_value" in e and e["p_value"] == e["p_value"]:
        s += f", p = {_f(e['p_value'], 3)}"
    return s


def _p(v: float) -> str:
    return "nan" if v != v else (f"{v:.2g}" if v < 0.01 else f"{v:.3f}")


def report_markdown(report: dict) -> str:
    """The report as markdown tables (every estimate with its interval and p-value)."""
    pr = report["pairs_report"]
    cfg = report["config"]
    lines = ["# D-LEAF against DPO: correspondence report", "",
             f"Base model `{cfg['model']}`, adapter `{cfg['adapter']}`, {pr['n_pairs']} preference pairs "
             f"({pr['n_rows']} replies), beta = {pr['beta']}; D-LEAF knobs {cfg['dleaf']}.",
             f"Intervals: bootstrap percentile {int(100 * cfg['protocol']['confidence'])}% "
             f"({cfg['protocol']['n_resamples']} resamples of pairs; token-level: of replies); p: two-sided "
             f"permutation ({cfg['protocol']['permutations']} permutations of pairs). "
             f"D-LEAF flagged {100 * pr['flag_rate']:.2f}% of "
             f"(reply position, layer) cells and corrected {100 * pr['corrected_share']:.2f}% of (position, layer, "
             "head) cells.", "",
             "## D-LEAF as a DPO step", "",
             "| policy | DPO loss | reward accuracy (sign-test p) | ties | mean margin | mean r(chosen) | "
             "mean r(rejected) |", "|---|---|---|---|---|---|---|"]
    for name, d in pr["dpo"].items():
        lines.append(f"| {name} | {d['loss']:.6f} | {d['accuracy']:.3f} ({_p(d['accuracy_p_value'])}) | "
                     f"{d['ties']:.3f} | {_f(d['margin'], 4)} | "
                     f"{_f(d['chosen'], 4)} | {_f(d['rejected'], 4)} |")
    lines.append(f"\nlog 2 = {math.log(2):.6f}.")
    if "curve" in pr:
        lines += ["", "Loss over gamma (D-LEAF, adapter off):", "", "| gamma | loss | accuracy | margin |",
                  "|---|---|---|---|"]
        for c in pr["curve"]:
            lines.append(f"| {c['gamma']} | {c['loss']:.6f} | {c['accuracy']:.3f} | {_f(c['margin'], 4)} |")
        s = pr["slope"]
        fd = s["finite_difference"]
        lines += ["", f"Slope dL/dgamma at 0: autograd {s['slope']:.6g}; central difference (h = {fd['h']}) "
                      f"{fd['central']:.6g}; forward difference {fd['forward']:.6g}; first step of the sweep "
                      f"{_f(s['sweep_forward_difference'], 4)}."]
    lines += ["", "## Sequence level: r_D (or a null) against r_theta", "",
              "| compared with r_theta | Pearson | Spearman | Kendall |", "|---|---|---|---|"]
    for name, d in pr["sequence"].items():
        if name.startswith("length_vs"):
            continue
        lines.append(f"| {name} | " + " | ".join(interval(d[m]) for m in C.CORRELATIONS) + " |")
    lv = pr["sequence"]
    lines += ["", f"Reply length against r_theta: Spearman {interval(lv['length_vs_dpo'])}; against r_D: "
                  f"{interval(lv['length_vs_dleaf'])}. `dleaf_length_partial` correlates the residuals of both rewards "
                  "after a linear fit on reply length."]
    lines += ["", "## Pair level", "", "| policy | margin Pearson | margin Spearman | sign agreement (chance) | "
              "pairs with both margins nonzero |", "|---|---|---|---|---|"]
    for name, d in pr["pairs"].items():
        sa = d["sign_agreement"]
        sa_s = interval(sa) + (f" ({sa['chance']:.3f})" if "chance" in sa else "")
        lines.append(f"| {name} | {interval(d['margins']['pearson'])} | {interval(d['margins']['spearman'])} | {sa_s} | "
                     f"{d['n_signed']} |")
    if "by_task" in pr:
        lines += ["", "## Per task (D-LEAF against the adapter)", "",
                  "| task | pairs | DPO loss adapter / D-LEAF | accuracy adapter / D-LEAF (sign-test p) | "
                  "sequence Spearman | "
                  "margin Spearman | sign agreement (chance) |", "|---|---|---|---|---|---|---|"]
        for task, d in pr["by_task"].items():
            sa = d["pairs"]["sign_agreement"]
            lines.append(f"| {task} | {d['n_pairs']} | {d['dpo']['adapter']['loss']:.4f} / "
                         f"{d['dpo']['dleaf']['loss']:.6f} | {d['dpo']['adapter']['accuracy']:.3f} / "
                         f"{d['dpo']['dleaf']['accuracy']:.3f} ({_p(d['dpo']['dleaf']['accuracy_p_value'])}) | "
                         f"{interval(d['sequence']['spearman'])} | "
                         f"{interval(d['pairs']['margins']['spearman'])} | {interval(sa)}"
                         + (f" ({sa['chance']:.3f})" if "chance" in sa else "") + " |")
    sc = pr["scale"]
    lines += ["", "## Scale", "",
              (sc["note"] if sc.get("note") else
               f"r_theta ~ s r_D: s = {_f(sc['s'], 4)} [{_f(sc['low'], 4)}, {_f(sc['high'], 4)}], uncentred R^2 "
               f"{_f(sc['r2'], 3)}; D-LEAF's reward matches DPO's best at beta_D = s * beta = "
               f"{_f(sc['beta_match'], 4)}.")]
    for key, title in (("tokens", "D-LEAF"), ("tokens_random_target", "random-target null")):
        if key not in pr:
            continue
        lines += ["", f"## Token level ({title}): per-token log-ratio against DPO's", "",
                  "| tokens | n (rows) | Pearson | Spearman | mean beta log pi_D/pi_0 | mean beta log pi_theta/pi_0 |",
                  "|---|---|---|---|---|---|"]
        for kind, d in pr[key].items():
            lines.append(f"| {kind} | {d['n_tokens']} ({d['n_rows']}) | {interval(d['pearson'])} | {interval(d['spearman'])} | "
                         f"{_f(d['mean_dleaf'], 4)} [{_f(d['mean_dleaf_interval'][0], 4)}, "
                         f"{_f(d['mean_dleaf_interval'][1], 4)}] | {_f(d['mean_dpo'], 4)} "
                         f"[{_f(d['mean_dpo_interval'][0], 4)}, {_f(d['mean_dpo_interval'][1], 4)}] |")
    m = pr["mechanism"]
    lines += ["", "## Mechanism: D-LEAF's correction frequency against DPO's image-mass change, per (layer, head)", "",
              f"{m['cells']} cells, {m['cells_corrected']} ever corrected, {m['n_positions']} reply positions."]
    for method in ("spearman", "kendall"):
        d = m[method]
        lines.append(f"- {method}: " + (d["note"] if d.get("note") else
                                        f"{d['estimate']:.3f}, permutation p = {_p(d['p_value'])}"))
    tk = m["top_k_overlap"]
    lines.append(f"- top-{m['k']} overlap: {tk['estimate']:.3f} (chance {tk['chance']:.3f}), one-sided permutation "
                 f"p = {_p(tk['p_value'])}")
    if "generations" in report:
        g = report["generations"]
        lines += ["", f"## Free generations ({g['n']} greedy replies of the base model)", "",
                  f"Mean r_theta {_f(g['mean_r_theta'], 4)}, mean r_D {_f(g['mean_r_D'], 4)}.", "",
                  "| | Pearson | Spearman | Kendall |", "|---|---|---|---|",
                  "| r_D vs r_theta | " + " | ".join(interval(g["sequence"][mm]) for mm in C.CORRELATIONS) + " |",
                  "| length-partial | " + " | ".join(interval(g["sequence_length_partial"][mm]) for mm in C.CORRELATIONS)
                  + " |"]
        if "tokens" in g:
            lines += ["", "| tokens | n (rows) | Pearson | Spearman | mean D | mean theta |",
                      "|---|---|---|---|---|---|"]
            for kind, d in g["tokens"].items():
                lines.append(f"| {kind} | {d['n_tokens']} ({d['n_rows']}) | {interval(d['pearson'])} | "
                             f"{interval(d['spearman'])} | {_f(d['mean_dleaf'], 4)} | {_f(d['mean_dpo'], 4)} |")
    if "held_out_check" in report:
        h = report["held_out_check"]
        lines += ["", f"Consistency: on the adapter's own {h['n']} held-out pairs, the DPO loss recorded at training "
                      f"is {_f(h['recorded_loss'], 6)} and recomputed here {_f(h['recomputed_loss'], 6)}; reward "
                      f"accuracy {_f(h['recorded_accuracy'], 4)} and {_f(h['recomputed_accuracy'], 4)}."]
    lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- figures
def _save_atomic(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.chmod(tmp, 0o644)  # mkstemp makes the file private; a figure is for reading
    os.replace(tmp, path)


def plot_report(report: dict, out: Path) -> list[str]:
    """``scatter.png`` (r_D and the random-target null against r_theta, chosen and rejected replies),
    ``loss_gamma.png`` (D-LEAF's DPO loss over gamma with the autograd tangent at 0) and ``heads.png`` (layer x head
    maps: D-LEAF's correction frequency beside DPO's image-mass change). Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pr = report["pairs_report"]
    a = pr["arrays"]
    written = []
    rt = np.asarray(a["r_theta"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, title in ((axes[0], "r_dleaf", "D-LEAF"), (axes[1], "r_random_target", "random-target null")):
        rd = np.asarray(a[key])
        ax.scatter(rd[a["chosen"]], rt[a["chosen"]], s=8, alpha=0.6, label="chosen")
        ax.scatter(rd[a["rejected"]], rt[a["rejected"]], s=8, alpha=0.6, label="rejected")
        ax.axhline(0, color="grey", lw=0.5), ax.axvline(0, color="grey", lw=0.5)
        name = "dleaf" if key == "r_dleaf" else "random_target"
        pe = pr["sequence"][name]["pearson"]
        ax.set_title(f"{title}: Pearson {interval(pe, 2)}", fontsize=9)
        ax.set_xlabel(f"r = beta log pi/pi_0 ({title})"), ax.set_ylabel("r_theta (DPO adapter)")
        ax.ticklabel_format(style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_atomic(fig, out / "scatter.png"), plt.close(fig)
    written.append("scatter.png")
    if "curve" in pr:
        g = np.array([c["gamma"] for c in pr["curve"]])
        loss = np.array([c["loss"] for c in pr["curve"]])
        fig, ax = plt.subplots(figsize=(5, 3.8))
        ax.plot(g, loss, "o-", label="D-LEAF")
        ax.axhline(math.log(2), color="grey", ls="--", lw=0.8, label="log 2 (pi_0)")
        s = pr["slope"]["slope"]
        gg = np.linspace(0, max(g.max() * 0.3, 1e-3), 10)
        ax.plot(gg, math.log(2) + s * gg, "r-", lw=1, label=f"autograd slope at 0: {s:.3g}")
        ax.set_xlabel("gamma"), ax.set_ylabel("DPO loss on held-out pairs"), ax.legend(fontsize=8)
        _save_atomic(fig, out / "loss_gamma.png"), plt.close(fig)
        written.append("loss_gamma.png")
    freq = np.asarray(a["correction_frequency"])
    dm = np.asarray(a["mass_change"])
    fig, axes = plt.subplots(1, 2, figsize=(11, min(0.5 * freq.shape[0] + 2, 9)), layout="constrained")
    im = axes[0].imshow(freq, cmap="viridis", aspect="auto")
    axes[0].set_title("D-LEAF correction frequency", fontsize=9)
    fig.colorbar(im, ax=axes[0], label="share of positions corrected")
    lim = float(np.nanmax(np.abs(dm))) or 1.0
    im = axes[1].imshow(dm, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    axes[1].set_title("DPO: image mass under adapter - base", fontsize=9)
    fig.colorbar(im, ax=axes[1], label="change in image mass")
    step_h, step_l = -(-freq.shape[1] // 8), -(-freq.shape[0] // 16)  # at most 8 / 16 ticks: readable on 32 x 32
    for ax in axes:
        ax.set_xlabel("head"), ax.set_ylabel("layer")
        ax.set_xticks(range(0, freq.shape[1], step_h)), ax.set_yticks(range(0, freq.shape[0], step_l))
    _save_atomic(fig, out / "heads.png"), plt.close(fig)
    written.append("heads.png")
    return written


def write_report(report: dict, out: str | Path) -> list[str]:
    """``correspondence.json`` (everything, arrays included), ``correspondence.md`` and the figures, atomically."""
    out = Path(out)
    files = plot_report(report, out)
    write_json_atomic(_jsonable(report), out / "correspondence.json")
    write_text_atomic(report_markdown(report), out / "correspondence.md")
    return ["correspondence.json", "correspondence.md", *files]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return x
