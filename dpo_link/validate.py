"""Checks on a vision preference dataset, run before any training step, with messages that name the bad input.

TRL finds some of these problems only inside the first training step (a ``max_length`` that cuts image tokens
surfaces as a model error about image features), and some never (identical chosen and rejected replies train
nothing and are silently averaged in). :func:`validate_preference_dataset` catches each up front:

- a missing column (``prompt``, ``chosen``, ``rejected``, and ``images`` or ``image``);
- a row whose prompt has no image, or whose image placeholders do not match its images;
- a row whose chosen and rejected replies are identical;
- a ``max_length`` that would cut a row's image tokens, or leave no completion token.

Sequence lengths are counted with the same rendering the trainer's collator uses (:mod:`dpo_link.collate`): the
text is tokenized without images and each image placeholder counts as the number of image tokens the processor
expands it into (measured on the first row's image). That count is exact for processors with a fixed number of image
tokens per image (LLaVA-1.5, the organism) and an estimate for processors whose count depends on the image size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from dleaf.io import InputError

from .collate import images_of, render_example, tokenizer_adds_bos, tokenizer_of
from .data import message_text

logger = logging.getLogger(__name__)

REQUIRED = ("prompt", "chosen", "rejected")


class PreferenceDataError(InputError):
    """A preference dataset that cannot train: the message names the rows and what would be right (an
    :class:`dleaf.io.InputError`, so scripts print it as ``error: ...`` and exit with status 2)."""


@dataclasses.dataclass
class LengthReport:
    """Token counts of a dataset as the collator builds it (BOS included when the collator adds it)."""

    n_rows: int
    image_tokens_per_image: int
    max_prompt: int          # longest prompt (everything before the completion)
    max_image_end: int       # largest (index of the last image token + 1)
    max_total: int           # longest prompt + longer completion
    add_bos: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _rows_text(indices: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def check_columns(column_names: Sequence[str], name: str = "dataset") -> None:
    missing = [c for c in REQUIRED if c not in column_names]
    if "images" not in column_names and "image" not in column_names:
        missing.append("images")
    if missing:
        raise PreferenceDataError(
            f"the {name} is missing column(s) {', '.join(repr(m) for m in missing)}; a vision preference dataset "
            f"needs 'prompt', 'chosen', 'rejected' and 'images' (a list of images per row; a single 'image' column "
            f"also works). It has: {', '.join(column_names) or 'no columns'}. Rename columns with "
            f"load_preference_dataset(column_map=...) or --column_map")


def _image_placeholders(prompt, image_token: str) -> int | None:
    """How many images a prompt refers to; None for conversational string content (TRL inserts the placeholders)."""
    if isinstance(prompt, str):
        return prompt.count(image_token) if image_token else 0
    n = 0
    for message in prompt:
        content = message.get("content")
        if isinstance(content, str):
            if message.get("role") == "user":
                return None
            continue
        for part in content or []:
            if part.get("type") == "image":
                n += 1
    return n


def check_rows(dataset, processor, name: str = "dataset") -> None:
    """Every row has at least one image, matching image placeholders, and chosen != rejected."""
    image_token = getattr(processor, "image_token", None) or "<image>"
    no_image, mismatch, identical = [], [], []
    for i, row in enumerate(dataset):
        images = images_of(row)
        placeholders = _image_placeholders(row["prompt"], image_token)
        if not images or placeholders == 0:
            no_image.append(i)
        elif placeholders is not None and placeholders != len(images):
            mismatch.append((i, placeholders, len(images)))
        if message_text(row["chosen"]).strip() == message_text(row["rejected"]).strip():
            identical.append(i)
    if no_image:
        raise PreferenceDataError(
            f"row(s) {_rows_text(no_image)} of the {name} have a prompt without an image (an empty 'images' list or "
            f"no image placeholder in the prompt); every row of a vision preference dataset needs at least one image, "
            "referenced in the prompt by a {'type': 'image'} content part (or a string user turn, to which TRL adds "
            "the placeholders)")
    if mismatch:
        i, p, n = mismatch[0]
        raise PreferenceDataError(
            f"row(s) {_rows_text([m[0] for m in mismatch])} of the {name} have as many image placeholders in the "
            f"prompt as images: row {i} has {p} placeholder(s) but {n} image(s); they must match one to one")
    if identical:
        raise PreferenceDataError(
            f"row(s) {_rows_text(identical)} of the {name} have identical chosen and rejected replies "
            f"(row {identical[0]}: {message_text(dataset[identical[0]]['chosen'])[:80]!r}); such a pair carries no "
            "preference and has zero DPO gradient. Drop these rows (dpo_link.pairs builds none)")


def image_tokens_per_image(processor, image) -> int:
    """How many image tokens the processor expands one image placeholder into, measured on ``image``."""
    token = getattr(processor, "image_token", None)
    if token is None:
        return 1
    tok = tokenizer_of(processor)
    ids = processor(text=[token], images=[image], add_special_tokens=False)["input_ids"][0]
    token_id = tok.convert_tokens_to_ids(token)
    return int(sum(1 for t in ids if t == token_id))


def measure_lengths(dataset, processor, add_bos: bool | None = None) -> LengthReport:
    """Token counts per row as the collator builds them (see the module docstring for exactness)."""
    tok = tokenizer_of(processor)
    if add_bos is None:
        add_bos = tokenizer_adds_bos(processor)
    first_images = images_of(dataset[0])
    k = image_tokens_per_image(processor, first_images[0]) if first_images else 1
    token = getattr(processor, "image_token", None)
    token_id = tok.convert_tokens_to_ids(token) if token else None
    max_prompt = max_image_end = max_total = 0
    for row in dataset:
        r = render_example(row, processor, add_bos)
        prompt_ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        n_images = sum(1 for t in prompt_ids if t == token_id)
        prompt_len = len(prompt_ids) + n_images * (k - 1)
        if n_images:
            last = max(j for j, t in enumerate(prompt_ids) if t == token_id)
            image_end = last + 1 + n_images * (k - 1)
        else:
            image_end = 0
        completion = max(len(tok(r[c], add_special_tokens=False)["input_ids"]) for c in ("chosen", "rejected"))
        max_prompt = max(max_prompt, prompt_len)
        max_image_end = max(max_image_end, image_end)
        max_total = max(max_total, prompt_len + completion)
    return LengthReport(len(dataset), k, max_prompt, max_image_end, max_total, bool(add_bos))


def check_max_length(report: LengthReport, max_length: int | None, name: str = "dataset") -> None:
    """Refuse a ``max_length`` that cuts image tokens or every completion token; warn when it cuts completions."""
    if max_length is None:
        return
    if max_length <= 0:
        raise PreferenceDataError(f"max_length must be a positive number of tokens or None, got {max_length}")
    if max_length < report.max_image_end:
        raise PreferenceDataError(
            f"max_length={max_length} would cut image tokens: in the {name}, the last image token ends at position "
            f"{report.max_image_end} ({report.image_tokens_per_image} tokens per image); the model would then see "
            f"images without their tokens. Set max_length to at least {report.max_total} (the longest prompt plus "
            f"completion here) or to None (no truncation)")
    if max_length <= report.max_prompt:
        raise PreferenceDataError(
            f"max_length={max_length} leaves no completion token in the longest prompt of the {name} "
            f"({report.max_prompt} tokens); DPO would compare empty replies. Set max_length to at least "
            f"{report.max_total} or to None")
    if max_length < report.max_total:
        logger.warning("max_length=%d truncates the longest completions of the %s (longest sequence %d tokens)",
                       max_length, name, report.max_total)


def validate_preference_dataset(dataset, processor, max_length: int | None, name: str = "dataset",
                                add_bos: bool | None = None) -> LengthReport:
    """All checks of this module on ``dataset``; returns its :class:`LengthReport` or raises
    :class:`PreferenceDataError`."""
    if len(dataset) == 0:
        raise PreferenceDataError(f"the {name} has no rows")
    check_columns(dataset.column_names, name)
    check_rows(dataset, processor, name)
    report = measure_lengths(dataset, processor, add_bos)
    check_max_length(report, max_length, name)
    return report
