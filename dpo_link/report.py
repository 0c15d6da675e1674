"""The correspondence report: D-LEAF against a trained DPO adapter on preference pairs (and on free generations),
every statistic of THEORY.md point 4 with its interval and null, as JSON, markdown and figures.

:func:`measure_pairs` scores each pair's replies under pi_0 (adapter off), pi_theta (adapter on), pi_D (D-LEAF,
adapter off) and two nulls of matched size (D-LEAF's sites and gamma fused toward a random head; D-LEAF at random
layers at its own measured flag rate), then computes :mod:`dpo_link.correspondence`'s statistics and
:mod:`dpo_link.dleaf_dpo`'s loss curve and slope. :func:`measure_generations` does the sequence- and token-level
part on the base model's own greedy replies. :func:`write_report` writes ``correspondence.json``,
``correspondence.md`` and the figures, each atomically.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dleaf.config import DLeafConfig
from dleaf.io import write_json_atomic, write_text_atomic

from . import correspondence as C
from . import dleaf_dpo
from .reward_shift import (GROUNDED, HALLUCINATED, KIND_NAMES, Policy, flag_rate, pair_batches, random_target_factory,
                           response_batches, score_rows, token_kinds)

NULLS = ("random_target", "random_layers")


@dataclasses.dataclass(frozen=True)
class CorrespondenceProtocol:
    """What fixes a correspondence run (recorded with its results)."""

    beta: float = 0.1
    gammas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    fd_step: float = 1e-2
    batch_size: int = 16
    n_resamples: int = 2000
    permutations: int = 2000
    confidence: float = 0.95
    seed: int = 0
    top_k: int | None = None

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not self.gammas or 0.0 not in self.gammas:
            raise ValueError(f"gammas must include 0 (the reference point of the curve), got {self.gammas}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")
        if self.n_resamples < 10:
            raise ValueError(f"n_resamples must be >= 10, got {self.n_resamples}")


def _pair_index(batches) -> tuple[list[int], list[int]]:
    """Positions of each pair's chosen and rejected row in the scored order (per batch: chosen block, rejected)."""
    chosen, rejected, offset = [], [], 0
    for _, sl in batches:
        n = sl.stop - sl.start
        chosen += list(range(offset, offset + n))
        rejected += list(range(offset + n, offset + 2 * n))
        offset += 2 * n
    return chosen, rejected


def _kinds(rr, objects: Sequence[Sequence[str]] | None, tokenizer, vocabulary) -> list[np.ndarray] | None:
    if objects is None or vocabulary is None:
        return None
    return [token_kinds(ids, tokenizer, objs, vocabulary) for ids, objs in zip(rr.token_ids, objects)]


def _kw(p: CorrespondenceProtocol) -> dict:
    return {"n_resamples": p.n_resamples, "confidence": p.confidence, "seed": p.seed}


def _watched(config: DLeafConfig, n_layers: int) -> list[int]:
    return list(range(config.layer_start, n_layers if config.layer_end is None else config.layer_end))


