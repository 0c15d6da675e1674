"""The fault-injection benchmark: does a method find the layers where image attention was damaged, and does it undo
the damage?

A model that otherwise reads the image is given a known fault (:mod:`dleaf.faults`) at chosen layers, heads and
generated positions; each method then decodes the faulted model. Because the faulted (position, layer) cells are
known, the benchmark measures

* **damage**: the faulted model against the unfaulted one on the same images (greedy decoding): CHAIR_s, CHAIR_i,
  recall, hallucinated and grounded mentions, additions and substitutions, each difference with a paired bootstrap
  interval (:func:`dleaf.eval.paired_differences`, images resampled jointly);
* **localization**: for each method that flags layers (D-LEAF with LIAE, D-LEAF with the image-mass deficit, D-LEAF's
  fusion at random layers at D-LEAF's own flag rate), the precision and recall of its flagged cells against the
  faulted cells, and the per-cell AUROC (:func:`dleaf.premise.auroc`) of its signal's margin over its causal
  threshold (what a flag thresholds at zero) for faulted against unfaulted cells; for every method that changes
  attention rows (those three and PAI, which acts the same way on every row of its layers), the share of its
  intervention, the L1 change it makes to the attention rows it is handed, that lands on faulted cells, beside the
  share of faulted cells among the cells it acts on (what a uniform spread gets);
* **repair**: per image, the grounded objects the unfaulted model names and the faulted one does not (lost), and
  the hallucinated objects the faulted model names and the unfaulted one does not (added); for each method on the
  faulted model, the fraction of lost grounded objects it names again (restored) and of added hallucinated objects
  it no longer names (removed), with bootstrap intervals over images.

Every (split, fault, method) cell is a run folder of the evaluation harness's format under
``<out>/<split>/<fault>/<method>/`` (``config.json``, ``generations.jsonl`` appended as produced, ``scores.jsonl``,
``metrics.json``; ``python scripts/evaluate.py --compare`` reads them), decoded by the harness's one generation
loop (:func:`dleaf.generation.generate`) on a registered benchmark with its protocol, and scored by its metric core.
Each generation row also holds ``cells``: per reply, the flagged layers of every row, the signal's margin over the
threshold, per-layer sums of the signal and image mass, and the method's change to the attention rows on faulted and
unfaulted cells. A run started again resumes (the harness's consolidation and config check); the report
(``report.json``, ``faults.md``, figures) is rewritten atomically from the run folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import textwrap
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from . import engine, premise
from .eval import compare, runner
from .eval.registry import Benchmark
from .eval.scores import compute_metrics, item_scores
from .faults import FaultConfig, fault_config, faulted_cells
from .generation import generate
from .io import InputError, json_line, read_json, read_jsonl, write_json_atomic, write_text_atomic
from .settings import Setting

CELLS_VERSION = 1
REPORT = "report.json"
MARKDOWN = "faults.md"
UNFAULTED = "unfaulted"

# ---------------------------------------------------------------------------------------------------------------
# What is run
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchMethod:
    """A decoding method of the benchmark: ``method`` and ``knobs`` for :class:`~dleaf.settings.Setting`;
    ``flags``: it flags layers (its trace gives flagged cells); ``rate_of``: its ``random_rate`` is the measured
    flag rate of that other method on the same split and fault."""

    name: str
    method: str
    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    flags: bool = False
    rate_of: str | None = None
    description: str = ""


METHODS: dict[str, BenchMethod] = {m.name: m for m in (
    BenchMethod("greedy", "greedy", description="plain greedy decoding (the fault alone)"),
    BenchMethod("dleaf", "dleaf", flags=True, description="D-LEAF, defaults (LIAE against its running threshold)"),
    BenchMethod("dleaf_mass", "dleaf", {"layer_signal": "mass_deficit"}, flags=True,
                description="D-LEAF with the image-mass deficit as the layer signal"),
    BenchMethod("random_layers", "random_layers", flags=True, rate_of="dleaf",
                description="D-LEAF's fusion at random layers, at D-LEAF's measured flag rate on the same fault"),
    BenchMethod("pai", "pai", description="PAI (image-key scores boosted in every row of layers 2 on)"),
    BenchMethod("spin", "spin", description="SPIN (the heads with least image mass damped)"),
    BenchMethod("vcd", "vcd", description="VCD (logits contrasted with a noised image; the fault in both streams)"),
)}
DEFAULT_METHODS = ("greedy", "dleaf", "dleaf_mass", "random_layers", "pai")
#: the methods whose intervention on the attention rows is measured (SPIN acts on head outputs, VCD on logits)
ROW_METHODS = ("dleaf", "dleaf_mass", "random_layers", "pai")


def default_grid() -> list[FaultConfig]:
    """The benchmark's faults (for a decoder of 6 layers, like the organism's; a grid file gives others): each on
    all heads at half of the generated positions (a fixed random half, so every reply and layer has faulted and
    unfaulted rows), single layers early (0), middle (3) and late (5), two layers (2, 3) and all layers, half the
    heads, strengths 0.25, 0.5 and 1 on all layers, both kinds diffuse and drift; a diffuse fault from the 8th
    position on and one at every position (which a causal running threshold takes into its baseline); a swap."""
    half = dict(positions="random", fraction=0.5)
    grid = []
    for kind, strength in (("diffuse", 1.0), ("drift", 1.0)):
        for layers in ([0], [3], [5], [2, 3], "all"):
            grid.append(FaultConfig(kind, layers, strength=strength, **half))
        grid.append(FaultConfig(kind, "all", heads=0.5, strength=strength, **half))
        for s in (0.25, 0.5):
            grid.append(FaultConfig(kind, "all", strength=s, **half))
    grid.append(FaultConfig("diffuse", "all", positions="from", start=8))
    grid.append(FaultConfig("diffuse", "all", positions="all"))
    grid.append(FaultConfig("swap", "all", **half))
    return grid


def fault_slug(fault: FaultConfig | None) -> str:
    """A folder name for a fault (``unfaulted`` for None)."""
    if fault is None:
        return UNFAULTED
    return re.sub(r"[^\w.=-]+", "_", fault.label().replace(">=", "from").replace("~", "rand")).strip("_")


def read_grid(path: str | Path) -> list[FaultConfig]:
    """Faults from a YAML file: a list of mappings of :class:`~dleaf.faults.FaultConfig` fields."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"fault grid file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError(f"fault grid file {path} is not valid YAML: {e}") from None
    if not isinstance(data, list) or not data:
        raise InputError(f"fault grid file {path} must hold a non-empty list of faults (mappings of fault fields)")
    out = []
    for k, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise InputError(f"fault grid file {path}, entry {k}: a fault is a mapping of fields, got {entry!r}")
        try:
            out.append(fault_config(entry))
        except (TypeError, ValueError) as e:
            raise InputError(f"fault grid file {path}, entry {k}: {e}") from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measuring a method's change to the attention rows
