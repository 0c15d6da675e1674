"""The correspondence suite: D-LEAF against a trained DPO adapter, measured in one function that both
``scripts/correspondence.py`` and the study call (:func:`run_suite`).

What it measures (every term is defined in ``docs/correspondence.md``): each preference pair's replies are scored
under pi_0 (the adapter off), pi_theta (the adapter on), pi_D (D-LEAF, adapter off) and two nulls of matched size
(D-LEAF's sites and gamma fused toward a random head; D-LEAF at random layers at its own measured flag rate); then
:mod:`dpo_link.correspondence`'s statistics and :mod:`dpo_link.dleaf_dpo`'s loss curve and slope are computed
(:func:`measure_pairs`). On the organism, the same sequence- and token-level statistics are also taken on the base
model's own greedy captions (:func:`measure_generations`). :mod:`dpo_link.report` renders the result.

:func:`prepare` checks every input (knobs, protocol, adapter files, dataset path, counts, output folder) before any
model is loaded; :func:`run` loads the model and the adapter, measures and writes the report.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dleaf import generation, models
from dleaf.config import DLeafConfig
from dleaf.io import InputError, read_json
from dleaf.resources import data_path
from dleaf.settings import Setting, check_knobs

from . import correspondence as C
from . import dleaf_dpo
from .collate import pair_batches, response_batches, response_rows
from .data import check_dataset_path, load_preference_dataset, parse_column_map
from .rewards import (GROUNDED, HALLUCINATED, KIND_NAMES, Policy, check_adapter_base, check_adapter_files, dpo_loss,
                      flag_rate, load_adapter, random_target_factory, score_rows, token_kinds)

NULLS = ("random_target", "random_layers")
ORGANISM = "organism"
#: the adapter the organism ships with (a folder of the project's data)
ORGANISM_ADAPTER = "organism_dpo"


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
        if not (isinstance(self.beta, (int, float)) and self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be a positive number, got {self.beta}")
        if not self.gammas or 0.0 not in self.gammas:
            raise ValueError(f"gammas must include 0 (the reference point of the curve), got {self.gammas}")
        if not all(math.isfinite(g) for g in self.gammas):
            raise ValueError(f"gammas must be finite numbers, got {self.gammas}")
        if not self.fd_step > 0:
            raise ValueError(f"fd_step must be positive, got {self.fd_step}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")
        if self.n_resamples < 10:
            raise ValueError(f"n_resamples must be >= 10, got {self.n_resamples}")
        if self.permutations < 0:
            raise ValueError(f"permutations must be >= 0 (0 skips the p-values), got {self.permutations}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


# ------------------------------------------------------------------------------------------------- measuring
def _pair_index(batches) -> tuple[list[int], list[int]]:
    """Positions of each pair's chosen and rejected row in the scored order (per batch: chosen block, rejected)."""
    chosen, rejected, offset = [], [], 0
    for _, sl in batches:
        n = sl.stop - sl.start
        chosen += list(range(offset, offset + n))
        rejected += list(range(offset + n, offset + 2 * n))
        offset += 2 * n
    return chosen, rejected


def _row_order(batches) -> list[int]:
    """Pair index of each scored row (per batch: its pairs' chosen rows, then their rejected rows)."""
    order = []
    for _, sl in batches:
        idx = list(range(sl.start, sl.stop))
        order += idx + idx
    return order


def _kinds(rr, objects: Sequence[Sequence[str]] | None, tokenizer, vocabulary) -> list[np.ndarray] | None:
    if objects is None or vocabulary is None:
        return None
    return [token_kinds(ids, tokenizer, objs, vocabulary) for ids, objs in zip(rr.token_ids, objects)]


def _kw(p: CorrespondenceProtocol) -> dict:
    return {"n_resamples": p.n_resamples, "confidence": p.confidence, "seed": p.seed}


def _watched(config: DLeafConfig, n_layers: int) -> list[int]:
    return list(range(config.layer_start, n_layers if config.layer_end is None else config.layer_end))


def by_pair(values, chosen: Sequence[int], rejected: Sequence[int]) -> np.ndarray:
    """Per-row values as a (pairs, 2) array, [chosen, rejected] per pair: the unit the statistics resample and
    permute (a pair's two replies share an image and a prompt, so they are not independent)."""
    v = np.asarray(values)
    return np.stack([v[list(chosen)], v[list(rejected)]], axis=1)


