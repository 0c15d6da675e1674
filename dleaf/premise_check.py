"""The premise check for any model with ground truth: at every object word of its captions, each layer's LIAE and
image mass, split by whether the object is really in the image.

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
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import engine, metrics, premise
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
    counts = [len(metrics.tokenize(tokenizer.decode(list(response_ids[:j + 1]), skip_special_tokens=True)))
              for j in range(len(response_ids))]
    out = []
    for m in mentions:
        j = next((j for j, c in enumerate(counts) if c > m.word_index), None)
        if j is not None:
            out.append((j, m))
    return out


ERROR_KINDS = ("addition", "substitution", "mixed")


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


@torch.no_grad()
def attention_records(model, processor, images: Sequence, prompts: Sequence[str], replies: Sequence[str],
                      truths: Sequence[Sequence[str]], vocab: metrics.ObjectVocabulary, batch_size: int = 8,
                      progress=None) -> tuple[list[dict], list[float]]:
    """One record per object mention (``sample``, ``word`` (category), ``hallucinated``, and per layer ``liae``,
    the entropy of the head-mixed image profile in nats, and ``mass``, the head-mean image mass), and per layer the
    image share of attention: the head-mean image mass averaged over every row that predicts a reply token."""
    if not len(images) == len(prompts) == len(replies) == len(truths):
        raise ValueError(f"images, prompts, replies and truths differ in length: {len(images)}, {len(prompts)}, "
                         f"{len(replies)}, {len(truths)}")
    tok = processor.tokenizer
    config = DLeafConfig(gamma=0.0, layer_signal="liae", liae_variant="mixed", liae_normalize=False,
                         iaf_variant="mass")
    records: list[dict] = []
    share_sum, share_n = None, 0
    steps = range(0, len(images), batch_size)
    for start in (progress(steps) if progress else steps):
        sl = slice(start, start + batch_size)
        full, n, reply_ids = teacher_forced_inputs(processor, prompts[sl], images[sl], replies[sl], model)
        with engine.attached(model, config, trace=True) as iv:
            engine.response_logprobs(model, full, [n] * len(reply_ids), iv)
        for i, r in enumerate(reply_ids):
            tr = iv.trace.sample(i)
            row_of = {int(p): k for k, p in enumerate(tr["positions"])}
            mass = tr["iaf"].mean(-1)  # (T, L): head-mean image mass per row and layer
            reply_rows = [row_of[n + j - 1] for j in range(len(r))]
            if reply_rows:
                part = mass[reply_rows].double().sum(0)
                share_sum = part if share_sum is None else share_sum + part
                share_n += len(reply_rows)
            truth = set(truths[start + i])
            mentions = mention_token_offsets(tok, r, vocab)
            kind = error_kind({m.category for _, m in mentions}, truth)
            for j, m in mentions:
                k = row_of[n + j - 1]  # the row that predicts the mention's first token
                hallucinated = m.category not in truth
                records.append({"sample": start + i, "word": m.category, "hallucinated": hallucinated,
                                "error": kind if hallucinated else None,
                                "liae": tr["signal"][k].tolist(), "mass": mass[k].tolist()})
    share = (share_sum / max(share_n, 1)).tolist() if share_sum is not None else []
    return records, share


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


# ---------------------------------------------------------------------------------------------------------------
# The premise check of a harness run
# ---------------------------------------------------------------------------------------------------------------


def check_run(config: dict, model: str | None = None) -> str:
    """The model to score a harness run's replies with (the run's own). Refuses, as an
    :class:`~dleaf.io.InputError`: a run that is not a caption run, a run decoded with a method attached or with
    sampling or beam search (the check re-scores the replies with nothing attached, so only greedy replies are the
    model's own greedy choices), and a ``model`` other than the one that wrote the replies."""
    from .eval import get_benchmark
    from .io import InputError

    bench = config.get("benchmark")
    if get_benchmark(bench).kind != "caption":
        raise InputError(f"the run is a {bench} run; the premise check needs a caption benchmark (object words)")
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
    if "splits" in spec.options and "splits" not in opts:
        opts["splits"] = config["sections"]
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
    for section in sections:
        part = [it for it in items if it.section == section]
        say(f"[premise] {section}: scoring {len(part)} replies")
        records, share = attention_records(net, processor, [it.image() for it in part], [it.prompt for it in part],
                                           [by_id[it.id]["raw"] for it in part], [sorted(it.truth) for it in part],
                                           benchmark.vocab, batch_size=batch_size, progress=progress)
        table = premise_rows(records, n_bootstrap, seed)
        result["sections"][section] = {
            "n_items": len(part), "n_mentions": len(records),
            "n_hallucinated": sum(r["hallucinated"] for r in records), "image_share": share,
            "rows": [dataclasses.asdict(r) for r in table], "records": records}
        if table:
            name = "premise.png" if len(sections) == 1 else f"premise_{section.replace('/', '_')}.png"
            paths.append(premise.plot_premise(table, out / name, title=f"{model}, run {run_dir.name}, {section}"))
    md = [f"# Premise check: {model}, run {run_dir.name}", "",
          "Per layer, how well each signal separates hallucinated object words from grounded ones (AUROC; 0.5 = no "
          "separation). `liae` is the entropy of the layer's head-mixed image-attention profile; "
          "`image_mass_deficit` is minus the head-mean attention mass on image tokens; both are read at the row "
          "that predicts the word. AUROC above 0.5: the signal is larger at hallucinated words, as the premise "
          "says; below 0.5: it points the other way.", ""]
    for section, res in result["sections"].items():
        md += [f"## {section}", "", f"{res['n_items']} captions, {res['n_mentions']} object mentions, "
               f"{res['n_hallucinated']} hallucinated.", ""]
        rows_ = [premise.PremiseRow(**r) for r in res["rows"]]
        md += [premise.premise_markdown(rows_) if rows_ else "No object mentions.", ""]
    paths.insert(0, write_text_atomic("\n".join(md) + "\n", out / "premise.md"))
    paths.insert(0, write_json_atomic(result, out / "premise.json"))
    result["paths"] = paths
    return result