# ---------------------------------------------------------------------------------------------------------------


class RowChangeRecorder:
    """Records, per sample, generated position and layer, the L1 change a method makes to the attention rows it is
    handed (summed over heads): ``sum_h sum_k |a_method[h, k] - a_in[h, k]|``, where ``a_in`` are the rows the
    method receives (the faulted rows in a faulted layer; for a method that edits pre-softmax scores, the rows
    before its edit) and ``a_method`` the rows it attends with. It wraps the attached method's ``attend`` on that
    one instance (nothing else is changed)."""

    def __init__(self, intervention: engine.Intervention):
        self.num_layers = intervention.num_layers
        self.rows: dict[int, np.ndarray] = {}
        method = intervention.method
        original = method.attend

        def attend(this, call):
            seen = {}
            plain_weights = call.weights

            def weights(pre_softmax=None):
                w = plain_weights(pre_softmax)
                given = w if pre_softmax is None else plain_weights(None)
                seen["rows"] = given[:, :, call.first:].detach().clone()
                return w

            call.weights = weights
            out, used = original(call)
            if "rows" in seen and used is not None:
                change = (used[:, :, call.first:].detach() - seen["rows"]).abs().sum(-1).sum(1)  # (B, Qa)
                self.add(call.layer, call.positions(), call.active, change)
            return out, used

        method.attend = types.MethodType(attend, method)

    def reset(self) -> None:
        self.rows = {}

    def add(self, layer: int, positions: torch.Tensor, active: torch.Tensor, change: torch.Tensor) -> None:
        pos = positions.cpu().numpy()
        act = active.cpu().numpy()
        val = change.double().cpu().numpy()
        for b, q in zip(*np.nonzero(act)):
            k = int(pos[b, q])
            arr = self.rows.get(int(b))
            if arr is None or arr.shape[0] <= k:
                grown = np.zeros((max(k + 1, 2 * (arr.shape[0] if arr is not None else 32)), self.num_layers))
                if arr is not None:
                    grown[:arr.shape[0]] = arr
                arr = self.rows[int(b)] = grown
            arr[k, layer] += val[b, q]

    def sample(self, b: int, n: int) -> np.ndarray:
        """(n, L) changes of sample ``b``'s first ``n`` rows."""
        arr = self.rows.get(b)
        out = np.zeros((n, self.num_layers))
        if arr is not None:
            m = min(n, arr.shape[0])
            out[:m] = arr[:m]
        return out


