"""The attention regime of a vision-language decoder: per layer, how its generated rows spread their attention over
the keys, the image tokens among them and, at object words, the object's own image tokens.

Four regimes are known from real checkpoints (LLaVA-1.5 and its kin) and judged here: an attention **sink** (one
text key, usually the first token, takes a large share of every row's attention from the second or third layer
on), an **image-attention deficit** (the image tokens get far less attention than their share of the keys),
**visual sinks** (a few image tokens take much of the image attention, the same ones row after row), and
**grounding heads** (heads that, at an object word, look at the object's own image tokens). The statistics are
pure functions of one layer's post-softmax attention ``(..., H, Q, K)`` (the notation of
:mod:`dleaf.attention_stats`); :func:`regime_records` runs them on any model with eager attention, teacher-forced on
its own replies; :func:`regime_table` summarises them per layer (median and 10th and 90th percentiles) and
:func:`regime_targets` judges the four regimes.

Per generated row ``q`` (a row that predicts a reply token), with ``a[h, q, k]`` the attention of head ``h``,
``I`` the image keys, ``V(q)`` the keys row ``q`` may attend to (causal, not padding) and ``p[h, q]`` head ``h``'s
image profile (its image attention renormalised to sum to 1):

* ``sink``: ``max_{k in V(q) \\ I} mean_h a[h, q, k]``, the largest head-mean weight any single non-image key
  receives; ``sink_head``: ``max_h max_{k not in I} a[h, q, k]``, the same for the most concentrated head;
  ``sink_key``: where that key (the argmax of ``sink``) lies: the first key (``first``), another prompt key
  (``prompt``: the system prompt, the question, the chat template) or a key of the reply itself (``reply``);
* ``first``: ``mean_h a[h, q, k0]``, the head-mean weight on the first key the row may attend to (``<s>`` where
  the tokenizer adds one), beside ``uniform``: ``1 / |V(q)|``, what any key would get under uniform attention;
* ``mass_ratio``: ``mean_h sum_{i in I} a[h, q, i]`` divided by ``|I| / |V(q)|``: 1 is attention spread evenly
  over the keys, below 1 a deficit of image attention;
* ``top_share``: ``mean_h max_i p[h, q, i]``, the top image token's share of a head's image mass (``1 / |I|`` when
  the profile is uniform); per head the top token ``argmax_i p[h, q, i]`` (index among the image tokens);
* ``liae``: the normalised LIAE, ``H(mean_h p[h, q]) / log |I|`` (1 = uniform over the image tokens), and
  ``head_entropy[h]``: ``H(p[h, q]) / log |I|`` per head;
* per caption, ``consistency``: for each head the share of the caption's rows whose top image token is the
  caption's modal top token for that head, averaged over heads (1 = the same image token on top at every row);
* at a row predicting the first token of a grounded object word with a known region ``R`` (image tokens of the
  object), ``region[h]``: ``sum_{i in R} p[h, q, i]``, head ``h``'s share of its image mass on the object, beside
  ``chance``: ``|R| / |I|``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from .attention_stats import entropy, image_profile, layer_entropy

__all__ = ["ROW_STATS", "SINK_KEYS", "THRESHOLDS", "middle_layers", "key_mask", "key_share", "sink_weights",
           "key_weight", "mass_ratio", "sink_key", "top_image", "head_entropy", "region_share", "top_consistency", "summarize",
           "batch_stats", "regime_records", "regime_table", "regime_targets", "regime_markdown", "box_tokens", "eager_attention",
           "regime_of_run", "REGIME_INTRO"]

#: Per-row, per-layer statistics of :func:`regime_records` (module docstring).
ROW_STATS = ("sink", "sink_head", "first", "uniform", "mass_ratio", "top_share", "liae")

#: Where a row's sink key lies (:func:`sink_key`, codes 0, 1, 2 in :func:`regime_records`' ``sink_key``).
SINK_KEYS = ("first", "prompt", "reply")

#: The issue's thresholds for the four regimes (:func:`regime_targets`).
THRESHOLDS = {"sink": 0.30, "sink_from_layer": 2, "deficit": 0.5, "visual_sink_share": 0.2,
              "visual_sink_consistency": 0.7, "grounding": 0.5, "min_grounded": 20}


def middle_layers(n_layers: int) -> list[int]:
    """The middle layers of an ``n_layers``-layer decoder: layers ``l`` (from 0) with ``L/4 <= l < 3L/4``, the
    middle half (layers 2-4 of 6, 8-23 of 32)."""
    if n_layers <= 0:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    return [l for l in range(n_layers) if n_layers <= 4 * l < 3 * n_layers] or [n_layers // 2]


def key_mask(valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The keys each row may attend to: ``valid`` (``(K,)``, False at padding) and causal (key index <= row
    index); shape ``(Q, K)`` for ``rows`` of shape ``(Q,)`` (absolute positions)."""
    k = torch.arange(valid.shape[-1], device=valid.device)
    return valid.bool()[None, :] & (k[None, :] <= rows[:, None])