def measure_pairs(peft_model, processor, rows: Sequence[dict], config: DLeafConfig,
                  protocol: CorrespondenceProtocol = CorrespondenceProtocol(), vocabulary: Sequence[str] | None = None,
                  progress=None, curve: bool = True) -> dict:
    """Everything on preference pairs (TRL vision rows; an ``objects`` column enables the token-level split by
    grounded and hallucinated object tokens against ``vocabulary``). Returns a JSON-ready dict; ``arrays`` holds
    the per-row rewards and the (L, H) maps the figures need."""
    say = progress or (lambda msg: None)
    p = protocol
    if len(rows) < C.MIN_ROWS:
        raise ValueError(f"the correspondence needs at least {C.MIN_ROWS} preference pairs, got {len(rows)}")
    t0 = time.time()
    batches = list(pair_batches(rows, processor, p.batch_size))
    say(f"scoring {len(rows)} pairs in {len(batches)} batches (base, adapter, D-LEAF, random-target null)")
    policies = [Policy("dleaf", config, trace=True),
                Policy("random_target", config, factory=random_target_factory(p.seed))]
    rr = score_rows(peft_model, batches, p.beta, policies)
    n_layers = rr.mass["base"][0].shape[1]
    rate = flag_rate(rr.flagged["dleaf"], _watched(config, n_layers))
    say(f"D-LEAF flag rate {rate:.4f}; scoring the random-layer null at that rate")
    rl_cfg = dataclasses.replace(config, localization="random", random_rate=float(rate) if rate == rate else 0.0,
                                 seed=p.seed)
    nulls = score_rows(peft_model, batches, p.beta, [Policy("random_layers", rl_cfg)], adapter=False, mass=False)
    rr.logp["random_layers"] = nulls.logp["random_layers"]
    ci, ri = _pair_index(batches)
    objects = [list(r["objects"]) for r in rows] if all("objects" in r for r in rows) else None
    kinds = _kinds(rr, None if objects is None else [objects[i] for i in _row_order(batches)],
                   getattr(processor, "tokenizer", processor), vocabulary)

    r_theta = rr.rewards("adapter")
    r = {name: rr.rewards(name) for name in ("dleaf", *NULLS)}
    lengths = rr.lengths().astype(np.float64)
    kw = _kw(p)
    out: dict = {"n_pairs": len(rows), "n_rows": len(rr), "beta": p.beta, "flag_rate": rate,
                 "corrected_share": float(np.mean(np.concatenate([c.reshape(-1) for c in rr.corrected["dleaf"]])))}
    say("DPO loss and accuracy of each policy")
    out["dpo"] = {name: dleaf_dpo.dpo_loss(v[ci], v[ri]) for name, v in [("adapter", r_theta), *r.items()]}
    say("sequence-level correlations")
    # every reply counts, and a pair (its chosen and rejected replies: one image, one prompt) is the unit that the
    # bootstrap resamples and the permutation shuffles
    by_pair = lambda v: np.stack([np.asarray(v)[ci], np.asarray(v)[ri]], axis=1)  # noqa: E731
    r = {name: by_pair(v) for name, v in r.items()}
    r_theta_rows, r_theta, lengths = r_theta, by_pair(r_theta), by_pair(lengths)
    seq = {}
    for name, v in r.items():
        seq[name] = C.correlations(v, r_theta, permutations=p.permutations, names=(f"r_{name}", "r_theta"), **kw)
    seq["dleaf_length_partial"] = C.correlations(C.residualize(r["dleaf"], lengths), C.residualize(r_theta, lengths),
                                                 permutations=p.permutations,
                                                 names=("r_D | length", "r_theta | length"),
                                                 **kw)
    seq["matched_noise"] = C.correlations(C.matched_noise(r["dleaf"], p.seed), r_theta, permutations=p.permutations,
                                          names=("noise", "r_theta"), **kw)
    seq["shuffled"] = C.correlations(C.shuffled(r["dleaf"], p.seed), r_theta, permutations=p.permutations,
                                     names=("shuffled r_D", "r_theta"), **kw)
    seq["length_vs_dpo"] = C.correlation(lengths, r_theta, "spearman", permutations=0,
                                         names=("length", "r_theta"), **kw)
    seq["length_vs_dleaf"] = C.correlation(lengths, r["dleaf"], "spearman", permutations=0,
                                           names=("length", "r_D"), **kw)
    out["sequence"] = seq
    say("pair-level agreement")
    out["pairs"] = {name: C.pair_agreement(v[:, 0], v[:, 1], r_theta[:, 0], r_theta[:, 1],
                                           permutations=p.permutations, **kw) for name, v in r.items()}
    sh = C.shuffled(np.arange(len(ci)), p.seed)
    out["pairs"]["shuffled"] = C.pair_agreement(r["dleaf"][sh, 0], r["dleaf"][sh, 1], r_theta[:, 0], r_theta[:, 1],
                                                permutations=p.permutations, **kw)
    tasks = [row.get("task") for row in rows]
    if all(t is not None for t in tasks) and len(set(tasks)) > 1:
        say("per task")
        out["by_task"] = {}
        for task in sorted(set(tasks)):
            idx = [i for i, t in enumerate(tasks) if t == task]
            if len(idx) < C.MIN_ROWS:
                continue
            out["by_task"][task] = {
                "n_pairs": len(idx),
                "dpo": {name: dleaf_dpo.dpo_loss(v[idx, 0], v[idx, 1])
                        for name, v in [("adapter", r_theta), ("dleaf", r["dleaf"])]},
                "sequence": C.correlations(r["dleaf"][idx], r_theta[idx], permutations=p.permutations,
                                           names=("r_D", "r_theta"), **kw),
                "pairs": C.pair_agreement(r["dleaf"][idx, 0], r["dleaf"][idx, 1], r_theta[idx, 0], r_theta[idx, 1],
                                          permutations=p.permutations, **kw)}
    say("scale")
    out["scale"] = C.scale_fit(r["dleaf"], r_theta, p.beta, **kw)
    if kinds is not None:
        say("token-level correlations")
        names = {GROUNDED: KIND_NAMES[GROUNDED], HALLUCINATED: KIND_NAMES[HALLUCINATED]}
        out["tokens"] = C.token_correlations(rr.token_rewards("dleaf"), rr.token_rewards("adapter"), kinds, names,
                                             n_resamples=min(p.n_resamples, 1000), confidence=p.confidence, seed=p.seed)
        out["tokens_random_target"] = C.token_correlations(rr.token_rewards("random_target"),
                                                           rr.token_rewards("adapter"), kinds, names,
                                                           n_resamples=min(p.n_resamples, 1000),
                                                           confidence=p.confidence, seed=p.seed)
    say("mechanism")
    maps = C.head_maps(rr.corrected["dleaf"], rr.mass["base"], rr.mass["adapter"])
    out["mechanism"] = C.mechanism(maps["correction_frequency"], maps["mass_change"], p.top_k, p.permutations, p.seed)
    out["mechanism"]["n_positions"] = maps["n_positions"]
    if curve:
        say(f"loss over gamma ({len(p.gammas)} values), slope at 0 by autograd and by finite difference")
        pair_batches_only = [b for b, _ in batches]
        out["curve"] = dleaf_dpo.loss_curve(peft_model, pair_batches_only, p.beta, config, p.gammas)
        out["slope"] = dleaf_dpo.loss_slope(peft_model, pair_batches_only, p.beta, config)
        out["slope"]["finite_difference"] = dleaf_dpo.finite_difference_slope(peft_model, pair_batches_only, p.beta,
                                                                              config, p.fd_step)
        out["slope"]["sweep_forward_difference"] = dleaf_dpo.sweep_slope(out["curve"])
    out["seconds"] = time.time() - t0
    rows_of = lambda v: np.asarray(rr.rewards(v)).tolist()  # noqa: E731
    out["arrays"] = {"r_theta": r_theta_rows.tolist(), **{f"r_{k}": rows_of(k) for k in r},
                     "chosen": ci, "rejected": ri, "lengths": rr.lengths().tolist(),
                     "correction_frequency": maps["correction_frequency"].tolist(),
                     "mass_change": maps["mass_change"].tolist(), "mass_base": maps["mass_base"].tolist()}
    return out