def _round(x: float, digits: int = 6):
    return None if not math.isfinite(x) else float(f"{x:.{digits}g}")


def cell_record(n: int, num_layers: int, fault: FaultConfig | None, trace_sample: dict | None,
                change: np.ndarray | None) -> dict:
    """What a generation row keeps about its (position, layer) cells: ``rows`` (n, the rows from the last prompt
    token to the one predicting the last kept token, end of sequence included); with a flagging method's trace,
    ``flags`` (per row a bit mask of the flagged layers), ``margin`` (per row and layer the signal minus its causal
    threshold, null where there is no threshold yet), ``signal_sum`` and ``signal_sq`` (per layer, over the
    unfaulted rows, and ``signal_faulted_sum`` over the faulted ones) and ``mass_sum`` (per layer, the head-mean
    image mass summed over rows); with a row-change record, ``change`` (per layer, the method's L1 change to the
    attention rows summed over ``faulted`` and ``clean`` (unfaulted) cells)."""
    faulted = faulted_cells(fault, n, num_layers) if fault is not None else np.zeros((n, num_layers), bool)
    rec: dict[str, Any] = {"version": CELLS_VERSION, "rows": n}
    if trace_sample is not None:
        flag = trace_sample["flag"][:n].numpy().astype(bool)
        signal = trace_sample["signal"][:n].double().numpy()
        tau = trace_sample["tau"][:n].double().numpy()
        rec["flags"] = [int(sum(1 << j for j in np.nonzero(r)[0])) for r in flag]
        margin = signal - tau
        rec["margin"] = [[_round(v) for v in r] for r in margin]
        sig = np.where(np.isfinite(signal), signal, 0.0)
        rec["signal_sum"] = [_round(v) for v in np.where(~faulted, sig, 0).sum(0)]
        rec["signal_sq"] = [_round(v) for v in np.where(~faulted, sig * sig, 0).sum(0)]
        rec["signal_faulted_sum"] = [_round(v) for v in np.where(faulted, sig, 0).sum(0)]
        iaf = trace_sample["iaf"][:n].double().numpy()
        rec["mass_sum"] = [_round(v) for v in np.nan_to_num(iaf.mean(-1)).sum(0)]
    if change is not None:
        rec["change"] = {"faulted": [_round(v) for v in np.where(faulted, change, 0).sum(0)],
                         "clean": [_round(v) for v in np.where(~faulted, change, 0).sum(0)]}
    return rec


# ---------------------------------------------------------------------------------------------------------------
# One run folder
# ---------------------------------------------------------------------------------------------------------------


def run_arguments(benchmark: Benchmark, run_dir: Path, method: BenchMethod, knobs: Mapping[str, Any], model_name: str,
                  limit: int | None, max_new_tokens: int | None) -> runner.EvalArguments:
    return runner.EvalArguments(benchmark=benchmark.name, output_dir=str(run_dir), model=model_name,
                                method=method.method, knobs=[f"{k}={v!r}" for k, v in knobs.items()],
                                limit=limit, max_new_tokens=max_new_tokens, splits=list(benchmark.sections),
                                progress=False)


