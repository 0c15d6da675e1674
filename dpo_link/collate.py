"""Turning vision preference rows into model inputs, exactly as TRL's ``DPOTrainer`` does, plus the sequence start.

TRL's ``DataCollatorForVisionPreference`` renders conversational rows with the processor's chat template and
tokenizes them with ``add_special_tokens=False`` (so that templates which write their own BOS do not get two). A
template that writes no BOS (the organism's, LLaVA-1.5's) then trains the model on sequences without the ``<s>``
that ``processor(text=...)`` puts in front of every prompt at inference. :class:`VisionPreferenceCollator` renders
the rows itself, puts the BOS back where the tokenizer would add one, and hands the text rows to TRL's collator, so
padding, truncation and the completion mask stay TRL's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference


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
