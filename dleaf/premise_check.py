"""The premise check for any model with ground truth: at every object word of its captions, each layer's LIAE and
image mass, split by whether the object is really in the image; the same at every reply row, as a flagging method
sees them; and at the first token of yes/no answers.

D-LEAF rests on a premise: where a model names an object that is not in the image, the image attention of some
decoder layers is anomalous (spread out, or small). This module measures it on a model's own replies.

Given images, prompts, the model's replies and each image's ground-truth object set, the replies are scored
teacher-forced in one forward pass per batch with D-LEAF attached at gamma = 0 (so nothing changes) and its trace
on: the trace holds, at every reply position, each layer's LIAE and each head's image mass, computed on the rows the
model generated the reply from. Each object mention found by the vocabulary (synonyms, plurals, multi-word names)
is located at its first token; the row that predicts that token gives the mention's per-layer values.
:func:`dleaf.premise.premise_table` then gives per layer the AUROC of each signal for hallucinated against
grounded mentions, with bootstrap intervals. Replies are re-tokenized from their text, which reproduces the
generated tokens wherever the tokenizer round-trips (it does for the organism).

A flagging method does not compare object words with object words: it watches every row. :func:`reply_records`
also keeps every reply row (its kind, position, mention ordinal and signals); :func:`actionability_rows` sets the
rows that predict hallucinated object words against every other row (and against grounded-object and non-object
rows), with the recall and precision of percentile flags, and :func:`position_rows` holds position fixed
(:mod:`dleaf.actionability` has the statistics). For yes/no questions, :func:`first_token_records` reads the row that
predicts the answer's first token and :func:`first_token_rows` sets wrong answers against right ones there.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import actionability, engine, metrics, premise
from .config import DLeafConfig
from .models import teacher_forced_inputs

SIGNALS = ("liae", "image_mass_deficit")


def mention_token_offsets(tokenizer, response_ids: Sequence[int], vocab: metrics.ObjectVocabulary
                          ) -> list[tuple[int, metrics.Mention]]:
    """``(j, mention)`` for every object mention in the decoded response, where ``j`` is the index (within
    ``response_ids``) of the first token of the mention's first word."""
    text = tokenizer.decode(list(response_ids), skip_special_tokens=True)
    mentions = vocab.extract(text)
    if not mentions:
        return []
    counts = [len(vocab.words(tokenizer.decode(list(response_ids[:j + 1]), skip_special_tokens=True)))
              for j in range(len(response_ids))]
    out = []
    for m in mentions:
        j = next((j for j, c in enumerate(counts) if c > m.word_index), None)
        if j is not None:
            out.append((j, m))
    return out


def _traced_batches(model, processor, images, prompts, replies, batch_size: int, progress=None):
    """Teacher-forced batches of replies under D-LEAF's trace at zero strength (head-mixed LIAE in nats, head-mean
    image mass): ``(start, n, reply_ids, intervention)`` per batch, ``n`` the prompt length (the row ``n - 1``
    predicts the reply's first token), the intervention holding the batch's trace."""
    config = DLeafConfig(gamma=0.0, layer_signal="liae", liae_variant="mixed", liae_normalize=False,
                         iaf_variant="mass")
    steps = range(0, len(images), batch_size)
    for start in (progress(steps) if progress else steps):
        sl = slice(start, start + batch_size)
        full, n, reply_ids = teacher_forced_inputs(processor, prompts[sl], images[sl], replies[sl], model)
        with engine.attached(model, config, trace=True) as iv:
            engine.response_logprobs(model, full, [n] * len(reply_ids), iv)
        yield start, n, reply_ids, iv


ERROR_KINDS = ("addition", "substitution", "mixed")