def run_cell(model, processor, benchmark: Benchmark, run_dir: str | Path, method: BenchMethod,
             fault: FaultConfig | None, *, knobs: Mapping[str, Any] | None = None, model_name: str = "organism",
             limit: int | None = None, max_new_tokens: int | None = None, batch_size: int = 16,
             on_batch: Callable[[int], None] | None = None) -> dict:
    """Decode ``benchmark`` with ``method`` on the model with ``fault`` (None: unfaulted) into the run folder
    ``run_dir`` (resumed if it holds part of the same run; a different run there is an error), then write its
    ``scores.jsonl`` and ``metrics.json``; returns the metrics."""
    run_dir = Path(run_dir)
    knobs = dict(method.knobs if knobs is None else knobs)
    args = run_arguments(benchmark, run_dir, method, knobs, model_name, limit, max_new_tokens)
    config = runner.run_config(args, benchmark)
    config["fault"] = fault.record() if fault is not None else None
    config["cells"] = CELLS_VERSION
    run_dir.mkdir(parents=True, exist_ok=True)
    runner.check_config(run_dir, config)
    ids = benchmark.ids
    runner.consolidate(run_dir, ids)
    main = run_dir / runner.GENERATIONS
    done = {r["id"] for _, r in read_jsonl(main, "generations file")[0]} if main.exists() else set()
    pending = [it for it in benchmark.items if it.id not in done]
    if pending:
        setting = Setting.from_record(config)
        rule = benchmark.protocol.sentence_rule
        was_training = model.training
        model.eval()
        try:
            with engine.attached(model, setting.method if setting.attaches else None, fault=fault,
                                 trace=method.flags, **setting.knob_dict) as iv:
                recorder = RowChangeRecorder(iv) if method.name in ROW_METHODS else None
                num_layers = len(engine.text_attention_modules(model))
                with open(main, "a", encoding="utf-8") as f:
                    for start in range(0, len(pending), batch_size):
                        chunk = pending[start:start + batch_size]
                        if iv is not None and iv.trace is not None:
                            iv.trace.steps.clear()
                        if recorder is not None:
                            recorder.reset()
                        rows = list(generate(model, processor, chunk, setting, config["max_new_tokens"],
                                             batch_size, rule, intervention=iv, token_ids=True))
                        for b, (it, row) in enumerate(zip(chunk, rows)):
                            n = len(row.pop("token_ids"))
                            tr = iv.trace.sample(b) if iv is not None and iv.trace is not None else None
                            change = recorder.sample(b, n) if recorder is not None else None
                            out = {"id": it.id, "section": it.section, "prompt": it.prompt,
                                   **{k: v for k, v in row.items() if k != "id"},
                                   "cells": cell_record(n, num_layers, fault, tr, change)}
                            f.write(json_line(out))
                        f.flush()
                        if on_batch is not None:
                            on_batch(len(chunk))
        finally:
            model.train(was_training)
    rows = runner.consolidate(run_dir, ids)
    result = {"benchmark": benchmark.name, "protocol": config["protocol"], "run": config,
              "sections": compute_metrics(benchmark, rows)}
    write_text_atomic("".join(json_line(s) for s in item_scores(benchmark, rows)), run_dir / compare.SCORES)
    write_json_atomic(result, run_dir / compare.METRICS)
    return result


def measured_flag_rate(run_dir: str | Path) -> float:
    """A flagging run's flag rate: flagged cells over (rows x watched layers) of every reply."""
    rows = [r for _, r in read_jsonl(Path(run_dir) / runner.GENERATIONS, "generations file")[0]]
    config = read_json(Path(run_dir) / runner.CONFIG, "run config")
    watched = _watched_layers(config, _num_layers_of(rows))
    flagged = sum(bin(m & _mask(watched)).count("1") for r in rows for m in r["cells"]["flags"])
    cells = sum(r["cells"]["rows"] for r in rows) * len(watched)
    return flagged / cells if cells else 0.0


def _mask(layers) -> int:
    return sum(1 << j for j in layers)


def _num_layers_of(rows: Sequence[dict]) -> int:
    for r in rows:
        c = r["cells"]
        for key in ("mass_sum", "signal_sum"):
            if key in c:
                return len(c[key])
        if "change" in c:
            return len(c["change"]["clean"])
    raise InputError("the run's rows record no per-layer cells")


def _watched_layers(config: dict, num_layers: int) -> list[int]:
    """The layers a run's method acts on (its ``[layer_start, layer_end)``; none for greedy)."""
    setting = Setting.from_record(config)
    cfg = setting.config()
    if cfg is None or not hasattr(cfg, "layer_start"):
        return []
    end = cfg.layer_end if cfg.layer_end is not None else num_layers
    return list(range(cfg.layer_start, min(end, num_layers)))


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------


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