def measure_pairs(peft_model, processor, rows: Sequence[dict], config: DLeafConfig,
                  protocol: CorrespondenceProtocol = CorrespondenceProtocol(), vocabulary: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None, curve: bool = True) -> dict:
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

    r_theta_rows = rr.rewards("adapter")
    r_rows = {name: rr.rewards(name) for name in ("dleaf", *NULLS)}
    kw = _kw(p)
    out: dict = {"n_pairs": len(rows), "n_rows": len(rr), "beta": p.beta, "flag_rate": rate,
                 "corrected_share": float(np.mean(np.concatenate([c.reshape(-1) for c in rr.corrected["dleaf"]])))}
    say("DPO loss and accuracy of each policy")
    out["dpo"] = {name: dpo_loss(v[ci], v[ri]) for name, v in [("adapter", r_theta_rows), *r_rows.items()]}
    say("sequence-level correlations")
    # every reply counts, and a pair (its chosen and rejected replies: one image, one prompt) is the unit that the
    # bootstrap resamples and the permutation shuffles
    r = {name: by_pair(v, ci, ri) for name, v in r_rows.items()}
    r_theta, lengths = by_pair(r_theta_rows, ci, ri), by_pair(rr.lengths().astype(np.float64), ci, ri)
    corr = dict(permutations=p.permutations, **kw)
    seq = {name: C.correlations(v, r_theta, names=(f"r_{name}", "r_theta"), **corr) for name, v in r.items()}
    seq["dleaf_length_partial"] = C.correlations(C.residualize(r["dleaf"], lengths), C.residualize(r_theta, lengths),
                                                 names=("r_D | length", "r_theta | length"), **corr)
    seq["matched_noise"] = C.correlations(C.matched_noise(r["dleaf"], p.seed), r_theta, names=("noise", "r_theta"),
                                          **corr)
    seq["shuffled"] = C.correlations(C.shuffled(r["dleaf"], p.seed), r_theta, names=("shuffled r_D", "r_theta"),
                                     **corr)
    seq["length_vs_dpo"] = C.correlation(lengths, r_theta, "spearman", permutations=0, names=("length", "r_theta"),
                                         **kw)
    seq["length_vs_dleaf"] = C.correlation(lengths, r["dleaf"], "spearman", permutations=0, names=("length", "r_D"),
                                           **kw)
    out["sequence"] = seq
    say("pair-level agreement")
    out["pairs"] = {name: C.pair_agreement(v[:, 0], v[:, 1], r_theta[:, 0], r_theta[:, 1], **corr)
                    for name, v in r.items()}
    sh = C.shuffled(np.arange(len(ci)), p.seed)
    out["pairs"]["shuffled"] = C.pair_agreement(r["dleaf"][sh, 0], r["dleaf"][sh, 1], r_theta[:, 0], r_theta[:, 1],
                                                **corr)
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
                "dpo": {name: dpo_loss(v[idx, 0], v[idx, 1]) for name, v in [("adapter", r_theta), ("dleaf", r["dleaf"])]},
                "sequence": C.correlations(r["dleaf"][idx], r_theta[idx], names=("r_D", "r_theta"), **corr),
                "pairs": C.pair_agreement(r["dleaf"][idx, 0], r["dleaf"][idx, 1], r_theta[idx, 0], r_theta[idx, 1],
                                          **corr)}
    say("scale")
    out["scale"] = C.scale_fit(r["dleaf"], r_theta, p.beta, **kw)
    if kinds is not None:
        say("token-level correlations")
        names = {GROUNDED: KIND_NAMES[GROUNDED], HALLUCINATED: KIND_NAMES[HALLUCINATED]}
        tok_kw = dict(n_resamples=min(p.n_resamples, 1000), confidence=p.confidence, seed=p.seed)
        out["tokens"] = C.token_correlations(rr.token_rewards("dleaf"), rr.token_rewards("adapter"), kinds, names,
                                             **tok_kw)
        out["tokens_random_target"] = C.token_correlations(rr.token_rewards("random_target"),
                                                           rr.token_rewards("adapter"), kinds, names, **tok_kw)
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
    out["arrays"] = {"r_theta": r_theta_rows.tolist(), **{f"r_{k}": v.tolist() for k, v in r_rows.items()},
                     "chosen": ci, "rejected": ri, "lengths": rr.lengths().tolist(),
                     "correction_frequency": maps["correction_frequency"].tolist(),
                     "mass_change": maps["mass_change"].tolist(), "mass_base": maps["mass_base"].tolist()}
    return out


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


