"""Turning vision preference rows into model inputs, exactly as TRL's ``DPOTrainer`` does, and batching them.

TRL's ``DataCollatorForVisionPreference`` renders conversational rows with the processor's chat template and
tokenizes them with ``add_special_tokens=False`` (so that templates which write their own BOS do not get two). A
template that writes no BOS (the organism's, LLaVA-1.5's) then trains the model on sequences without the ``<s>``
that ``processor(text=...)`` puts in front of every prompt at inference. :class:`VisionPreferenceCollator` renders
the rows itself, puts the BOS back where the tokenizer would add one, and hands the text rows to TRL's collator, so
padding, truncation and the completion mask stay TRL's own.

:func:`pair_batches` and :func:`response_batches` cut a list of rows into collated batches for scoring
(:mod:`dpo_link.rewards`): preference pairs (chosen rows first, rejected second, as TRL lays them out) or single
replies tokenized exactly as a chosen reply would be.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from .data import assistant_reply, user_prompt


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def tokenizer_adds_bos(processor) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text when asked for special tokens."""
    tok = tokenizer_of(processor)
    if tok.bos_token is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def images_of(example: dict) -> list:
    if "images" in example:
        images = example["images"]
        return [] if images is None else list(images)
    if "image" in example:
        return [] if example["image"] is None else [example["image"]]
    return []


def render_example(example: dict, processor, add_bos: bool) -> dict:
    """A row as text: ``prompt`` (chat template with the generation prompt, BOS in front when ``add_bos``),
    ``chosen`` and ``rejected`` (the completions as the template writes them), and its ``images``."""
    images = images_of(example)
    out = {k: example[k] for k in ("prompt", "chosen", "rejected")}
    if is_conversational(example):
        out["prompt"] = prepare_multimodal_messages(example["prompt"], images=images)
        out["chosen"] = prepare_multimodal_messages(example["chosen"])
        out["rejected"] = prepare_multimodal_messages(example["rejected"])
        out = apply_chat_template(out, processor)
    tok = tokenizer_of(processor)
    if add_bos and not out["prompt"].startswith(tok.bos_token):
        out["prompt"] = tok.bos_token + out["prompt"]
    out["images"] = images
    return out


@dataclasses.dataclass
class VisionPreferenceCollator(DataCollatorForVisionPreference):
    """TRL's vision preference collator with the tokenizer's BOS restored in front of each prompt.

    ``add_bos=None`` (default) decides from the tokenizer: True when it adds a BOS to plain text, as it does when a
    user calls ``processor(text=...)`` at inference.
    """

    add_bos: bool | None = None

    def __post_init__(self):
        if self.add_bos is None:
            self.add_bos = tokenizer_adds_bos(self.processor)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rendered = [render_example(e, self.processor, self.add_bos) for e in examples]
        return super().torch_call(rendered)


# ---------------------------------------------------------------------------------------------------- batches
def pair_batches(rows: Sequence[dict], processor, batch_size: int = 16,
                 max_length: int | None = None) -> Iterator[tuple[dict, slice]]:
    """Collated preference batches of TRL's vision format rows (``images``, ``prompt``, ``chosen``, ``rejected``),
    ``batch_size`` pairs each (so 2 x batch_size sequences: chosen first, rejected second), with the slice of rows
    each covers."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    collator = VisionPreferenceCollator(processor=processor, max_length=max_length)
    for i in range(0, len(rows), batch_size):
        chunk = [dict(r) for r in rows[i:i + batch_size]]
        yield collator(chunk), slice(i, i + len(chunk))


def response_rows(images: Sequence, prompts: Sequence[str], responses: Sequence[str], **meta) -> list[dict]:
    """Rows of (image, prompt, response) in the conversational format :func:`response_batches` reads; ``meta``
    columns (lists of the same length, e.g. ``objects``) are copied into each row."""
    n = len(images)
    for name, seq in [("prompts", prompts), ("responses", responses), *meta.items()]:
        if len(seq) != n:
            raise ValueError(f"got {n} images but {len(seq)} {name}; every row needs one of each")
    return [{"images": [images[i]], "prompt": user_prompt(prompts[i]), "response": assistant_reply(responses[i]),
             **{k: v[i] for k, v in meta.items()}} for i in range(n)]


def response_batches(rows: Sequence[dict], processor, batch_size: int = 16,
                     max_length: int | None = None) -> Iterator[tuple[dict, slice]]:
    """Collated batches of single responses (rows with ``images``, ``prompt``, ``response``), tokenized exactly as
    :func:`pair_batches` tokenizes a chosen reply: each row is collated as a pair with itself and the first half of
    the batch is kept."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    collator = VisionPreferenceCollator(processor=processor, max_length=max_length)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        for j, r in enumerate(chunk):
            if "response" not in r:
                raise ValueError(f"row {i + j} has no 'response' column (columns: {', '.join(r)})")
        pairs = [{"images": r["images"], "prompt": r["prompt"], "chosen": r["response"], "rejected": r["response"]}
                 for r in chunk]
        batch = collator(pairs)
        n = len(chunk)
        if all(not torch.is_tensor(v) or v.shape[0] == 2 * n for v in batch.values()):
            batch = {k: (v[:n] if torch.is_tensor(v) else v) for k, v in batch.items()}
        else:  # image tensors not laid out per row (flat patches): keep the doubled batch, use its first half
            batch = dict(batch, _duplicated=True)
        yield batch, slice(i, i + n)