def ratio_difference(num_a, den_a, num_b, den_b, n_resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """``sum(num_a)/sum(den_a) - sum(num_b)/sum(den_b)`` over the same items, with a paired percentile bootstrap
    interval (items resampled jointly in both)."""
    arrays = [np.asarray(x, float) for x in (num_a, den_a, num_b, den_b)]

    def ratio(n, d, axis=-1):
        dd = d.sum(axis)
        return np.divide(n.sum(axis), dd, out=np.full(np.shape(dd), np.nan), where=dd > 0)

    def stat(na, da, nb, db, axis=-1):
        return ratio(na, da, axis) - ratio(nb, db, axis)

    point = float(stat(*arrays))
    out = {"diff": point, "low": math.nan, "high": math.nan}
    if not math.isfinite(point) or len(arrays[0]) < 2:
        return out
    with np.errstate(invalid="ignore"):
        res = stats.bootstrap(tuple(arrays), stat, paired=True, vectorized=True, n_resamples=n_resamples,
                              confidence_level=confidence, method="percentile", random_state=seed)
    lo, hi = res.confidence_interval
    out["low"], out["high"] = float(lo), float(hi)
    return out


def error_kinds(score: dict) -> tuple[int, int]:
    """``(additions, substitutions)`` of one caption's per-item score, as :func:`dleaf.metrics.chair` counts them:
    ``sub = min(|hallucinated|, |missed|)``, ``add = |hallucinated| - sub``, ``missed = n_truth - |grounded|``."""
    hall = len(score["hallucinated"])
    missed = score["n_truth"] - len(score["grounded"])
    sub = min(hall, missed)
    return hall - sub, sub


def damage(base: Sequence[dict], faulted: Sequence[dict], n_resamples: int = 2000) -> dict:
    """The faulted model against the unfaulted one on the same items (one caption section): every statistic of
    :func:`dleaf.eval.paired_differences` (faulted - unfaulted, with its paired interval), additions and
    substitutions per image likewise, and the totals of both runs."""
    diffs = compare.paired_differences(base, faulted, n_resamples)
    (section,) = diffs.values()
    by_id = {r["id"]: r for r in faulted}
    b_kinds = np.array([error_kinds(r) for r in base], float)
    f_kinds = np.array([error_kinds(by_id[r["id"]]) for r in base], float)
    mean = lambda x, axis=-1: np.mean(x, axis=axis)  # noqa: E731
    out = dict(section)
    out["additions_per_image"] = compare.paired_difference((b_kinds[:, 0],), (f_kinds[:, 0],), mean, n_resamples)
    out["substitutions_per_image"] = compare.paired_difference((b_kinds[:, 1],), (f_kinds[:, 1],), mean,
                                                               n_resamples)
    out["totals"] = {"unfaulted": _totals(base), "faulted": _totals(faulted)}
    return out


def _totals(scores: Sequence[dict]) -> dict:
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


def repair(base, faulted, repaired, n_resamples: int = 2000) -> dict:
    """Fractions of lost grounded objects restored and of added hallucinated objects removed
    (:func:`repair_counts`), with bootstrap intervals over images, and the counts."""
    c = repair_counts(base, faulted, repaired)
    return {"restored": ratio_interval(c["restored"], c["lost"], n_resamples),
            "removed": ratio_interval(c["removed"], c["added"], n_resamples),
            **{f"n_{k}": int(v.sum()) for k, v in c.items()}}


def localization_arrays(rows: Sequence[dict], fault: FaultConfig | None, layers: Sequence[int],
                        num_layers: int) -> dict[str, np.ndarray]:
    """Per reply (in ``rows``' order), over the cells of ``layers`` (the method's watched layers): ``cells``,
    ``faulted``, ``flagged``, ``hits`` (flagged and faulted); per layer (L,) totals ``layer_cells``,
    ``layer_flagged``; and the flat per-cell ``margin`` values at faulted and at unfaulted cells (where a threshold
    exists)."""
    keep = np.zeros(num_layers, bool)
    keep[list(layers)] = True
    out = {k: [] for k in ("cells", "faulted", "flagged", "hits")}
    layer_cells, layer_flagged = np.zeros(num_layers), np.zeros(num_layers)
    pos_margin, neg_margin = [], []
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
        if "margin" in c:
            margin = np.array([[np.nan if v is None else v for v in row] for row in c["margin"]],
                              float).reshape(n, num_layers)
            ok = np.isfinite(margin) & keep
            pos_margin.append(margin[ok & fc])
            neg_margin.append(margin[ok & ~fc])
    res = {k: np.array(v, float) for k, v in out.items()}
    res["layer_cells"], res["layer_flagged"] = layer_cells, layer_flagged
    res["margin_faulted"] = np.concatenate(pos_margin) if pos_margin else np.zeros(0)
    res["margin_clean"] = np.concatenate(neg_margin) if neg_margin else np.zeros(0)
    return res


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
                 flags: bool, n_resamples: int = 2000) -> dict:
    """One run's localization (see the module docstring): for a flagging method precision, recall, flag rate,
    the chance precision (faulted share of its cells), the per-layer flag rate and the margin AUROC with its
    interval; for a method with a row-change record, the share of its change on faulted cells beside the faulted
    share of the cells it acts on, and its per-layer share of change."""
    layers = _watched_layers(config, num_layers)
    a = localization_arrays(rows, fault, layers, num_layers)
    out: dict[str, Any] = {"layers": layers, "cells": int(a["cells"].sum()), "faulted_cells": int(a["faulted"].sum())}
    out["faulted_share"] = ratio_interval(a["faulted"], a["cells"], n_resamples)
    if flags:
        out["flag_rate"] = ratio_interval(a["flagged"], a["cells"], n_resamples)
        out["precision"] = ratio_interval(a["hits"], a["flagged"], n_resamples)
        out["recall"] = ratio_interval(a["hits"], a["faulted"], n_resamples)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["layer_flag_rate"] = (a["layer_flagged"] / np.where(a["layer_cells"] > 0, a["layer_cells"], np.nan)
                                      ).tolist()
        pos, neg = a["margin_faulted"], a["margin_clean"]
        if pos.size and neg.size:
            lo, hi = premise.auroc_interval(pos, neg, n_resamples=min(n_resamples, 1000))
            out["auroc"] = {"value": premise.auroc(pos, neg), "low": lo, "high": hi, "n_faulted": int(pos.size),
                            "n_clean": int(neg.size)}
        else:
            out["auroc"] = None
    if rows and "change" in rows[0]["cells"]:
        ch = change_arrays(rows, num_layers)
        out["change_share"] = ratio_interval(ch["faulted"], ch["total"], n_resamples)
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