def held_out_check(pairs_report: dict, run_record: dict, n_pairs: int) -> dict | None:
    """The adapter's held-out DPO loss and reward accuracy as recorded at training (``dpo_run.json``) beside the same
    numbers recomputed here, when the pairs scored here begin with that held-out set; else None."""
    by_task = run_record.get("eval_by_task", {}).get("all")
    recorded_n = (run_record.get("data", {}).get("eval", {}).get("config") or {}).get("n")
    if not by_task or by_task.get("n") != recorded_n or recorded_n is None or recorded_n > n_pairs:
        return None
    arrays = pairs_report["arrays"]
    r_theta = np.asarray(arrays["r_theta"])
    first = dpo_loss(r_theta[arrays["chosen"][:recorded_n]], r_theta[arrays["rejected"][:recorded_n]])
    return {"n": recorded_n, "recorded_loss": by_task["loss"], "recomputed_loss": first["loss"],
            "recorded_accuracy": by_task["rewards/accuracies"], "recomputed_accuracy": first["accuracy"]}


# ------------------------------------------------------------------------------------------------ one run
@dataclasses.dataclass(frozen=True)
class Prepared:
    """Every input of a run, checked (see :func:`prepare`)."""

    model: str
    adapter: Path
    dataset: str
    dataset_split: str
    column_map: Any
    n_pairs: int
    n_generations: int
    knobs: dict
    config: DLeafConfig
    protocol: CorrespondenceProtocol
    run_record: dict
    output_dir: Path
    dtype: str
    device: str | None
    command: str | None
    split_flag: str = "--dataset_split"

    @property
    def organism_data(self) -> bool:
        return self.dataset == ORGANISM


def _recorded_beta(run_record: dict) -> float | None:
    beta = run_record.get("config", {}).get("dpo", {}).get("beta")
    return float(beta) if beta is not None else None