def _row_order(batches) -> list[int]:
    """Pair index of each scored row (per batch: its pairs' chosen rows, then their rejected rows)."""
    order = []
    for _, sl in batches:
        idx = list(range(sl.start, sl.stop))
        order += idx + idx
    return order


def measure_generations(peft_model, processor, rows: Sequence[dict], config: DLeafConfig,
                        protocol: CorrespondenceProtocol = CorrespondenceProtocol(),
                        vocabulary: Sequence[str] | None = None) -> dict:
    """Sequence- and token-level agreement on single replies (rows with ``images``, ``prompt``, ``response`` and
    optionally ``objects``), e.g. the base model's own greedy captions."""
    p = protocol
    if len(rows) < C.MIN_ROWS:
        raise ValueError(f"need at least {C.MIN_ROWS} replies, got {len(rows)}")
    batches = list(response_batches(rows, processor, p.batch_size))
    rr = score_rows(peft_model, batches, p.beta, [Policy("dleaf", config)], mass=False)
    r_theta, r_d = rr.rewards("adapter"), rr.rewards("dleaf")
    lengths = rr.lengths().astype(np.float64)
    kw = _kw(p)
    out = {"n": len(rows), "mean_r_theta": float(r_theta.mean()), "mean_r_D": float(r_d.mean()),
           "sequence": C.correlations(r_d, r_theta, permutations=p.permutations, names=("r_D", "r_theta"), **kw),
           "sequence_length_partial": C.correlations(C.residualize(r_d, lengths), C.residualize(r_theta, lengths),
                                                     permutations=p.permutations,
                                                     names=("r_D | length", "r_theta | length"), **kw)}
    if all("objects" in r for r in rows) and vocabulary is not None:
        kinds = _kinds(rr, [r["objects"] for r in rows], getattr(processor, "tokenizer", processor), vocabulary)
        out["tokens"] = C.token_correlations(rr.token_rewards("dleaf"), rr.token_rewards("adapter"), kinds,
                                             {GROUNDED: "grounded", HALLUCINATED: "hallucinated"},
                                             n_resamples=min(p.n_resamples, 1000), confidence=p.confidence,
                                             seed=p.seed)
    out["arrays"] = {"r_theta": r_theta.tolist(), "r_dleaf": r_d.tolist()}
    return out