# ---------------------------------------------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FaultBenchConfig:
    """What the benchmark runs: the benchmark and its splits, images per split (``limit``), the faults, the
    methods, the token limit, the batch size and the model name recorded in every run."""

    faults: Sequence[FaultConfig] = dataclasses.field(default_factory=default_grid)
    methods: Sequence[str] = DEFAULT_METHODS
    splits: Sequence[str] = ("adversarial", "indist")
    benchmark: str = "organism_caption"
    limit: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 16
    model: str = "organism"
    n_resamples: int = 2000

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InputError(f"unknown method(s) {unknown}; the benchmark's methods are {', '.join(METHODS)}")
        if "greedy" not in self.methods:
            raise InputError("the methods must include greedy (the faulted model alone is what damage and repair "
                             "are measured against)")
        for m in self.methods:
            dep = METHODS[m].rate_of
            if dep is not None and dep not in self.methods:
                raise InputError(f"method {m} runs at {dep}'s measured flag rate: include {dep}")
        if not self.faults:
            raise InputError("no faults to run")
        labels = [f.label() for f in self.faults]
        if len(set(labels)) != len(labels):
            raise InputError("the fault grid holds the same fault twice")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise InputError(f"--limit must be a positive number of images, got {self.limit!r}")
        if self.batch_size < 1:
            raise InputError(f"--batch_size must be positive, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        self.methods = tuple(sorted(self.methods, key=list(METHODS).index))  # a method after the one it needs

    def load_benchmark(self, split: str) -> Benchmark:
        return runner.load_benchmark(self.benchmark, limit=self.limit, splits=[split])


def run_dir_of(out: Path, split: str, fault: FaultConfig | None, method: str) -> Path:
    return Path(out) / split / fault_slug(fault) / method


def run_benchmark(model, processor, out_dir: str | Path, cfg: FaultBenchConfig, say: Callable[[str], None] = print,
                  progress: bool = False) -> dict:
    """Run (or resume) every (split, fault, method) cell, unfaulted first, then write the report; returns it."""
    out = Path(out_dir)
    benchmarks = {split: cfg.load_benchmark(split) for split in cfg.splits}
    faults: list[FaultConfig | None] = [None, *cfg.faults]
    total = len(faults) * len(cfg.methods) * len(cfg.splits)
    k = 0
    for split, bench in benchmarks.items():
        for fault in faults:
            for name in cfg.methods:
                k += 1
                method = METHODS[name]
                knobs = dict(method.knobs)
                if method.rate_of is not None:
                    knobs["random_rate"] = round(measured_flag_rate(run_dir_of(out, split, fault, method.rate_of)), 6)
                run_dir = run_dir_of(out, split, fault, name)
                if (run_dir / compare.METRICS).is_file() and (run_dir / compare.SCORES).is_file():
                    cfg_run = read_json(run_dir / runner.CONFIG, "run config")
                    if cfg_run.get("knobs") == knobs and cfg_run.get("n_items") == len(bench.items):
                        continue
                say(f"[{k}/{total}] {split} / {fault.label() if fault else UNFAULTED} / {name}")
                bar = None
                if progress:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=len(bench.items), leave=False)
                run_cell(model, processor, bench, run_dir, method, fault, knobs=knobs, model_name=cfg.model,
                         limit=cfg.limit, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                         on_batch=bar.update if bar is not None else None)
                if bar is not None:
                    bar.close()
    report = build_report(out, cfg)
    write_report(report, out)
    return report


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
    n = cfg.n_resamples
    report: dict[str, Any] = {"benchmark": cfg.benchmark, "model": cfg.model, "limit": cfg.limit,
                              "methods": list(cfg.methods), "faults": [f.record() for f in cfg.faults],
                              "fault_labels": [f.label() for f in cfg.faults], "splits": {}}
    for split in cfg.splits:
        base_cfg, base_rows, base_scores = _read_rows(run_dir_of(out, split, None, "greedy"))
        num_layers = _num_layers_of(_read_rows(run_dir_of(out, split, None, "dleaf"))[1]) \
            if "dleaf" in cfg.methods else None
        sec: dict[str, Any] = {"n_images": len(base_scores), "protocol": base_cfg["protocol"], "unfaulted": {},
                               "faults": {}}
        for name in cfg.methods:
            config, rows, scores = _read_rows(run_dir_of(out, split, None, name))
            L = num_layers or (_num_layers_of(rows) if name != "greedy" else None)
            entry = {"metrics": _totals(scores), "knobs": config.get("knobs", {})}
            if name != "greedy":
                loc = localization(rows, config, None, L, METHODS[name].flags, n)
                entry["localization"] = _strip(loc)
                if name == "dleaf":
                    entry["signal"] = signal_profile(rows, None, L)
            sec["unfaulted"][name] = entry
        for fault in cfg.faults:
            f_cfg, f_rows, f_scores = _read_rows(run_dir_of(out, split, fault, "greedy"))
            entry: dict[str, Any] = {"label": fault.label(), "damage": damage(base_scores, f_scores, n),
                                     "methods": {}}
            locs = {}
            for name in cfg.methods:
                if name == "greedy":
                    continue
                config, rows, scores = _read_rows(run_dir_of(out, split, fault, name))
                L = num_layers or _num_layers_of(rows)
                m: dict[str, Any] = {"knobs": config.get("knobs", {}), "metrics": _totals(scores),
                                     "vs_faulted": compare.paired_differences(f_scores, scores, n)[split],
                                     "repair": repair(base_scores, f_scores, scores, n)}
                if name in ROW_METHODS:
                    loc = localization(rows, config, fault, L, METHODS[name].flags, n)
                    locs[name] = loc
                    m["localization"] = _strip(loc)
                if name == "dleaf":
                    m["signal"] = signal_profile(rows, fault, L)
                entry["methods"][name] = m
            entry["comparisons"] = _comparisons(locs, n)
            sec["faults"][fault.label()] = entry
        report["splits"][split] = sec
    return report