def prepare(output_dir: str | Path, model: str = ORGANISM, adapter: str | Path | None = None,
            dataset: str | Path = ORGANISM, dataset_split: str = "test", column_map: Any = None,
            n_pairs: int = 300, n_generations: int = 100, knobs: dict | None = None, beta: float | None = None,
            gammas: Sequence[float] = CorrespondenceProtocol.gammas, fd_step: float = 1e-2, batch_size: int = 16,
            n_resamples: int = 2000, permutations: int = 2000, confidence: float = 0.95, seed: int = 0,
            top_k: int | None = None, dtype: str = "float32", device: str | None = None,
            command: str | None = None, split_flag: str = "--dataset_split") -> Prepared:
    """Check every input of a correspondence run without loading any model; a :class:`dleaf.io.InputError` (a
    ValueError) names what is wrong.

    ``model``: ``organism`` or a checkpoint folder / hub id. ``adapter``: the PEFT adapter trained on it (default
    for the organism: its committed adapter). ``dataset``: ``organism`` (the adapter's held-out ground-truth pairs,
    as its ``dpo_run.json`` records them) or a preference dataset on disk. ``beta``: default the adapter's training
    beta (from ``dpo_run.json``), else 0.1. ``n_generations``: the organism's own greedy captions of that many
    adversarial images are scored too (0 skips them; only with organism data). ``split_flag``: the option that
    sets ``dataset_split``, which an error about a missing split names (a single file is its own split).
    """
    try:
        knobs = check_knobs("dleaf", dict(knobs or {}))
        config = DLeafConfig(**knobs)
        output_dir = Path(output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise InputError(f"the output folder {output_dir} is a file")
        if n_pairs < C.MIN_ROWS:
            raise InputError(f"n_pairs must be at least {C.MIN_ROWS} (a correlation, its interval and its test need "
                             f"three pairs), got {n_pairs}")
        if n_generations < 0 or 0 < n_generations < C.MIN_ROWS:
            raise InputError(f"n_generations must be 0 (none) or at least {C.MIN_ROWS}, got {n_generations}")
        organism_model = str(model) == ORGANISM
        model_path = models.check_model(model)
        models.check_dtype(dtype)
        if adapter is None:
            if not organism_model:
                raise InputError(f"the correspondence suite on {model!r} needs the DPO adapter trained on it "
                                 "(--adapter)")
            adapter = data_path(ORGANISM_ADAPTER)
        adapter = Path(adapter)
        check_adapter_files(adapter)
        run_record = read_json(adapter / "dpo_run.json", "run record") if (adapter / "dpo_run.json").is_file() else {}
        check_adapter_base(adapter, model_path, run_record)
        if str(dataset) == ORGANISM:
            dataset = ORGANISM
        else:
            check_dataset_path(dataset, dataset_split, split_flag)
            parse_column_map(column_map)
            dataset = str(dataset)
        if n_generations and dataset != ORGANISM:
            n_generations = 0  # free generations need the images' ground truth: organism data only
        if beta is None:
            beta = _recorded_beta(run_record) or 0.1
        protocol = CorrespondenceProtocol(beta=float(beta), gammas=tuple(float(g) for g in gammas), fd_step=fd_step,
                                          batch_size=batch_size, n_resamples=n_resamples, permutations=permutations,
                                          confidence=confidence, seed=seed, top_k=top_k)
    except (FileNotFoundError, TypeError, ValueError) as e:
        raise e if isinstance(e, InputError) else InputError(str(e)) from None
    return Prepared(str(model), adapter, dataset, dataset_split, column_map, n_pairs, n_generations, knobs, config,
                    protocol, run_record, output_dir, dtype, device, command, split_flag)


def _portable(path) -> str:
    """A path as recorded in a report: relative to the working directory or to the project when inside one of
    them, else its last two parts (no machine's absolute paths in results)."""
    p = Path(path)
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        try:
            return str(p.resolve().relative_to(root.resolve()))
        except ValueError:
            continue
    return str(Path(*p.parts[-2:])) if p.is_absolute() else str(p)


def run(prep: Prepared, progress: Callable[[str], None] | None = None) -> dict:
    """Load the model and the adapter, measure everything (:func:`measure_pairs`, and on the organism
    :func:`measure_generations`), write the report (:func:`dpo_link.report.write_report`) to ``prep.output_dir``;
    returns the report."""
    from .report import write_report

    say = progress or (lambda msg: None)
    t0 = time.time()
    say(f"loading {prep.model} and the adapter {_portable(prep.adapter)}")
    model, processor = models.load(prep.model, attn_implementation="eager", dtype=prep.dtype, device=prep.device)
    peft_model = load_adapter(model, prep.adapter)
    vocabulary = None
    if prep.organism_data:
        from . import pairs as organism_pairs

        rows, data_info = organism_pairs.held_out_rows(prep.n_pairs, prep.run_record)
        vocabulary = organism_pairs.VOCABULARY
    else:
        rows = [dict(r) for r in load_preference_dataset(prep.dataset, prep.dataset_split, prep.column_map,
                                                         limit=prep.n_pairs, split_flag=prep.split_flag)]
        data_info = {"source": "disk", "path": _portable(prep.dataset), "split": prep.dataset_split,
                     "n": len(rows)}
    report: dict[str, Any] = {"config": {
        "model": "data/organism" if prep.model == ORGANISM else prep.model, "adapter": _portable(prep.adapter),
        "data": data_info, "dleaf": prep.knobs or "defaults", "dleaf_config": dataclasses.asdict(prep.config),
        "protocol": dataclasses.asdict(prep.protocol), **({"command": prep.command} if prep.command else {})}}
    report["pairs_report"] = measure_pairs(peft_model, processor, rows, prep.config, prep.protocol, vocabulary,
                                           progress=say)
    check = held_out_check(report["pairs_report"], prep.run_record, prep.n_pairs) if prep.organism_data else None
    if check:
        report["held_out_check"] = check
    if prep.n_generations > 0:
        say(f"greedy captions of {prep.n_generations} adversarial images (adapter off), then scoring them")
        images, prompts, objects = organism_pairs.caption_items(prep.n_generations)
        with peft_model.disable_adapter():
            replies = generation.generate_texts(peft_model.get_base_model(), processor, prompts, images, Setting(),
                                                max_new_tokens=80, batch_size=64)
        gen_rows = response_rows(images, prompts, replies, objects=objects)
        report["generations"] = measure_generations(peft_model, processor, gen_rows, prep.config, prep.protocol,
                                                    vocabulary)
    report["seconds"] = time.time() - t0
    write_report(report, prep.output_dir)
    return report


def run_suite(output_dir: str | Path, progress: Callable[[str], None] | None = None, **inputs) -> dict:
    """:func:`prepare` then :func:`run`: the whole suite in one call (``inputs`` are :func:`prepare`'s)."""
    return run(prepare(output_dir, **inputs), progress)


def verdict(report: dict) -> dict:
    """``summary`` (one line) and ``agrees``: whether D-LEAF is a DPO descent step on these pairs
    (:func:`dpo_link.dleaf_dpo.is_descent_step`: negative slope at gamma 0, DPO loss below log 2 at its configured
    gamma, reward accuracy above 1/2 by a sign test at 5%)."""
    from .report import interval, num

    pr = report["pairs_report"]
    d, a = pr["dpo"]["dleaf"], pr["dpo"]["adapter"]
    rho = pr["sequence"]["dleaf"]["spearman"]
    slope = pr["slope"]["slope"]
    summary = (f"D-LEAF's DPO loss {d['loss']:.6f} against log 2 = {math.log(2):.6f} (adapter {num(a['loss'])}), "
               f"reward accuracy {num(d['accuracy'])} (adapter {num(a['accuracy'])}), slope at gamma 0 {num(slope)}; "
               f"Spearman of r_D and r_theta {interval(rho)} on {pr['n_pairs']} held-out pairs")
    return {"summary": summary, "agrees": dleaf_dpo.is_descent_step(d, slope)}


def check_study_adapter(model: str, adapter: str | Path | None) -> None:
    """Before a study runs anything: a :class:`dleaf.io.InputError` naming ``--adapter`` when ``adapter`` is not a
    PEFT adapter folder (:func:`dpo_link.rewards.check_adapter_files`) or was trained on another checkpoint than
    ``model`` (:func:`dpo_link.rewards.check_adapter_base`)."""
    if adapter is None:
        return
    try:
        check_adapter_files(adapter)
    except (OSError, ValueError) as e:
        raise InputError(f"--adapter {adapter}: {e}") from None
    if not (Path(adapter) / "dpo_run.json").is_file():
        return
    try:
        check_adapter_base(adapter, models.check_model(model), read_json(Path(adapter) / "dpo_run.json", "run record"))
    except ValueError as e:
        raise e if isinstance(e, InputError) else InputError(str(e)) from None


def study_step(out_dir: str | Path, n_pairs: int = 100, knobs: dict | None = None, seed: int = 0,
               model: str = ORGANISM, adapter: str | Path | None = None, dataset: str | Path | None = None,
               dataset_split: str = "test", column_map: Any = None, dtype: str = "float32",
               progress: Callable[[str], None] | None = None) -> dict | None:
    """The correspondence step of the study: :func:`run_suite` on the first ``n_pairs`` held-out pairs (the
    organism's own when ``model`` is the organism; ``dataset`` on disk for a real checkpoint), no free generations,
    the report written to ``out_dir``; ``progress(msg)`` receives its phases. None on the organism when no adapter
    is committed.

    Returns ``summary``, ``agrees`` (:func:`verdict`) and ``markdown`` (the rendered report).
    """
    from .report import report_markdown

    organism = model == ORGANISM
    if organism and adapter is None and not (data_path(ORGANISM_ADAPTER) / "adapter_config.json").is_file():
        return None
    if not organism and dataset is None:
        raise ValueError(f"the correspondence suite on {model!r} needs held-out preference pairs (dataset=)")
    report = run_suite(out_dir, progress=progress, model=model, adapter=adapter,
                       dataset=ORGANISM if organism else dataset, dataset_split=dataset_split, column_map=column_map,
                       n_pairs=n_pairs, n_generations=0, knobs=knobs, seed=seed, dtype=dtype,
                       split_flag="--preference_split")
    return {**verdict(report), "markdown": report_markdown(report)}