def mention_token_spans(tokenizer, response_ids: Sequence[int], vocab: metrics.ObjectVocabulary
                        ) -> list[tuple[int, int, metrics.Mention]]:
    """``(first, last, mention)`` for every object mention in the decoded response: the indices (within
    ``response_ids``) of the first and the last token that carry part of the mention's words. A token carries part
    of word ``w`` when decoding the response up to it starts word ``w`` or lengthens it; ``first`` is the token of
    :func:`mention_token_offsets`."""
    ids = list(response_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    mentions = vocab.extract(text)
    if not mentions:
        return []
    words = [vocab.words(tokenizer.decode(ids[:j + 1], skip_special_tokens=True)) for j in range(len(ids))]
    touched = []  # per token, the word indices it starts or lengthens
    prev: list[str] = []
    for now in words:
        t = set(range(len(prev), len(now)))
        k = min(len(prev), len(now)) - 1
        if k >= 0 and now[k] != prev[k]:
            t.add(k)
        touched.append(t)
        prev = now
    out = []
    for m in mentions:
        span = set(range(m.word_index, m.word_index + vocab.mention_span(m)))
        js = [j for j, t in enumerate(touched) if t & span]
        if js:
            out.append((js[0], js[-1], m))
    return out


def error_kind(mentioned: set, truth: set) -> str | None:
    """What kind of error a reply's hallucinated objects are, by the counts of :func:`dleaf.metrics.chair`:
    ``addition`` when the reply names every object of the image (its hallucinations are on top of a complete
    reply), ``substitution`` when it misses at least as many real objects as it names absent ones (each wrong name
    can stand for a missed real object), ``mixed`` otherwise (some of each, not told apart word by word), None when
    nothing is hallucinated."""
    hallucinated, missed = mentioned - truth, truth - mentioned
    if not hallucinated:
        return None
    if not missed:
        return "addition"
    return "substitution" if len(hallucinated) <= len(missed) else "mixed"


ROW_FIELDS = ("sample", "position", "kind", "error", "ordinal", "liae", "mass")


@torch.no_grad()
def reply_records(model, processor, images: Sequence, prompts: Sequence[str], replies: Sequence[str],
                  truths: Sequence[Sequence[str]], vocab: metrics.ObjectVocabulary, batch_size: int = 8,
                  progress=None) -> dict:
    """The attention records of caption replies, scored teacher-forced with D-LEAF's trace (module docstring):

    * ``mentions``: one record per object mention (``sample``, ``word`` (category), ``hallucinated``, ``error``
      (:func:`error_kind` of its reply, for hallucinated mentions), and per layer ``liae``, the entropy of the
      head-mixed image profile in nats, and ``mass``, the head-mean image mass), read at the row that predicts the
      mention's first token;
    * ``rows``: the same per-layer values at *every* row that predicts a reply token, as columns
      (:data:`ROW_FIELDS`): ``sample``, ``position`` (the index of the predicted token in the reply), ``kind``
      (:data:`dleaf.actionability.ROW_KINDS`: the first token of a hallucinated or a grounded mention, a later token of
      a mention, or no object word), ``error`` (:func:`error_kind` of the reply, on hallucinated rows; None
      elsewhere), ``ordinal`` (1 + the number of mentions that begin before the predicted token), ``liae``,
      ``mass``;
    * ``share``: per layer the image share of attention, the head-mean image mass averaged over every row that
      predicts a reply token."""
    if not len(images) == len(prompts) == len(replies) == len(truths):
        raise ValueError(f"images, prompts, replies and truths differ in length: {len(images)}, {len(prompts)}, "
                         f"{len(replies)}, {len(truths)}")
    tok = processor.tokenizer
    records: list[dict] = []
    rows: dict[str, list] = {k: [] for k in ROW_FIELDS}
    share_sum, share_n = None, 0
    for start, n, reply_ids, iv in _traced_batches(model, processor, images, prompts, replies, batch_size, progress):
        for i, r in enumerate(reply_ids):
            tr = iv.trace.sample(i)
            row_of = {int(p): k for k, p in enumerate(tr["positions"])}
            mass = tr["iaf"].mean(-1)  # (T, L): head-mean image mass per row and layer
            liae = tr["signal"]
            reply_rows = [row_of[n + j - 1] for j in range(len(r))]
            if reply_rows:
                part = mass[reply_rows].double().sum(0)
                share_sum = part if share_sum is None else share_sum + part
                share_n += len(reply_rows)
            truth = set(truths[start + i])
            spans = mention_token_spans(tok, r, vocab)
            kind = error_kind({m.category for _, _, m in spans}, truth)
            row_kind = ["other"] * len(r)
            for first, last, m in spans:
                for j in range(first + 1, last + 1):
                    if row_kind[j] == "other":
                        row_kind[j] = "object_rest"
            for first, _, m in spans:
                row_kind[first] = "grounded" if m.category in truth else "hallucinated"
                k = row_of[n + first - 1]  # the row that predicts the mention's first token
                hallucinated = m.category not in truth
                records.append({"sample": start + i, "word": m.category, "hallucinated": hallucinated,
                                "error": kind if hallucinated else None,
                                "liae": liae[k].tolist(), "mass": mass[k].tolist()})
            firsts = sorted(first for first, _, _ in spans)
            rows["sample"] += [start + i] * len(r)
            rows["position"] += list(range(len(r)))
            rows["kind"] += row_kind
            rows["error"] += [kind if k == "hallucinated" else None for k in row_kind]
            rows["ordinal"] += [1 + sum(f < j for f in firsts) for j in range(len(r))]
            rows["liae"] += liae[reply_rows].tolist()
            rows["mass"] += mass[reply_rows].tolist()
    share = (share_sum / max(share_n, 1)).tolist() if share_sum is not None else []
    return {"mentions": records, "rows": rows, "share": share}


def attention_records(model, processor, images: Sequence, prompts: Sequence[str], replies: Sequence[str],
                      truths: Sequence[Sequence[str]], vocab: metrics.ObjectVocabulary, batch_size: int = 8,
                      progress=None) -> tuple[list[dict], list[float]]:
    """The mention records and the image share of :func:`reply_records`."""
    res = reply_records(model, processor, images, prompts, replies, truths, vocab, batch_size, progress)
    return res["mentions"], res["share"]


def premise_records(model, processor, images: Sequence, prompts: Sequence[str], replies: Sequence[str],
                    truths: Sequence[Sequence[str]], vocab: metrics.ObjectVocabulary, batch_size: int = 8,
                    progress=None) -> list[dict]:
    """The object-mention records of :func:`attention_records`."""
    return attention_records(model, processor, images, prompts, replies, truths, vocab, batch_size, progress)[0]


def premise_rows(records: Sequence[dict], n_bootstrap: int = 2000, seed: int = 0,
                 error: str | None = None) -> list[premise.PremiseRow]:
    """Per layer and signal (LIAE; image-mass deficit = -mass, both 'larger = more anomalous'), the AUROC of
    hallucinated against grounded mentions with a bootstrap interval. ``error`` (one of :data:`ERROR_KINDS`) keeps
    only the hallucinated mentions of that kind (see :func:`error_kind`), against every grounded mention."""
    if error is not None:
        if error not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {error!r}; expected one of {', '.join(ERROR_KINDS)}")
        records = [r for r in records if not r["hallucinated"] or r.get("error") == error]
    if not records:
        return []
    hall = np.array([r["hallucinated"] for r in records], dtype=bool)
    signals = {"liae": np.array([r["liae"] for r in records], float),
               "image_mass_deficit": -np.array([r["mass"] for r in records], float)}
    return premise.premise_table(signals, hall, n_resamples=n_bootstrap, seed=seed)


def _row_signals(rows: dict) -> dict[str, np.ndarray]:
    return {"liae": np.asarray(rows["liae"], float).reshape(len(rows["kind"]), -1),
            "image_mass_deficit": -np.asarray(rows["mass"], float).reshape(len(rows["kind"]), -1)}


def row_counts(rows: dict) -> dict[str, int]:
    """How many reply rows of each kind (:data:`dleaf.actionability.ROW_KINDS`) ``rows`` (:func:`reply_records`) holds."""
    return {k: sum(v == k for v in rows["kind"]) for k in actionability.ROW_KINDS}


def rows_of_error(rows: dict, error: str | None) -> dict:
    """The row records without the hallucinated rows of any other error kind than ``error`` (:data:`ERROR_KINDS`;
    None keeps every row): their positives are then the hallucinated rows of that kind alone, and the other
    hallucinated rows are neither positives nor negatives."""
    if error is None:
        return rows
    if error not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {error!r}; expected one of {', '.join(ERROR_KINDS)}")
    keep = [k != "hallucinated" or e == error for k, e in zip(rows["kind"], rows["error"])]
    return {name: [v for v, ok in zip(col, keep) if ok] for name, col in rows.items()}


def actionability_rows(rows: dict, n_captions: int, n_bootstrap: int = 2000, seed: int = 0,
                       percentiles: Sequence[float] = actionability.FLAG_PERCENTILES, error: str | None = None
                       ) -> list[dict]:
    """:func:`dleaf.actionability.actionability_table` of the row records of :func:`reply_records` (``n_captions``
    captions, the bootstrap's clusters): per comparison, signal (LIAE; image-mass deficit) and layer, the rows that
    predict a hallucinated object word against every other reply row, against grounded-object rows and against
    non-object rows. ``error`` keeps only the hallucinated rows of that kind (:func:`rows_of_error`)."""
    rows = rows_of_error(rows, error)
    if "hallucinated" not in rows["kind"]:
        return []
    return actionability.actionability_table(_row_signals(rows), rows["kind"], np.asarray(rows["sample"]),
                                       n_clusters=n_captions, n_resamples=n_bootstrap, seed=seed,
                                       percentiles=percentiles)


def position_rows(rows: dict, n_captions: int, n_bootstrap: int = 2000, seed: int = 0,
                  bin_width: int = actionability.POSITION_BIN, n_splits: int = 5, error: str | None = None) -> list[dict]:
    """:func:`dleaf.actionability.position_table` of the row records of :func:`reply_records`: the same comparisons
    within mention-ordinal strata and token-position bins, and position alone against position and signal in a
    logistic model cross-validated by caption. ``error`` as in :func:`actionability_rows`."""
    rows = rows_of_error(rows, error)
    if "hallucinated" not in rows["kind"]:
        return []
    return actionability.position_table(_row_signals(rows), rows["kind"], np.asarray(rows["sample"]), rows["position"],
                                  rows["ordinal"], n_clusters=n_captions, bin_width=bin_width,
                                  n_resamples=n_bootstrap, seed=seed, n_splits=n_splits)


#: The error kinds the row tables are also given for, alone.
ROW_ERRORS = ("addition", "substitution")


def row_tables(rows: dict, n_captions: int, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """Everything the reports show of the row records of :func:`reply_records`: ``row_counts``,
    ``actionability`` and ``position`` (every hallucinated row), and ``by_error``: for each of :data:`ROW_ERRORS`,
    the same two tables with only the hallucinated rows of that kind as positives (:func:`rows_of_error`)."""
    out = {"row_counts": row_counts(rows), "actionability": actionability_rows(rows, n_captions, n_bootstrap, seed),
           "position": position_rows(rows, n_captions, n_bootstrap, seed), "by_error": {}}
    for error in ROW_ERRORS:
        out["by_error"][error] = {
            "n_hallucinated": sum(k == "hallucinated" and e == error for k, e in zip(rows["kind"], rows["error"])),
            "actionability": actionability_rows(rows, n_captions, n_bootstrap, seed, error=error),
            "position": position_rows(rows, n_captions, n_bootstrap, seed, error=error)}
    return out


@torch.no_grad()
def first_token_records(model, processor, images: Sequence, prompts: Sequence[str], replies: Sequence[str],
                        labels: Sequence[bool], batch_size: int = 8, progress=None) -> list[dict]:
    """One record per yes/no question: ``sample``, ``label`` (the asked object is in the image), ``answer``
    (:func:`dleaf.metrics.parse_yes_no` of the reply: True, False or None), ``first_token`` (the reply's first
    token, decoded) and per layer ``liae`` and ``mass`` (as in :func:`reply_records`) at the row that predicts the
    reply's first token, the prompt's last row, where a yes-first answer is decided. A reply without a token gets
    ``None`` signals."""
    if not len(images) == len(prompts) == len(replies) == len(labels):
        raise ValueError(f"images, prompts, replies and labels differ in length: {len(images)}, {len(prompts)}, "
                         f"{len(replies)}, {len(labels)}")
    tok = processor.tokenizer
    out: list[dict] = []
    for start, n, reply_ids, iv in _traced_batches(model, processor, images, prompts, replies, batch_size, progress):
        for i, r in enumerate(reply_ids):
            tr = iv.trace.sample(i)
            row_of = {int(p): k for k, p in enumerate(tr["positions"])}
            k = row_of.get(n - 1) if r else None
            rec = {"sample": start + i, "label": bool(labels[start + i]),
                   "answer": metrics.parse_yes_no(replies[start + i]),
                   "first_token": tok.decode([r[0]]) if r else None, "liae": None, "mass": None}
            if k is not None:
                rec["liae"] = tr["signal"][k].tolist()
                rec["mass"] = tr["iaf"][k].mean(-1).tolist()
            out.append(rec)
    return out


def first_token_rows(records: Sequence[dict], n_bootstrap: int = 2000, seed: int = 0) -> list[dict]:
    """:func:`dleaf.actionability.first_token_table` of :func:`first_token_records`: per question subset (all, absent
    object, present object), signal and layer, wrong answers against right ones at the row that predicts the first
    token. Unparsed answers (and replies without a token) are left out; the bootstrap resamples questions."""
    recs = [r for r in records if r["answer"] is not None and r["liae"] is not None]
    if not recs:
        return []
    wrong = np.array([r["answer"] != r["label"] for r in recs], bool)
    present = np.array([r["label"] for r in recs], bool)
    signals = {"liae": np.array([r["liae"] for r in recs], float),
               "image_mass_deficit": -np.array([r["mass"] for r in recs], float)}
    return actionability.first_token_table(signals, wrong, present, n_resamples=n_bootstrap, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# The premise check of a harness run
# ---------------------------------------------------------------------------------------------------------------


#: What the row tables measure, for the reports that show them.
ROWS_INTRO = (
    "**What a flag sees.** D-LEAF watches every row of a reply (a row is the query position that predicts one reply "
    "token) and flags the rows whose signal is high. The tables below set the rows that predict the first token of a "
    "hallucinated object word (*hallucinated rows*) against every other reply row, against the rows that predict the "
    "first token of a grounded object word, and against the rows that predict no object word (a later token of a "
    "multi-token object name counts only among *every other row*). AUROC: the probability that a hallucinated row's "
    "signal exceeds that of a row of the comparison (ties count one half); CI: 95% percentile bootstrap interval "
    "over captions (each replicate draws as many captions as the set holds, with replacement, with all their rows). "
    "pN recall / precision: a flag raised where the signal exceeds the N-th percentile of all reply rows of the "
    "set; recall = flagged hallucinated rows / hallucinated rows, precision = flagged hallucinated rows / flagged "
    "rows of the comparison (hallucinated rows and its negatives), in percent (nan: no row flagged); *flags on "
    "non-object rows*: the share, among every reply row the flag raises on, of rows that predict no object word. "
    "`liae` is the entropy of the layer's head-mixed image-attention profile in nats (D-LEAF's normalised LIAE "
    "divides it by log of the number of image tokens, which changes no AUROC, recall or precision); "
    "`image_mass_deficit` is minus the head-mean attention mass on image tokens.")
POSITION_INTRO = (
    "**Position held fixed.** *Within ordinal*: the AUROC within strata of the mention ordinal (1 + the number of "
    "object mentions that begin before the row's token, so a mention's own row holds its rank among the reply's "
    "mentions: 1, 2, 3, 4 or later); *within position bins*: within strata of the predicted token's index in the "
    "reply, in bins of {bin} tokens. Both are stratified AUROCs: the mean of the within-stratum AUROCs weighted by "
    "their numbers of (hallucinated, negative) pairs, strata lacking either class left out; CI as above. *CV*: "
    "a logistic regression (scikit-learn, standardised features, C = 1) cross-validated in 5 folds grouped by "
    "caption; the AUROC of its pooled out-of-fold predictions. *Position alone* uses the token index, its log and "
    "indicators of the ordinal; *position + signal* adds the signal's value in that layer. The model may weigh the "
    "signal either way, so a signal whose AUROC is far *below* 0.5 adds to position too, which a flag raised "
    "where the signal is high cannot use.")
FIRST_TOKEN_INTRO = (
    "**Yes/no answers at their first token.** A yes-first answer is decided at the row that predicts the reply's "
    "first token (the prompt's last row). Per layer, the AUROC of the signal there for wrong answers against right "
    "ones (unparsed answers left out), with a 95% percentile bootstrap interval over questions; by question subset: "
    "every parsed answer, questions about an absent object (wrong = a yes), questions about a present object "
    "(wrong = a no).")


def row_tables_markdown(tables: dict, heading: str = "###") -> str:
    """The tables of :func:`row_tables` for one set of replies, each under a ``heading`` (markdown level): the row
    counts, the actionability and position tables, then for each error kind alone the actionability table against
    every other row and the position tables against every other row and against grounded-object rows. The
    definitions are :data:`ROWS_INTRO` and :data:`POSITION_INTRO`."""
    counts = tables.get("row_counts")
    out = []
    if counts:
        out += [f"{sum(counts.values())} reply rows: {counts['hallucinated']} predict a hallucinated object word, "
                f"{counts['grounded']} a grounded one, {counts['object_rest']} a later token of an object name, "
                f"{counts['other']} no object word.", ""]
    out += [f"{heading} Actionability: hallucinated rows against the other rows", "",
            actionability.actionability_markdown(tables["actionability"]) if tables["actionability"]
            else "No hallucinated rows.", ""]
    out += [f"{heading} Position held fixed", "",
            actionability.position_markdown(tables["position"]) if tables["position"] else "No hallucinated rows.", ""]
    for error, part in tables.get("by_error", {}).items():
        out += [f"{heading} {error.capitalize()}s alone ({part['n_hallucinated']} hallucinated rows; the other "
                "hallucinated rows left out)", ""]
        if not part["actionability"]:
            out += ["No hallucinated rows of this kind.", ""]
            continue
        out += [actionability.actionability_markdown([r for r in part["actionability"] if r["comparison"] == "all"]),
                actionability.position_markdown([r for r in part["position"] if r["comparison"] in ("all", "grounded")]),
                ""]
    return "\n".join(out)


def check_run(config: dict, model: str | None = None) -> str:
    """The model to score a harness run's replies with (the run's own). Refuses, as an
    :class:`~dleaf.io.InputError`: a run that is neither a caption nor a yes/no run, a run decoded with a method
    attached or with sampling or beam search (the check re-scores the replies with nothing attached, so only greedy
    replies are the model's own greedy choices), and a ``model`` other than the one that wrote the replies."""
    from .eval import get_benchmark
    from .io import InputError

    bench = config.get("benchmark")
    if get_benchmark(bench).kind not in ("caption", "yesno"):
        raise InputError(f"the run is a {bench} run; the premise check needs a caption benchmark (object words) or "
                         "a yes/no benchmark")
    method, strategy = config.get("method"), (config.get("decoding") or {}).get("strategy")
    if method != "greedy" or strategy != "greedy":
        raise InputError(f"the run was decoded with method {method!r} and {strategy!r} decoding; the premise check "
                         "re-scores replies with nothing attached, so it only applies to greedy runs (--method greedy "
                         "--decoding greedy)")
    if model is not None and model != config.get("model"):
        raise InputError(f"the run's replies were written by {config.get('model')!r}; scoring them with {model!r} "
                         "would measure another model's attention on them (leave --model out)")
    return config["model"]


def run_premise_check(run_dir, output_dir=None, model: str | None = None, options: dict | None = None,
                      protocol: str | None = None, n_bootstrap: int = 2000, batch_size: int = 16,
                      progress=None, say=print, seed: int = 0) -> dict:
    """The premise check of a finished greedy caption run of the harness (``run_dir``): per section, the records,
    the per-layer table (bootstrap intervals seeded with ``seed``), ``premise.md`` and a figure per section. Every
    input is checked before the model loads.
    Returns ``{"paths": [...], "sections": {section: {...}}}``."""
    import dataclasses
    from pathlib import Path

    from . import eval as harness
    from . import models
    from .io import InputError, write_json_atomic, write_text_atomic

    run_dir = Path(run_dir)
    config, rows = harness.read_run(run_dir)
    model = check_run(config, model)
    spec = harness.get_benchmark(config["benchmark"])
    opts = dict(options or {})
    sections_run = config["sections"]  # "split" for captions, "split/negatives" for the organism's questions
    if "splits" in spec.options and "splits" not in opts:
        opts["splits"] = list(dict.fromkeys(s.split("/")[0] for s in sections_run))
    if "negatives" in spec.options and "negatives" not in opts:
        opts["negatives"] = list(dict.fromkeys(s.split("/")[1] for s in sections_run if "/" in s)) or None
    limit = (config.get("protocol", {}).get("overrides") or {}).get("limit")
    args = harness.EvalArguments(benchmark=config["benchmark"], protocol=protocol, limit=limit, **opts)
    benchmark = harness.build_benchmark(args)
    if benchmark.protocol.sha256 != config["protocol"]["sha256"]:
        raise InputError(f"the run used protocol {config['protocol']['name']} v{config['protocol']['version']} with "
                         f"another file hash than {benchmark.protocol.path}; pass --protocol with the run's file")
    by_id = {r["id"]: r for r in rows}
    items = [it for it in benchmark.items if it.id in by_id]
    if len(items) != len(by_id):
        raise InputError(f"{run_dir} holds {len(by_id)} replies but only {len(items)} are items of the benchmark "
                         "as given (check the benchmark's files and options)")
    if not items:
        raise InputError(f"{run_dir}/generations.jsonl holds no replies")
    out = Path(output_dir or run_dir)
    models.check_adapter(config.get("adapter"))
    net, processor = models.load(model, config.get("adapter"), dtype=config.get("dtype", "float32"))
    result: dict = {"run": str(run_dir), "model": model, "n_bootstrap": n_bootstrap, "seed": seed, "sections": {}}
    paths = []
    sections = list(dict.fromkeys(it.section for it in items))
    captions = spec.kind == "caption"
    for section in sections:
        part = [it for it in items if it.section == section]
        say(f"[premise] {section}: scoring {len(part)} replies")
        images, prompts, replies = [it.image() for it in part], [it.prompt for it in part], \
            [by_id[it.id]["raw"] for it in part]
        if not captions:
            recs = first_token_records(net, processor, images, prompts, replies, [bool(it.truth) for it in part],
                                       batch_size=batch_size, progress=progress)
            parsed = [r for r in recs if r["answer"] is not None]
            result["sections"][section] = {
                "n_items": len(part), "n_parsed": len(parsed),
                "n_wrong": sum(r["answer"] != r["label"] for r in parsed),
                "first_token": first_token_rows(recs, n_bootstrap, seed), "records": recs}
            continue
        res = reply_records(net, processor, images, prompts, replies, [sorted(it.truth) for it in part],
                            benchmark.vocab, batch_size=batch_size, progress=progress)
        records = res["mentions"]
        table = premise_rows(records, n_bootstrap, seed)
        result["sections"][section] = {
            "n_items": len(part), "n_mentions": len(records),
            "n_hallucinated": sum(r["hallucinated"] for r in records), "image_share": res["share"],
            "rows": [dataclasses.asdict(r) for r in table], **row_tables(res["rows"], len(part), n_bootstrap, seed),
            "records": records}
        if table:
            name = "premise.png" if len(sections) == 1 else f"premise_{section.replace('/', '_')}.png"
            paths.append(premise.plot_premise(table, out / name, title=f"{model}, run {run_dir.name}, {section}"))
    md = [f"# Premise check: {model}, run {run_dir.name}", ""]
    if captions:
        md += ["Per layer, how well each signal separates hallucinated object words from grounded ones (AUROC; 0.5 = "
               "no separation). `liae` is the entropy of the layer's head-mixed image-attention profile; "
               "`image_mass_deficit` is minus the head-mean attention mass on image tokens; both are read at the row "
               "that predicts the word. AUROC above 0.5: the signal is larger at hallucinated words, as the premise "
               "says; below 0.5: it points the other way. CI: 95% percentile bootstrap interval, hallucinated and "
               "grounded mentions resampled separately.", "", ROWS_INTRO, "",
               POSITION_INTRO.format(bin=actionability.POSITION_BIN), ""]
    else:
        md += [FIRST_TOKEN_INTRO, ""]
    for section, res in result["sections"].items():
        if not captions:
            md += [f"## {section}", "", f"{res['n_items']} questions, {res['n_parsed']} answers parsed, "
                   f"{res['n_wrong']} wrong.", "",
                   actionability.first_token_markdown(res["first_token"]) if res["first_token"] else "No parsed answers.",
                   ""]
            continue
        md += [f"## {section}", "", f"{res['n_items']} captions, {res['n_mentions']} object mentions, "
               f"{res['n_hallucinated']} hallucinated.", "", "### Hallucinated against grounded object words", ""]
        rows_ = [premise.PremiseRow(**r) for r in res["rows"]]
        md += [premise.premise_markdown(rows_) if rows_ else "No object mentions.", ""]
        md += [row_tables_markdown(res)]
    paths.insert(0, write_text_atomic("\n".join(md) + "\n", out / "premise.md"))
    paths.insert(0, write_json_atomic(result, out / "premise.json"))
    result["paths"] = paths
    return result