def _comparisons(locs: dict, n: int) -> dict:
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
                                                                     n)
        if "pai" in locs and "_change" in locs[name] and "_change" in locs["pai"]:
            c, p = locs[name]["_change"], locs["pai"]["_change"]
            out[f"{name}_share_minus_pai"] = ratio_difference(c["faulted"], c["total"], p["faulted"], p["total"], n)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report: markdown and figures
# ---------------------------------------------------------------------------------------------------------------


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
    lines = [f"Model: {report['model']}; benchmark {report['benchmark']}; "
             f"{'all' if report['limit'] is None else report['limit']} images per split. Intervals: 95% bootstrap "
             "over images (percentile); AUROC intervals resample cells.", ""]
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
        flaggers = [m for m in ("dleaf", "dleaf_mass", "random_layers") if m in report["methods"]]
        lines += ["", "**Localization**: flags against faulted (position, layer) cells, % [interval]; chance = "
                  "faulted share of the cells (the precision of flags placed at random); AUROC of the signal's "
                  "margin over its threshold, faulted against unfaulted cells", "",
                  "| fault | chance | " + " | ".join(f"{m} precision | {m} recall" for m in flaggers)
                  + " | dleaf AUROC | dleaf_mass AUROC |",
                  "|---|---|" + "---|---|" * len(flaggers) + "---|---|"]
        for label, e in sec["faults"].items():
            ms = e["methods"]
            chance = ms[flaggers[0]]["localization"]["faulted_share"] if flaggers else None
            cells = " | ".join(f"{_pct(ms[m]['localization'].get('precision'))} | "
                               f"{_pct(ms[m]['localization'].get('recall'))}" for m in flaggers)
            aucs = [_auc(ms[m]["localization"].get("auroc")) if m in ms else "n/a" for m in ("dleaf", "dleaf_mass")]
            lines.append(f"| {label} | {_pct(chance)} | {cells} | {aucs[0]} | {aucs[1]} |")
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
                         f"{_diff(cmp_.get('dleaf_share_minus_pai'))} | {_diff(cmp_.get('dleaf_mass_share_minus_pai'))} |")
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
        lines.append("")
    return "\n".join(lines)


