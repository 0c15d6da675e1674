"""The premise check for any model with ground truth: at every object word of its captions, each layer's LIAE and
image mass, split by whether the object is really in the image (METHOD.md, "The premise").

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

from typing import Callable, Sequence

import numpy as np
import torch

from . import engine, metrics, premise
from .config import DLeafConfig

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


@torch.no_grad()
def premise_records(model, processor, images: Sequence, prompts: Sequence[str], replies: Sequence[str],
                    truths: Sequence[Sequence[str]], vocab: metrics.ObjectVocabulary,
                    chat: Callable[[str], list] | None = None, batch_size: int = 8, progress=None) -> list[dict]:
    """One record per object mention: ``sample``, ``word`` (category), ``hallucinated``, and per layer ``liae``
    (entropy of the head-mixed image profile, in nats) and ``mass`` (head-mean image mass)."""
    if not len(images) == len(prompts) == len(replies) == len(truths):
        raise ValueError(f"images, prompts, replies and truths differ in length: {len(images)}, {len(prompts)}, "
                         f"{len(replies)}, {len(truths)}")
    if chat is None:
        from .models import user_turn as chat
    tok = processor.tokenizer
    config = DLeafConfig(gamma=0.0, layer_signal="liae", liae_variant="mixed", liae_normalize=False,
                         iaf_variant="mass")
    device = next(model.parameters()).device
    records: list[dict] = []
    steps = range(0, len(images), batch_size)
    for start in (progress(steps) if progress else steps):
        sl = slice(start, start + batch_size)
        texts = [processor.apply_chat_template(chat(p), add_generation_prompt=True, tokenize=False)
                 for p in prompts[sl]]
        batch = processor(text=texts, images=list(images[sl]), return_tensors="pt", padding=True)
        reply_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in replies[sl]]
        width = max(1, max(len(r) for r in reply_ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(reply_ids), width), pad, dtype=batch["input_ids"].dtype)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(reply_ids):
            ids[i, :len(r)] = torch.tensor(r, dtype=ids.dtype)
            mask[i, :len(r)] = 1
        n = batch["input_ids"].shape[1]
        full = {**batch, "input_ids": torch.cat([batch["input_ids"], ids], 1),
                "attention_mask": torch.cat([batch["attention_mask"], mask], 1)}
        if "mm_token_type_ids" in full:
            full["mm_token_type_ids"] = torch.cat([full["mm_token_type_ids"], torch.zeros_like(ids)], 1)
        full = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in full.items()}
        with engine.attached(model, config, trace=True) as iv:
            engine.response_logprobs(model, full, [n] * len(reply_ids), iv)
        for i, r in enumerate(reply_ids):
            tr = iv.trace.sample(i)
            row_of = {int(p): k for k, p in enumerate(tr["positions"])}
            truth = set(truths[start + i])
            for j, m in mention_token_offsets(tok, r, vocab):
                k = row_of[n + j - 1]  # the row that predicts the mention's first token
                records.append({"sample": start + i, "word": m.category, "hallucinated": m.category not in truth,
                                "liae": tr["signal"][k].tolist(), "mass": tr["iaf"][k].mean(-1).tolist()})
    return records


def premise_rows(records: Sequence[dict], n_bootstrap: int = 2000, seed: int = 0) -> list[premise.PremiseRow]:
    """Per layer and signal (LIAE; image-mass deficit = -mass, both 'larger = more anomalous'), the AUROC of
    hallucinated against grounded mentions with a bootstrap interval."""
    if not records:
        return []
    hall = np.array([r["hallucinated"] for r in records], dtype=bool)
    signals = {"liae": np.array([r["liae"] for r in records], float),
               "image_mass_deficit": -np.array([r["mass"] for r in records], float)}
    return premise.premise_table(signals, hall, n_resamples=n_bootstrap, seed=seed)