def key_share(image_mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The image tokens' share of the keys each row may attend to: ``|I & V(q)| / |V(q)|``; ``image_mask``
    ``(K,)``, ``keys`` ``(..., Q, K)``; returns ``(..., Q)``."""
    n = keys.sum(-1).clamp(min=1)
    return (keys & image_mask).sum(-1).to(torch.float64) / n.to(torch.float64)


def sink_weights(attn: torch.Tensor, image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sink, sink_head)`` per row, shape ``(..., Q)``: the largest head-mean weight on a single non-image key,
    and the largest weight any head puts on a single non-image key."""
    neg = torch.tensor(-1.0, dtype=attn.dtype, device=attn.device)
    head = torch.where(~image_mask, attn, neg).amax(-1).amax(-2)
    return _text_key_means(attn, image_mask).amax(-1), head


def _text_key_means(attn: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """The head-mean weight of every key, -1 at image keys (so that a max or argmax sees text keys only)."""
    neg = torch.tensor(-1.0, dtype=attn.dtype, device=attn.device)
    return torch.where(~image_mask, attn.mean(-3), neg)


def sink_key(attn: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """The index of the non-image key with the largest head-mean weight at each row (the key :func:`sink_weights`
    measures), shape ``(..., Q)``."""
    return _text_key_means(attn, image_mask).argmax(-1)


def key_weight(attn: torch.Tensor, index: int) -> torch.Tensor:
    """The head-mean weight every row puts on key ``index``, shape ``(..., Q)``."""
    return attn[..., index].mean(-2)


def mass_ratio(attn: torch.Tensor, image_mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Head-mean image mass over the image tokens' share of the keys (:func:`key_share`), shape ``(..., Q)``."""
    mass = torch.where(image_mask, attn, torch.zeros((), dtype=attn.dtype, device=attn.device)).sum(-1).mean(-2)
    return mass.to(torch.float64) / key_share(image_mask, keys).clamp(min=1e-12)


def top_image(attn: torch.Tensor, image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head and row, the top image token's share of the head's image mass and its index among the image tokens
    (0 for the first image key), both ``(..., H, Q)``; ``image_mask`` is ``(K,)``."""
    p = image_profile(attn, image_mask, check=False)[..., image_mask]
    share, idx = p.max(-1)
    return share, idx


def head_entropy(attn: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of each head's image profile, ``H(p[h, q]) / log |I|``, shape ``(..., H, Q)``."""
    n = int(image_mask.sum())
    p = image_profile(attn, image_mask, check=False)
    return entropy(p, dim=-1) / math.log(n) if n > 1 else torch.zeros(p.shape[:-1], dtype=attn.dtype)


def region_share(attn: torch.Tensor, image_mask: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Each head's share of its image mass on the image keys in ``region`` (bool ``(K,)`` or ``(..., Q, K)``, only
    image keys count), shape ``(..., H, Q)``."""
    p = image_profile(attn, image_mask, check=False)
    region = (region & image_mask).unsqueeze(-3) if region.dim() > 1 else region & image_mask
    return torch.where(region, p, torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)


def top_consistency(top: torch.Tensor) -> float:
    """For top image tokens ``(H, R)`` (each head's top token at each of a caption's rows): per head the share of
    rows whose top token is the head's modal one, averaged over heads."""
    if top.shape[-1] == 0:
        return math.nan
    shares = [float(torch.bincount(t.long()).max()) / t.shape[0] for t in top]
    return float(np.mean(shares))


def summarize(values) -> dict:
    """``median``, ``p10``, ``p90`` (linear interpolation, NaNs left out) and ``n`` of a set of values."""
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if not len(x):
        return {"median": math.nan, "p10": math.nan, "p90": math.nan, "n": 0}
    p10, med, p90 = np.percentile(x, [10, 50, 90])
    return {"median": float(med), "p10": float(p10), "p90": float(p90), "n": int(len(x))}


@contextlib.contextmanager
def eager_attention(model):
    """Run ``model`` with eager attention inside the block (attention weights exist only there), restoring its own
    implementation afterwards."""
    before = getattr(model.config, "_attn_implementation", None)
    if before == "eager" or not hasattr(model, "set_attn_implementation"):
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def _image_token_id(model) -> int:
    for key in ("image_token_id", "image_token_index"):
        value = getattr(model.config, key, None)
        if value is not None:
            return int(value)
    raise ValueError("the model's config names no image token (image_token_id / image_token_index); pass "
                     "image_token_id")


@torch.no_grad()
def batch_stats(model, inputs: Mapping, prompt_width: int, reply_ids: Sequence[Sequence[int]],
                grounded: Sequence[Sequence[tuple[int, Sequence[int]]]] | None = None,
                image_token_id: int | None = None) -> list[dict | None]:
    """The regime statistics of one teacher-forced batch: ``inputs`` hold each prompt (left-padded, ``prompt_width``
    columns) followed by its reply (right-padded), as :func:`dleaf.models.teacher_forced_inputs` builds them; one
    eager forward pass. ``grounded[i]``: ``(j, tokens)`` pairs, reply token ``j`` of sample ``i`` starting a
    grounded object word whose object covers image tokens ``tokens`` (indices among the image tokens).

    Per sample (None for an empty reply): ``rows`` (each :data:`ROW_STATS` name: ``(R, L)``), ``sink_key``
    ``(R, L)`` (an index into :data:`SINK_KEYS`), ``head_entropy`` ``(R, L, H)``, ``consistency`` ``(L,)`` (None
    under two rows), ``region`` ``(G, L, H)`` and ``chance`` ``(G,)``."""
    image_id = _image_token_id(model) if image_token_id is None else int(image_token_id)
    n = int(prompt_width)
    with eager_attention(model):
        attns = model(**inputs, output_attentions=True, use_cache=False).attentions
    out: list[dict | None] = []
    for i, r in enumerate(reply_ids):
        if not len(r):
            out.append(None)
            continue
        ids, valid = inputs["input_ids"][i], inputs["attention_mask"][i].bool()
        image_mask = (ids == image_id) & valid
        if not bool(image_mask.any()):
            raise ValueError(f"sample {i} of the batch has no image tokens (image token id {image_id})")
        q = torch.arange(n - 1, n - 1 + len(r), device=ids.device)
        keys = key_mask(valid, q)
        first = int(valid.nonzero()[0])
        stats: dict[str, list] = {k: [] for k in ROW_STATS}
        ent, tops, where = [], [], []
        for layer in attns:
            a = layer[i][:, q, :].float()  # (H, R, K)
            sink, sink_head = sink_weights(a, image_mask)
            share, top = top_image(a, image_mask)
            stats["sink"].append(sink)
            stats["sink_head"].append(sink_head)
            k = sink_key(a, image_mask)
            where.append(torch.where(k == first, 0, torch.where(k < n, 1, 2)))
            stats["first"].append(key_weight(a, first))
            stats["uniform"].append(1.0 / keys.sum(-1).double())
            stats["mass_ratio"].append(mass_ratio(a, image_mask, keys))
            stats["top_share"].append(share.mean(0))
            stats["liae"].append(layer_entropy(a, image_mask, normalize=True, check=False))
            ent.append(head_entropy(a, image_mask))
            tops.append(top)
        rec = {"rows": {k: torch.stack(v, -1).double().cpu().numpy() for k, v in stats.items()},
               "sink_key": torch.stack(where, -1).cpu().numpy(),
               "head_entropy": torch.stack(ent, 0).permute(2, 0, 1).double().cpu().numpy(),
               "consistency": np.array([top_consistency(t.cpu()) for t in tops]) if len(r) >= 2 else None}
        img_pos = image_mask.nonzero().squeeze(-1)
        region, chance = [], []
        for j, tokens in (grounded[i] if grounded is not None else []):
            where = torch.zeros_like(image_mask)
            where[img_pos[torch.as_tensor(list(tokens), dtype=torch.long, device=ids.device)]] = True
            row = torch.tensor([n - 1 + j], device=ids.device)
            region.append(np.stack([region_share(layer[i][:, row, :].float(), image_mask, where)[:, 0]
                                    .double().cpu().numpy() for layer in attns]))
            chance.append(len(tokens) / len(img_pos))
        rec["region"], rec["chance"] = region, chance
        out.append(rec)
    return out


def regime_records(model, processor, images: Sequence, prompts: Sequence[str], replies: Sequence[str],
                   truths: Sequence[Sequence[str]] | None = None, vocab=None,
                   regions: Sequence[Mapping[str, Sequence[int]]] | None = None, batch_size: int = 8,
                   image_token_id: int | None = None, progress: Callable | None = None) -> dict:
    """The regime statistics of caption replies, teacher-forced in one eager forward pass per batch over the prompt
    and the reply (the attention the model had while generating them; :func:`batch_stats`).

    ``regions[i]`` maps an object category to its image tokens in sample ``i`` (indices among the image tokens, in
    order); with ``truths`` and ``vocab`` (:class:`dleaf.metrics.ObjectVocabulary`) the rows predicting the first
    token of a grounded mention whose category has a region give the grounding records.

    Returns ``rows``: per :data:`ROW_STATS` name an array ``(R, L)`` over every generated row, ``sink_key``
    ``(R, L)`` (indices into :data:`SINK_KEYS`), ``head_entropy``
    ``(R, L, H)``, ``caption`` (sample index per row); ``consistency`` ``(C, L)`` per caption with at least two rows;
    ``grounding``: ``region`` ``(G, L, H)``, ``chance`` ``(G,)``, ``word`` and ``sample`` per grounded row."""
    from .models import teacher_forced_inputs
    from .premise_check import mention_token_offsets

    if not len(images) == len(prompts) == len(replies):
        raise ValueError(f"images, prompts and replies differ in length: {len(images)}, {len(prompts)}, "
                         f"{len(replies)}")
    if (regions is not None) and (truths is None or vocab is None or len(regions) != len(images)):
        raise ValueError("regions need truths and a vocabulary, one region map per image")
    tok = getattr(processor, "tokenizer", processor)
    rows: dict[str, list] = {k: [] for k in ROW_STATS + ("sink_key", "head_entropy", "caption")}
    consistency, ground = [], {"region": [], "chance": [], "word": [], "sample": []}
    steps = range(0, len(images), batch_size)
    for start in (progress(steps) if progress else steps):
        sl = slice(start, start + batch_size)
        full, n, reply_ids = teacher_forced_inputs(processor, prompts[sl], images[sl], replies[sl], model)
        grounded, words = None, []
        if regions is not None:
            grounded = []
            for i, r in enumerate(reply_ids):
                truth, reg = set(truths[start + i]), regions[start + i]
                hits = [(j, m.category) for j, m in mention_token_offsets(tok, r, vocab)
                        if m.category in truth and m.category in reg]
                grounded.append([(j, reg[c]) for j, c in hits])
                words.append([c for _, c in hits])
        for i, rec in enumerate(batch_stats(model, full, n, reply_ids, grounded, image_token_id)):
            if rec is None:
                continue
            for k in ROW_STATS:
                rows[k].append(rec["rows"][k])
            rows["sink_key"].append(rec["sink_key"])
            rows["head_entropy"].append(rec["head_entropy"])
            rows["caption"].append(np.full(len(reply_ids[i]), start + i))
            if rec["consistency"] is not None:
                consistency.append(rec["consistency"])
            ground["region"] += rec["region"]
            ground["chance"] += rec["chance"]
            if words:
                ground["word"] += words[i]
                ground["sample"] += [start + i] * len(words[i])
    cat = (lambda xs: np.concatenate(xs, 0) if xs else np.zeros((0,)))
    return {"rows": {k: cat(v) for k, v in rows.items()},
            "consistency": np.asarray(consistency, dtype=float),
            "grounding": {"region": np.asarray(ground["region"], dtype=float),
                          "chance": np.asarray(ground["chance"], dtype=float),
                          "word": ground["word"], "sample": ground["sample"]},
            "n_captions": len(images)}


def regime_table(records: dict) -> dict:
    """Per layer, :func:`summarize` of every statistic over the generated rows (``consistency`` over captions,
    ``region`` over grounded rows), with per-head detail: ``head_entropy`` pooled over (row, head) pairs and the
    most focused head (lowest median); ``top_share_best_head`` (highest median top share); for grounding, the best
    head (highest median ``region``) and the row-wise best head (``max_h region[h]`` at each row); ``sink_key``: the
    share of rows whose sink key is the first key, another prompt key or a reply key (:data:`SINK_KEYS`)."""
    r = records["rows"]
    n_layers = r["sink"].shape[1] if r["sink"].ndim == 2 else 0
    layers = []
    g = records["grounding"]
    for l in range(n_layers):
        row = {"layer": l, **{k: summarize(r[k][:, l]) for k in ROW_STATS}}
        if "sink_key" in r and len(r["sink_key"]):
            codes = np.asarray(r["sink_key"][:, l])
            row["sink_key"] = {name: float(np.mean(codes == i)) for i, name in enumerate(SINK_KEYS)}
        ent = r["head_entropy"][:, l, :]
        row["head_entropy"] = summarize(ent)
        medians = np.nanmedian(ent, 0)
        h = int(np.argmin(medians))
        row["head_entropy_min_head"] = {"head": h, **summarize(ent[:, h])}
        row["consistency"] = summarize(records["consistency"][:, l]) if len(records["consistency"]) else summarize([])
        if len(g["region"]):
            reg = g["region"][:, l, :]
            h = int(np.argmax(np.median(reg, 0)))
            row["grounding_head"] = {"head": h, **summarize(reg[:, h])}
            row["grounding_rowmax"] = summarize(reg.max(-1))
        layers.append(row)
    out = {"n_layers": n_layers, "middle_layers": middle_layers(n_layers) if n_layers else [],
           "n_rows": int(r["sink"].shape[0]) if n_layers else 0, "n_captions": records.get("n_captions", 0),
           "n_grounded": int(len(g["region"])), "layers": layers}
    if len(g["chance"]):
        out["grounding_chance"] = float(np.mean(g["chance"]))
    return out


def _number(x) -> float:
    """A summary's value, NaN for a missing one (a table read back from JSON holds None there)."""
    return math.nan if x is None else float(x)


def regime_targets(table: dict) -> list[dict]:
    """The four regimes judged on a :func:`regime_table` (``THRESHOLDS``; middle layers: :func:`middle_layers`):

    * sink: in some layer from the third (index 2) on, the median ``sink`` >= 0.30;
    * image-attention deficit: in every middle layer, the median ``mass_ratio`` <= 0.5;
    * visual sinks: in some middle layer, the median ``top_share`` >= 0.2 and the median ``consistency`` >= 0.7;
    * grounding heads: in some middle layer, a head whose median ``region`` share >= 0.5 (not judged on fewer than
      20 grounded rows with regions: the best of many heads' medians over a handful of rows is noise).

    Each entry: ``target``, ``measured`` (text), ``met`` (True, False, or None when not judged)."""
    t = THRESHOLDS
    layers = {row["layer"]: {k: ({**v, "median": _number(v.get("median"))} if isinstance(v, dict) else v)
                             for k, v in row.items()} for row in table["layers"]}
    mid = table["middle_layers"]
    span = f"layers {mid[0]}-{mid[-1]}" if mid else "no layers"
    out = []
    late = [l for l in layers if l >= t["sink_from_layer"]]
    best = max(late, key=lambda l: layers[l]["sink"]["median"], default=None)
    out.append({"target": f"sink: some key receives >= {t['sink']:.0%} of the attention (head mean, median over "
                          f"rows) in some layer from layer {t['sink_from_layer']} on",
                "measured": "no such layers" if best is None else
                f"largest median {layers[best]['sink']['median']:.3f} (layer {best})",
                "met": None if best is None else layers[best]["sink"]["median"] >= t["sink"]})
    ratios = [layers[l]["mass_ratio"]["median"] for l in mid]
    out.append({"target": f"image-attention deficit: median image mass / image share of keys <= {t['deficit']} "
                          f"in every middle layer ({span})",
                "measured": ", ".join(f"L{l} {x:.3f}" for l, x in zip(mid, ratios)),
                "met": bool(ratios) and all(x <= t["deficit"] for x in ratios)})
    share = [(l, layers[l]["top_share"]["median"], layers[l]["consistency"]["median"]) for l in mid]
    out.append({"target": f"visual sinks: in some middle layer ({span}) the top image token's median share of "
                          f"image mass >= {t['visual_sink_share']} and the same top token in >= "
                          f"{t['visual_sink_consistency']:.0%} of a caption's rows (median over captions)",
                "measured": ", ".join(f"L{l} {s:.3f} / {c:.0%}" for l, s, c in share),
                "met": any(s >= t["visual_sink_share"] and c >= t["visual_sink_consistency"] for _, s, c in share)})
    heads = [(l, layers[l]["grounding_head"]) for l in mid if "grounding_head" in layers[l]]
    top = max(heads, key=lambda x: x[1]["median"], default=None)
    few = table.get("n_grounded", 0) < t["min_grounded"]
    out.append({"target": f"grounding heads: some middle-layer ({span}) head puts a median >= "
                          f"{t['grounding']} of its image mass on the object's own image tokens",
                "measured": "no grounded rows with object regions" if top is None else
                f"best L{top[0]} head {top[1]['head']}: {top[1]['median']:.3f} (chance "
                f"{_number(table.get('grounding_chance')):.3f})"
                + (f", on only {table.get('n_grounded', 0)} grounded rows (at least {t['min_grounded']} needed to "
                   "judge)" if few else ""),
                "met": None if top is None or few else top[1]["median"] >= t["grounding"]})
    return out


REGIME_INTRO = (
    "Teacher-forced on the model's own greedy captions (eager attention), at every generated row (a row that predicts "
    "a reply token); per layer the median [10th, 90th percentile] over rows. *sink*: the largest head-mean weight on "
    "one non-image key; *sink key*: the share of rows whose sink is the first key, another prompt key (system prompt, "
    "question, template) or a key of the reply itself; *per-head sink*: the largest weight any head puts on one "
    "non-image key; *first key*: the "
    "head-mean weight on the first token (`<s>`), beside *uniform*, 1 / the number of keys the row sees; *mass / "
    "share*: head-mean image mass over the image tokens' share of the keys (1 = uniform, below 1 a deficit); *top "
    "share*: the top image token's share of a head's image mass, head mean (uniform: 1 / image tokens); *same top*: "
    "per caption, the share of its rows whose top image token is the caption's most frequent one, per head and "
    "averaged over heads (median over captions); *LIAE*: entropy of the head-mixed image profile over log(image "
    "tokens); *head entropy*: the same per head, pooled over (row, head) pairs, and the most focused head's; "
    "*grounding*: at rows predicting a grounded object word, the share of a head's image mass on the object's own "
    "image tokens, for the head with the highest median in the layer (and the best head of each row). Middle layers "
    "are layers l with L/4 <= l < 3L/4 (from 0).")


def _cell(s: dict, digits: int = 3) -> str:
    if not s or s.get("n", 0) == 0:
        return "-"
    return f"{s['median']:.{digits}f} [{s['p10']:.{digits}f}, {s['p90']:.{digits}f}]"


def regime_markdown(table: dict, heading: str = "###", name: str = "") -> str:
    """The regime tables and judged targets of a :func:`regime_table` as markdown."""
    title = f"{heading} Attention regime" + (f", {name}" if name else "")
    lines = [title, "", f"{table['n_rows']} generated rows of {table['n_captions']} captions; "
             f"{table['n_grounded']} grounded object rows with object regions"
             + (f" (chance share {table['grounding_chance']:.3f})" if "grounding_chance" in table else "")
             + f"; middle layers {', '.join(map(str, table['middle_layers']))}.", "",
             "| layer | sink | sink key: first / prompt / reply % | per-head sink | first key | uniform | mass / share "
             "| top share | same top |",
             "|---:|---|---|---|---|---|---|---|---|"]
    for row in table["layers"]:
        where = row.get("sink_key")
        where = " / ".join(f"{100 * where[k]:.0f}" for k in SINK_KEYS) if where else "-"
        lines.append(f"| {row['layer']} | {_cell(row['sink'])} | {where} | {_cell(row['sink_head'])} | "
                     f"{_cell(row['first'])} | "
                     f"{_cell(row['uniform'])} | {_cell(row['mass_ratio'])} | {_cell(row['top_share'])} | "
                     f"{_cell(row['consistency'], 2)} |")
    lines += ["", "| layer | LIAE | head entropy | most focused head | grounding, best head | grounding, best head "
              "per row |", "|---:|---|---|---|---|---|"]
    for row in table["layers"]:
        fh = row["head_entropy_min_head"]
        gh = row.get("grounding_head")
        lines.append(f"| {row['layer']} | {_cell(row['liae'])} | {_cell(row['head_entropy'])} | "
                     f"h{fh['head']} {_cell(fh)} | " + (f"h{gh['head']} {_cell(gh)}" if gh else "-") + " | "
                     f"{_cell(row.get('grounding_rowmax', {}))} |")
    lines += ["", "| regime | measured | present |", "|---|---|---|"]
    for t in regime_targets(table):
        met = "not judged" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def box_tokens(box: Sequence[float], image_size: tuple[int, int], grid: tuple[int, int],
               crop: str = "center") -> list[int]:
    """Row-major indices of the image tokens of a ``grid`` (rows, columns) whose patch centre lies inside ``box``
    (``x0, y0, x1, y1`` in pixels of the original image of ``image_size`` (width, height)); ``crop="center"`` for
    a processor that resizes the shortest side and crops the centre square (CLIP, LLaVA-1.5), ``"none"`` for a
    plain resize to the grid. For the optional COCO path (boxes per object)."""
    w, h = image_size
    x0, y0, x1, y1 = box
    if crop == "center":
        side = min(w, h)
        ox, oy = (w - side) / 2, (h - side) / 2
        x0, x1, y0, y1 = (x0 - ox) / side, (x1 - ox) / side, (y0 - oy) / side, (y1 - oy) / side
    elif crop == "none":
        x0, x1, y0, y1 = x0 / w, x1 / w, y0 / h, y1 / h
    else:
        raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
    rows, cols = grid
    out = []
    for r in range(rows):
        for c in range(cols):
            cx, cy = (c + 0.5) / cols, (r + 0.5) / rows
            if x0 <= cx <= x1 and y0 <= cy <= y1:
                out.append(r * cols + c)
    return out


def regime_of_run(run_dir, model: str | None = None, options: dict | None = None, protocol: str | None = None,
                  regions: Callable | None = None, batch_size: int = 8, say=print) -> dict:
    """The regime table of every section of a finished greedy caption run of the harness (``run_dir``, any
    benchmark and model: the run's own model scores its own replies, as in the premise check). ``regions(item)``,
    if given, maps a benchmark item to ``{category: image token indices}`` (for COCO with boxes:
    :func:`box_tokens`); without it there are no grounding statistics. Returns ``{section: table}``."""
    from . import eval as harness
    from . import models
    from .io import InputError
    from .premise_check import check_run

    config, rows = harness.read_run(run_dir)
    model = check_run(config, model)
    spec = harness.get_benchmark(config["benchmark"])
    opts = dict(options or {})
    if "splits" in spec.options and "splits" not in opts:
        opts["splits"] = config["sections"]
    limit = (config.get("protocol", {}).get("overrides") or {}).get("limit")
    bench = harness.build_benchmark(harness.EvalArguments(benchmark=config["benchmark"], protocol=protocol,
                                                          limit=limit, **opts))
    by_id = {r["id"]: r for r in rows}
    items = [it for it in bench.items if it.id in by_id]
    if not items or len(items) != len(by_id):
        raise InputError(f"{run_dir}: {len(by_id)} replies, {len(items)} of them items of the benchmark as given")
    net, processor = models.load(model, config.get("adapter"), dtype=config.get("dtype", "float32"))
    out = {}
    for section in dict.fromkeys(it.section for it in items):
        part = [it for it in items if it.section == section]
        say(f"[regime] {section}: {len(part)} replies")
        records = regime_records(net, processor, [it.image() for it in part], [it.prompt for it in part],
                                 [by_id[it.id]["raw"] for it in part], [sorted(it.truth) for it in part],
                                 bench.vocab, [regions(it) for it in part] if regions else None, batch_size)
        out[section] = regime_table(records)
    return out
