"""The correspondence report, rendered: ``correspondence.md`` (every statistic with its interval and p-value),
``correspondence.json`` (everything, per-row arrays included) and the figures, each written atomically.

Measuring lives in :mod:`dpo_link.suite`; this module only renders the dict it returns.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dleaf.io import save_figure_atomic, write_json_atomic, write_text_atomic

from . import correspondence as C
from .dleaf_dpo import is_descent_step


# ------------------------------------------------------------------------------------------------- markdown
LOG2 = math.log(2.0)


def num(x) -> str:
    """The report's one number format: three decimals from 0.01 up, three significant digits in scientific notation
    below (``5.67e-4``), ``-`` for a missing value and ``nan`` for an undefined one."""
    if x is None:
        return "-"
    if isinstance(x, bool) or isinstance(x, int):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return "nan"
    if x == 0 or abs(x) >= 0.01:
        return f"{x:.3f}"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def interval(e: dict) -> str:
    """``estimate [low, high], p = ...`` of a statistic (its note when undefined)."""
    if e.get("note"):
        return e["note"]
    s = f"{num(e['estimate'])} [{num(e['low'])}, {num(e['high'])}]"
    if e.get("p_value") is not None and e["p_value"] == e["p_value"]:
        s += f", p = {num(e['p_value'])}"
    return s


def _above_log2(loss: float) -> str:
    return f"log 2 {'+' if loss >= LOG2 else '-'} {num(abs(loss - LOG2))}"


def verdict_lines(pr: dict) -> list[str]:
    """The verdict in words: is D-LEAF a DPO descent step on these pairs, do its rewards agree with DPO's, does it
    correct the heads whose image attention DPO changed."""
    d = pr["dpo"]["dleaf"]
    out = []
    if "slope" in pr:
        slope = pr["slope"]["slope"]
        descent = is_descent_step(d, slope)
        out.append(f"**D-LEAF {'is' if descent else 'is not'} a DPO descent step on these pairs**: its DPO loss is "
                   f"{_above_log2(d['loss'])}, its reward accuracy {num(d['accuracy'])} (sign-test p = "
                   f"{num(d['accuracy_p_value'])}), and the slope of the loss at gamma 0 is "
                   f"{'negative' if slope < 0 else 'positive' if slope > 0 else 'zero'} ({num(slope)}).")
    rho = pr["sequence"]["dleaf"]["spearman"]
    if rho.get("note"):
        out.append(f"Its rewards cannot be compared with DPO's: {rho['note']}.")
    else:
        agree = rho["p_value"] < 0.05 and rho["estimate"] > 0
        out.append(f"**Its rewards {'agree' if agree else 'do not agree'} with the adapter's**: Spearman "
                   f"{interval(rho)} over all replies.")
    tk = pr["mechanism"]["top_k_overlap"]
    out.append(f"**It {'corrects' if tk['p_value'] < 0.05 else 'does not detectably correct'} the heads whose image "
               f"attention DPO raised**: top-{pr['mechanism']['k']} overlap {num(tk['estimate'])} against "
               f"{num(tk['chance'])} by chance (p = {num(tk['p_value'])}).")
    return out


TERMS = [
    "Terms (docs/correspondence.md in the repository defines each and the idea behind them): "
    "**r_theta** = beta log pi_theta(y|x) / pi_0(y|x), the adapter's implicit reward (TRL's rewards/chosen and "
    "rewards/rejected); **r_D** = beta log pi_D(y|x) / pi_0(y|x), D-LEAF's reward shift; **margin** = r(chosen) - "
    "r(rejected); **reward accuracy** = share of positive margins; **sign-test p** = two-sided binomial test of that "
    "share against 1/2 over the pairs with a nonzero margin; **sign agreement** = share of pairs where D-LEAF and "
    "DPO prefer the same reply, against its **chance** level p_D p_theta + (1 - p_D)(1 - p_theta) from the two shares "
    "of positive margins; **matched noise** = random values with r_D's mean and spread in place of r_D; "
    "**shuffled** = r_D moved to other pairs at random; **random_target** = D-LEAF's sites and strength fused toward "
    "a random head; **random_layers** = D-LEAF's fusion at random layers as often as D-LEAF flags; "
    "**length-partial** = both rewards with their linear fit on reply length removed; **s** = least-squares scale in "
    "r_theta ~ s r_D and **beta_D** = s beta, the temperature at which D-LEAF's reward best matches DPO's (negative: "
    "the best fit turns D-LEAF's reward around).",
]


def report_markdown(report: dict) -> str:
    """The report as markdown: the verdict in words, the terms, then every estimate with its interval and p-value."""
    pr = report["pairs_report"]
    cfg = report["config"]
    proto = cfg["protocol"]
    lines = ["# D-LEAF against DPO: correspondence report", "", *verdict_lines(pr), "",
             f"Base model `{cfg['model']}`, adapter `{cfg['adapter']}`, {pr['n_pairs']} preference pairs "
             f"({pr['n_rows']} replies), beta = {num(pr['beta'])}; D-LEAF knobs {cfg['dleaf']}. "
             f"D-LEAF flagged {num(pr['flag_rate'])} of (reply position, layer) cells and corrected "
             f"{num(pr['corrected_share'])} of (position, layer, head) cells.", "",
             f"Intervals: bootstrap percentile, {int(100 * proto['confidence'])}%, {proto['n_resamples']} resamples "
             f"of pairs (token level: of replies). p: two-sided permutation p-value, {proto['permutations']} random "
             "re-pairings of the pairs (tests \"r_D carries no information about r_theta\"). Numbers: three decimals, "
             "scientific notation below 0.01.", "", *TERMS, "",
             "## D-LEAF as a DPO step", "",
             "| policy | DPO loss - log 2 | reward accuracy (sign-test p) | ties | mean margin | mean r(chosen) | "
             "mean r(rejected) |", "|---|---|---|---|---|---|---|"]
    for name, d in pr["dpo"].items():
        lines.append(f"| {name} | {num(d['loss'] - LOG2)} | {num(d['accuracy'])} ({num(d['accuracy_p_value'])}) | "
                     f"{num(d['ties'])} | {num(d['margin'])} | {num(d['chosen'])} | {num(d['rejected'])} |")
    lines.append(f"\nlog 2 = {LOG2:.6f} is the DPO loss of the base model itself (every reward 0).")
    if "curve" in pr:
        lines += ["", "Loss over gamma (D-LEAF, adapter off):", "", "| gamma | DPO loss - log 2 | accuracy | margin |",
                  "|---|---|---|---|"]
        for c in pr["curve"]:
            lines.append(f"| {num(c['gamma'])} | {num(c['loss'] - LOG2)} | {num(c['accuracy'])} | "
                         f"{num(c['margin'])} |")
        s = pr["slope"]
        fd = s["finite_difference"]
        lines += ["", f"Slope dL/dgamma at 0: autograd {num(s['slope'])}; central difference (h = {num(fd['h'])}) "
                      f"{num(fd['central'])}; forward difference {num(fd['forward'])}; first step of the sweep "
                      f"{num(s['sweep_forward_difference'])}. {_slope_words(s['slope'])}"]
    lines += ["", "## Sequence level: r_D (or a null) against r_theta", "",
              "| compared with r_theta | Pearson | Spearman | Kendall |", "|---|---|---|---|"]
    for name, d in pr["sequence"].items():
        if name.startswith("length_vs"):
            continue
        lines.append(f"| {name} | " + " | ".join(interval(d[m]) for m in C.CORRELATIONS) + " |")
    lv = pr["sequence"]
    lines += ["", f"Reply length against r_theta: Spearman {interval(lv['length_vs_dpo'])}; against r_D: "
                  f"{interval(lv['length_vs_dleaf'])}. `dleaf_length_partial` correlates the residuals of both "
                  "rewards after a linear fit on reply length."]
    lines += ["", "## Pair level", "", "| policy | margin Pearson | margin Spearman | sign agreement (chance) | "
              "pairs with both margins nonzero |", "|---|---|---|---|---|"]
    for name, d in pr["pairs"].items():
        sa = d["sign_agreement"]
        sa_s = interval(sa) + (f" ({num(sa['chance'])})" if "chance" in sa else "")
        lines.append(f"| {name} | {interval(d['margins']['pearson'])} | {interval(d['margins']['spearman'])} | "
                     f"{sa_s} | {d['n_signed']} |")
    if "by_task" in pr:
        lines += ["", "## Per task (D-LEAF against the adapter)", "",
                  "| task | pairs | DPO loss - log 2, adapter / D-LEAF | accuracy adapter / D-LEAF (sign-test p) | "
                  "sequence Spearman | margin Spearman | sign agreement (chance) |", "|---|---|---|---|---|---|---|"]
        for task, d in pr["by_task"].items():
            sa = d["pairs"]["sign_agreement"]
            lines.append(f"| {task} | {d['n_pairs']} | {num(d['dpo']['adapter']['loss'] - LOG2)} / "
                         f"{num(d['dpo']['dleaf']['loss'] - LOG2)} | {num(d['dpo']['adapter']['accuracy'])} / "
                         f"{num(d['dpo']['dleaf']['accuracy'])} ({num(d['dpo']['dleaf']['accuracy_p_value'])}) | "
                         f"{interval(d['sequence']['spearman'])} | {interval(d['pairs']['margins']['spearman'])} | "
                         f"{interval(sa)}" + (f" ({num(sa['chance'])})" if "chance" in sa else "") + " |")
    sc = pr["scale"]
    lines += ["", "## Scale", "",
              (sc["note"] if sc.get("note") else
               f"r_theta ~ s r_D: s = {num(sc['s'])} [{num(sc['low'])}, {num(sc['high'])}], uncentred R^2 "
               f"{num(sc['r2'])}; D-LEAF's reward matches DPO's best at beta_D = s * beta = {num(sc['beta_match'])}"
               + (" (negative: the best-fitting multiple of r_D points away from r_theta)." if sc["s"] < 0 else "."))]
    for key, title in (("tokens", "D-LEAF"), ("tokens_random_target", "random-target null")):
        if key not in pr:
            continue
        lines += ["", f"## Token level ({title}): per-token reward against DPO's", "",
                  "| tokens | n (rows) | Pearson | Spearman | mean beta log pi_D/pi_0 | mean beta log pi_theta/pi_0 |",
                  "|---|---|---|---|---|---|"]
        for kind, d in pr[key].items():
            lines.append(f"| {kind} | {d['n_tokens']} ({d['n_rows']}) | {interval(d['pearson'])} | "
                         f"{interval(d['spearman'])} | {num(d['mean_dleaf'])} [{num(d['mean_dleaf_interval'][0])}, "
                         f"{num(d['mean_dleaf_interval'][1])}] | {num(d['mean_dpo'])} "
                         f"[{num(d['mean_dpo_interval'][0])}, {num(d['mean_dpo_interval'][1])}] |")
    m = pr["mechanism"]
    lines += ["", "## Mechanism: D-LEAF's correction frequency against DPO's image-mass change, per (layer, head)", "",
              f"{m['cells']} cells, {m['cells_corrected']} ever corrected, {m['n_positions']} reply positions."]
    for method in ("spearman", "kendall"):
        d = m[method]
        lines.append(f"- {method}: " + (d["note"] if d.get("note") else
                                        f"{num(d['estimate'])}, permutation p = {num(d['p_value'])}"))
    tk = m["top_k_overlap"]
    lines.append(f"- top-{m['k']} overlap: {num(tk['estimate'])} (chance {num(tk['chance'])}), one-sided permutation "
                 f"p = {num(tk['p_value'])}")
    if "generations" in report:
        g = report["generations"]
        lines += ["", f"## Free generations ({g['n']} greedy replies of the base model)", "",
                  f"Mean r_theta {num(g['mean_r_theta'])}, mean r_D {num(g['mean_r_D'])}.", "",
                  "| | Pearson | Spearman | Kendall |", "|---|---|---|---|",
                  "| r_D vs r_theta | " + " | ".join(interval(g["sequence"][mm]) for mm in C.CORRELATIONS) + " |",
                  "| length-partial | " + " | ".join(interval(g["sequence_length_partial"][mm])
                                                     for mm in C.CORRELATIONS) + " |"]
        if "tokens" in g:
            lines += ["", "| tokens | n (rows) | Pearson | Spearman | mean D | mean theta |",
                      "|---|---|---|---|---|---|"]
            for kind, d in g["tokens"].items():
                lines.append(f"| {kind} | {d['n_tokens']} ({d['n_rows']}) | {interval(d['pearson'])} | "
                             f"{interval(d['spearman'])} | {num(d['mean_dleaf'])} | {num(d['mean_dpo'])} |")
    if "held_out_check" in report:
        h = report["held_out_check"]
        lines += ["", f"Consistency: on the adapter's own {h['n']} held-out pairs, the DPO loss recorded at training "
                      f"is {h['recorded_loss']:.6f} and recomputed here {h['recomputed_loss']:.6f}; reward accuracy "
                      f"{num(h['recorded_accuracy'])} and {num(h['recomputed_accuracy'])}."]
    lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- figures
def clip_limits(values, quantile: float = 0.01, pad: float = 0.08) -> tuple[float, float]:
    """Axis limits that show the bulk of ``values``: the ``quantile`` and ``1 - quantile`` quantiles widened by
    ``pad`` of their range on each side, extended to include 0 and the extremes whenever those lie within 1.5 times
    the bulk's range (so only real outliers fall beyond the axes)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return -1.0, 1.0
    lo, hi = (float(q) for q in np.quantile(v, [quantile, 1 - quantile]))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = hi - lo or max(abs(hi), 1e-12)
    vmin, vmax = float(v.min()), float(v.max())
    if vmin >= lo - 0.5 * span:
        lo = min(lo, vmin)
    if vmax <= hi + 0.5 * span:
        hi = max(hi, vmax)
    span = hi - lo or max(abs(hi), 1e-12)
    return lo - pad * span, hi + pad * span


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
        (xlo, xhi), (ylo, yhi) = clip_limits(rd), clip_limits(rt)
        outside = 0
        for rows, label, marker in ((a["chosen"], "chosen", "o"), (a["rejected"], "rejected", "s")):
            x, y = rd[rows], rt[rows]
            out_x, out_y = (x < xlo) | (x > xhi), (y < ylo) | (y > yhi)
            inside = ~(out_x | out_y)
            outside += int((~inside).sum())
            dots = ax.scatter(x[inside], y[inside], s=8, alpha=0.6, marker=marker, label=label)
            if (~inside).any():  # beyond the axes: drawn on the edge, hollow
                ex, ey = 0.015 * (xhi - xlo), 0.015 * (yhi - ylo)
                ax.scatter(np.clip(x[~inside], xlo + ex, xhi - ex), np.clip(y[~inside], ylo + ey, yhi - ey), s=18,
                           marker=marker,
                           facecolors="none", edgecolors=dots.get_facecolor()[0], linewidths=0.8)
        ax.set_xlim(xlo, xhi), ax.set_ylim(ylo, yhi)
        ax.axhline(0, color="grey", lw=0.5), ax.axvline(0, color="grey", lw=0.5)
        name = "dleaf" if key == "r_dleaf" else "random_target"
        pe = pr["sequence"][name]["pearson"]
        note = f"\n{outside} beyond the axes, drawn hollow at the edge" if outside else ""
        ax.set_title(f"{title}: Pearson {interval(pe)}{note}", fontsize=8)
        ax.set_xlabel(f"r = beta log pi/pi_0 ({title})"), ax.set_ylabel("r_theta (DPO adapter)")
        ax.ticklabel_format(style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, out / "scatter.png", dpi=120, bbox_inches="tight"), plt.close(fig)
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
        save_figure_atomic(fig, out / "loss_gamma.png", dpi=120, bbox_inches="tight"), plt.close(fig)
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
    save_figure_atomic(fig, out / "heads.png", dpi=120, bbox_inches="tight"), plt.close(fig)
    written.append("heads.png")
    return written


def write_report(report: dict, out: str | Path) -> list[str]:
    """``correspondence.json`` (everything, arrays included), ``correspondence.md`` and the figures, atomically."""
    out = Path(out)
    files = plot_report(report, out)
    write_json_atomic(report, out / "correspondence.json")  # strict JSON: an undefined number is null
    write_text_atomic(report_markdown(report), out / "correspondence.md")
    return ["correspondence.json", "correspondence.md", *files]


def _slope_words(slope: float) -> str:
    """What the sign of the loss's slope at gamma 0 says (the report used to print only the negative case's meaning,
    which read as a verdict whatever the sign)."""
    if slope < 0:
        return "Negative: D-LEAF's correction descends the DPO loss."
    if slope > 0:
        return "Positive: D-LEAF's correction ascends the DPO loss (a descent step would have a negative slope)."
    return "Zero: D-LEAF's correction leaves the DPO loss flat at first order."