def plot_flag_rates(report: dict, kind: str, path: str | Path, split: str | None = None) -> Path | None:
    """Per fault of ``kind``: per layer, each flagging method's flag rate and PAI's share of its change to the
    attention rows, faulted layers shaded. None if the report has no fault of that kind."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import save_figure_atomic

    split = split or next(iter(report["splits"]))
    sec = report["splits"][split]
    labels = [(lab, rec) for lab, rec in zip(report["fault_labels"], report["faults"]) if rec["kind"] == kind]
    if not labels:
        return None
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig = Figure(figsize=(max(3.3 * cols, 8.0), 2.7 * rows + 0.9), dpi=110)
    FigureCanvasAgg(fig)
    styles = {"dleaf": ("tab:blue", "o", "D-LEAF (LIAE)"), "dleaf_mass": ("tab:orange", "s", "D-LEAF (mass deficit)"),
              "random_layers": ("tab:gray", "^", "random layers")}
    handles = {}
    for k, (label, rec) in enumerate(labels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ms = sec["faults"][label]["methods"]
        fault = fault_config(rec)
        L = None
        for name, (color, marker, text) in styles.items():
            if name in ms and "layer_flag_rate" in ms[name].get("localization", {}):
                y = np.array(ms[name]["localization"]["layer_flag_rate"], float)
                L = len(y)
                (h,) = ax.plot(range(L), y, marker=marker, color=color, label=text, markersize=4)
                handles[text] = h
        if "pai" in ms and "layer_change_share" in ms["pai"].get("localization", {}):
            y = np.array(ms["pai"]["localization"]["layer_change_share"], float)
            L = L or len(y)
            (h,) = ax.plot(range(len(y)), y, linestyle="--", color="tab:green", label="PAI: share of its change")
            handles["PAI: share of its change"] = h
        if L:
            for layer in fault.layer_indices(L):
                ax.axvspan(layer - 0.4, layer + 0.4, color="tab:red", alpha=0.15, linewidth=0)
            ax.set_xticks(range(L))
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        if k % cols == 0:
            ax.set_ylabel("flag rate / share", fontsize=7)
        if k >= len(labels) - cols:
            ax.set_xlabel("decoder layer", fontsize=7)
    import matplotlib.patches as mpatches

    shade = mpatches.Patch(color="tab:red", alpha=0.15, label="faulted layer")
    fig.legend(handles=[*handles.values(), shade], loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.suptitle(textwrap.fill(f"{kind} faults, {split} split: per layer, the share of rows each method flagged, and "
                               "PAI's share of its change to the attention rows (faulted layers shaded)", 110),
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.94))
    return save_figure_atomic(fig, Path(path))


def plot_repair(report: dict, path: str | Path) -> Path | None:
    """Repair against strength: for each kind and split, the faults that differ only in strength (the longest such
    series), restored and removed fractions per method with intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import save_figure_atomic

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


def model_digest(model_dir: str | Path) -> str | None:
    """SHA-256 (first 16 hex digits) of a checkpoint folder's weights, to name which model the numbers come from."""
    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