# ------------------------------------------------------------------------------------------------- markdown
def _f(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _ci(e: dict, digits: int = 3) -> str:
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
        lines.append(f"| {name} | " + " | ".join(_ci(d[m]) for m in C.CORRELATIONS) + " |")
    lv = pr["sequence"]
    lines += ["", f"Reply length against r_theta: Spearman {_ci(lv['length_vs_dpo'])}; against r_D: "
                  f"{_ci(lv['length_vs_dleaf'])}. `dleaf_length_partial` correlates the residuals of both rewards "
                  "after a linear fit on reply length."]
    lines += ["", "## Pair level", "", "| policy | margin Pearson | margin Spearman | sign agreement (chance) | "
              "pairs with both margins nonzero |", "|---|---|---|---|---|"]
    for name, d in pr["pairs"].items():
        sa = d["sign_agreement"]
        sa_s = _ci(sa) + (f" ({sa['chance']:.3f})" if "chance" in sa else "")
        lines.append(f"| {name} | {_ci(d['margins']['pearson'])} | {_ci(d['margins']['spearman'])} | {sa_s} | "
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
                         f"{_ci(d['sequence']['spearman'])} | "
                         f"{_ci(d['pairs']['margins']['spearman'])} | {_ci(sa)}"
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
            lines.append(f"| {kind} | {d['n_tokens']} ({d['n_rows']}) | {_ci(d['pearson'])} | {_ci(d['spearman'])} | "
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
                  "| r_D vs r_theta | " + " | ".join(_ci(g["sequence"][mm]) for mm in C.CORRELATIONS) + " |",
                  "| length-partial | " + " | ".join(_ci(g["sequence_length_partial"][mm]) for mm in C.CORRELATIONS)
                  + " |"]
        if "tokens" in g:
            lines += ["", "| tokens | n (rows) | Pearson | Spearman | mean D | mean theta |",
                      "|---|---|---|---|---|---|"]
            for kind, d in g["tokens"].items():
                lines.append(f"| {kind} | {d['n_tokens']} ({d['n_rows']}) | {_ci(d['pearson'])} | "
                             f"{_ci(d['spearman'])} | {_f(d['mean_dleaf'], 4)} | {_f(d['mean_dpo'], 4)} |")
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
        ax.set_title(f"{title}: Pearson {_ci(pe, 2)}", fontsize=9)
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


# ---------------------------------------------------------------------------------------------- study hook
def study_step(out_dir: str | Path, n_pairs: int = 100, knobs: dict | None = None, seed: int = 0,
               model: str = "organism", adapter: str | Path | None = None, dataset: str | Path | None = None,
               dataset_split: str = "test", column_map: dict | None = None, dtype: str = "float32") -> dict | None:
    """The correspondence step of ``scripts/study.py``, the report written to ``out_dir``.

    On the organism (the default): the committed organism and its adapter (``data/organism_dpo``) on the adapter's
    held-out pairs (the first ``n_pairs``); None when no adapter is committed. On a real checkpoint (``model`` a hub
    id or folder): ``adapter`` trained on it and the first ``n_pairs`` held-out preference pairs of ``dataset``
    (see :func:`dpo_link.pairs.load_preference_dataset`), on the GPU when there is one.

    Returns ``summary`` (one line), ``agrees`` (D-LEAF is a DPO descent step on these pairs: negative slope at
    gamma 0, loss below log 2 at its gamma, reward accuracy above 1/2 by a sign test at 5%) and ``markdown``.
    """
    import json

    import torch

    from dleaf.organism import world
    from dleaf.organism.build import DATA_DIR, load_organism

    from .pairs import EVAL_WORLD_SEED, OrganismPairConfig, load_preference_dataset, organism_examples
    from .reward_shift import load_adapter

    organism = model == "organism"
    adapter = Path(adapter) if adapter else (DATA_DIR / "organism_dpo" if organism else None)
    if adapter is None or not (adapter / "adapter_config.json").is_file():
        if organism:
            return None
        raise FileNotFoundError(f"no PEFT adapter at {adapter}: pass the output_dir of scripts/train_dpo.py")
    if not organism and dataset is None:
        raise ValueError(f"the correspondence suite on {model!r} needs held-out preference pairs (dataset=)")
    run = json.loads((adapter / "dpo_run.json").read_text()) if (adapter / "dpo_run.json").is_file() else {}
    beta = float(run.get("config", {}).get("dpo", {}).get("beta") or 0.1)
    if organism:
        base, processor = load_organism()
        pair_cfg = OrganismPairConfig(n=n_pairs, world_seed=EVAL_WORLD_SEED)
        rows, vocabulary = organism_examples(pair_cfg), world.OBJECTS
        data = {"source": "organism held-out pairs", "config": dataclasses.asdict(pair_cfg)}
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(model)
        base = AutoModelForImageTextToText.from_pretrained(model, attn_implementation="eager",
                                                           dtype=getattr(torch, dtype)).eval()
        if torch.cuda.is_available():
            base.to("cuda")
        rows = [dict(r) for r in load_preference_dataset(dataset, dataset_split, column_map, limit=n_pairs)]
        vocabulary = None
        data = {"source": "disk", "path": str(dataset), "split": dataset_split, "n": len(rows)}
    peft_model = load_adapter(base, adapter)
    config = DLeafConfig(**(knobs or {}))
    protocol = CorrespondenceProtocol(beta=beta, seed=seed)
    pr = measure_pairs(peft_model, processor, rows, config, protocol, vocabulary)
    report = {"config": {"model": "data/organism" if organism else model,
                         "adapter": "data/organism_dpo" if organism and adapter == DATA_DIR / "organism_dpo"
                         else str(adapter), "data": data,
                         "dleaf": knobs or "defaults", "dleaf_config": dataclasses.asdict(config),
                         "protocol": dataclasses.asdict(protocol)},
              "pairs_report": pr}
    write_report(report, out_dir)
    d, a = pr["dpo"]["dleaf"], pr["dpo"]["adapter"]
    rho = pr["sequence"]["dleaf"]["spearman"]
    slope = pr["slope"]["slope"]
    agrees = bool(slope < 0 and d["loss"] < math.log(2) and d["accuracy"] > 0.5 and d["accuracy_p_value"] < 0.05)
    summary = (f"D-LEAF's DPO loss {d['loss']:.6f} against log 2 = {math.log(2):.6f} (adapter {a['loss']:.4f}), "
               f"reward accuracy {d['accuracy']:.3f} (adapter {a['accuracy']:.3f}), slope at gamma 0 {slope:.3g}; "
               f"Spearman of r_D and r_theta {_ci(rho)} on {pr['n_pairs']} held-out pairs")
    return {"summary": summary, "agrees": agrees, "markdown": report_markdown(report)}
