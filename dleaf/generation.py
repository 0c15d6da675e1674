"""The one generation loop: a reply per prompt and image under a decoding :class:`~dleaf.settings.Setting`.

For every item (anything with an ``id``, a ``prompt`` and an ``image``: a PIL image or a function returning one)
:func:`generate` yields one row, in item order::

    {"id", "raw", "text", "n_tokens", "stopped"}         (+ "flags": [flagged, watched] with flags=True)

* ``raw``: the reply decoded up to its first end-of-sequence token (special tokens skipped, whitespace stripped);
  a reply without one loses trailing padding. ``n_tokens`` counts the kept tokens; ``stopped`` is ``"eos"``, or
  ``"length"`` when the reply reached ``max_new_tokens`` without ending.
* ``text``: ``raw`` after the trailing-incomplete-sentence rule (:func:`apply_sentence_rule`; ``"keep"`` leaves it
  unchanged, ``"drop"`` removes what follows the last sentence end of a reply cut by the token limit).
* Prompts are formatted with the processor's own chat template (:func:`dleaf.models.chat_prompt`) and batched with
  left padding. With sampling, every item is generated alone after ``torch.manual_seed`` of a seed derived from the
  setting's seed and the item's id (:func:`item_seed`), so a row does not depend on its batch or on the order.
* The setting's method is attached for the whole call; extra ``generate`` arguments a method needs (a logits
  processor for contrastive decoding) come from ``dleaf.engine.generation_kwargs`` when the engine provides it.
* ``flags=True`` records, for methods that flag layers (D-LEAF and its variants), each reply's number of flagged
  (position, layer) cells and of watched cells; summed over replies they give the method's flag rate.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .models import model_inputs
from .settings import Setting

SENTENCE_RULES: tuple[str, ...] = ("drop", "keep")
SENTENCE_ENDS = (".", "!", "?")


def apply_sentence_rule(text: str, cut: bool, rule: str) -> str:
    """The trailing-incomplete-sentence rule. ``drop``: when the reply was cut by the token limit (``cut``) and does
    not end with a sentence end (``.``, ``!`` or ``?``), remove what follows its last sentence end; a reply with no
    sentence end at all is kept whole. ``keep``: return ``text`` (stripped) unchanged."""
    if rule not in SENTENCE_RULES:
        raise ValueError(f"unknown trailing-sentence rule {rule!r}; expected one of {', '.join(SENTENCE_RULES)}")
    text = text.strip()
    if rule == "keep" or not cut or text.endswith(SENTENCE_ENDS):
        return text
    last = max(text.rfind(e) for e in SENTENCE_ENDS)
    return text if last < 0 else text[: last + 1].strip()


def item_seed(seed: int, item_id: str) -> int:
    """The sampling seed of one item: the first 4 bytes (little-endian) of SHA-256 of ``"{seed}:{item_id}"``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}".encode()).digest()[:4], "little")


def _image(item):
    image = item.image
    return image() if callable(image) else image


def _flag_counts(intervention, n: int) -> list[list[int]] | None:
    """Per sample, [flagged, watched] (position, layer) cells of a traced intervention's steps."""
    trace = getattr(intervention, "trace", None)
    if trace is None:
        return None
    counts = [[0, 0] for _ in range(n)]
    for step in trace.steps:
        active = step["active"]
        for rec in step["layers"].values():
            flagged = (rec["flag"] & active).sum(-1).tolist()
            total = active.sum(-1).tolist()
            for b in range(n):
                counts[b][0] += int(flagged[b])
                counts[b][1] += int(total[b])
    return counts


def _flags_method(setting: Setting) -> bool:
    config = setting.config()
    return config is not None and getattr(config, "traces_flags", False)  # methods whose traces hold flags


def _extra_kwargs(intervention, inputs) -> dict:
    from . import engine

    fn = getattr(engine, "generation_kwargs", None)
    return dict(fn(intervention, inputs)) if fn is not None else {}


def generate(model, processor, items: Sequence[Any], setting: Setting = Setting(), max_new_tokens: int = 64,
             batch_size: int = 16, sentence_rule: str = "keep", flags: bool = False,
             on_batch: Callable[[int], None] | None = None, intervention=None,
             token_ids: bool = False) -> Iterator[dict]:
    """Yield one row per item, in order (see the module docstring). ``on_batch(n)`` is called after each batch with
    the number of rows it produced (for progress bars). ``intervention``: the setting's method already attached by
    the caller (for example with ``trace=True`` to keep its trace), which is then not attached again.
    ``token_ids=True`` adds each reply's generated token ids up to and including its end-of-sequence token
    (``"token_ids"``)."""
    import torch

    if sentence_rule not in SENTENCE_RULES:
        raise ValueError(f"unknown trailing-sentence rule {sentence_rule!r}; expected one of "
                         f"{', '.join(SENTENCE_RULES)}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be positive, got {max_new_tokens}, {batch_size}")
    items = list(items)
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, **setting.generate_kwargs()}
    if setting.sampling:
        batch_size = 1
    tok = getattr(processor, "tokenizer", processor)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    record_flags = flags and setting.strategy != "beam" and _flags_method(setting)
    if intervention is not None:
        record_flags = False
        context = contextlib.nullcontext(intervention)
    else:
        context = setting.attached(model, **({"trace": True} if record_flags else {}))
    with context as iv, torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = model_inputs(processor, [it.prompt for it in chunk], [_image(it) for it in chunk], model)
            if setting.sampling:
                torch.manual_seed(item_seed(setting.seed, str(chunk[0].id)))
            if record_flags:
                iv.trace.steps.clear()
            out = model.generate(**batch, **gen_kwargs, **_extra_kwargs(iv, batch))
            new = out[:, batch["input_ids"].shape[1]:].tolist()
            counts = _flag_counts(iv, len(chunk)) if record_flags else None
            for k, (it, ids) in enumerate(zip(chunk, new)):
                stop = next((j for j, t in enumerate(ids) if t in eos_ids), None)
                kept = ids if stop is None else ids[:stop]
                if tok.pad_token_id is not None and stop is None:
                    while kept and kept[-1] == tok.pad_token_id:
                        kept = kept[:-1]
                raw = tok.decode(kept, skip_special_tokens=True).strip()
                cut = stop is None and len(kept) >= max_new_tokens
                row = {"id": it.id, "raw": raw, "text": apply_sentence_rule(raw, cut, sentence_rule),
                       "n_tokens": len(kept), "stopped": "length" if cut else "eos"}
                if counts is not None:
                    row["flags"] = counts[k]
                if token_ids:
                    row["token_ids"] = ids if stop is None else ids[:stop + 1]
                yield row
            if on_batch is not None:
                on_batch(len(chunk))


def generate_texts(model, processor, prompts: Sequence[str], images: Sequence, setting: Setting = Setting(),
                   max_new_tokens: int = 64, batch_size: int = 16, sentence_rule: str = "keep",
                   ids: Iterable[str] | None = None) -> list[str]:
    """The ``text`` of :func:`generate` for parallel lists of prompts and images (ids default to ``0, 1, ...``)."""
    from types import SimpleNamespace

    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(prompts))]
    items = [SimpleNamespace(id=i, prompt=p, image=im) for i, p, im in zip(ids, prompts, images)]
    return [r["text"] for r in generate(model, processor, items, setting, max_new_tokens, batch_size, sentence_rule)]
