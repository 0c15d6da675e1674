"""Vision preference data in TRL's format: building rows, loading a dataset from disk, ranking replies into pairs.

Every example has the columns TRL's ``DPOTrainer`` reads for vision data (its conversational form)::

    images    [PIL.Image]                                                     one image per {"type": "image"} part
    prompt    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}]
    chosen    [{"role": "assistant", "content": [{"type": "text", "text": ...}]}]
    rejected  [{"role": "assistant", "content": [{"type": "text", "text": ...}]}]

plus provenance columns (``source``, ``task``, hallucination counts, ...) that the trainer drops and the model card
and the correspondence suite read. Nothing here knows where the images come from: the organism's pair builder
(:mod:`dpo_link.pairs`) and a user's dataset on disk (:func:`load_preference_dataset`) both produce these rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS: tuple[str, ...] = ("images", "prompt", "chosen", "rejected")


# ---------------------------------------------------------------------------------------------------- the format
def user_prompt(text: str, n_images: int = 1) -> list[dict]:
    """A one-turn user prompt with ``n_images`` image placeholders before the text (TRL's vision format)."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def assistant_reply(text: str) -> list[dict]:
    """An assistant turn holding ``text``."""
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def message_text(messages: Any) -> str:
    """The concatenated text parts of a conversational turn list (or the string itself for plain-text rows)."""
    if isinstance(messages, str):
        return messages
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif content:
            parts.extend(p.get("text") or "" for p in content if p.get("type") == "text")
    return " ".join(p for p in parts if p)


def preference_example(image, prompt: str, chosen: str, rejected: str, **meta) -> dict:
    """One row in TRL's conversational vision preference format, with provenance ``meta`` columns."""
    return {"images": [image], "prompt": user_prompt(prompt), "chosen": assistant_reply(chosen),
            "rejected": assistant_reply(rejected), **meta}


def preference_dataset(rows: list[dict]):
    """Rows of :func:`preference_example` as a ``datasets.Dataset`` with explicit features (images as images,
    list columns as lists of strings, scalars typed from the first row)."""
    from datasets import Dataset, Features, Image, List, Value

    if not rows:
        raise ValueError("no preference pairs were produced; nothing to build a dataset from")
    text = {"type": Value("string"), "text": Value("string")}
    turn = List({"role": Value("string"), "content": List(text)})
    features = {"images": List(Image()), "prompt": turn, "chosen": turn, "rejected": turn}
    for key, value in rows[0].items():
        if key in features:
            continue
        if isinstance(value, bool):
            features[key] = Value("bool")
        elif isinstance(value, (int, np.integer)):
            features[key] = Value("int64")
        elif isinstance(value, float):
            features[key] = Value("float64")
        elif isinstance(value, (list, tuple)):
            features[key] = List(Value("string"))
        else:
            features[key] = Value("string")
    return Dataset.from_list(rows, features=Features(features))


# ------------------------------------------------------------------------------------------ ranking own replies
def rank_replies(candidates: Mapping[str, tuple[str, int, int]], min_margin: int = 1):
    """From ``{decoder name: (reply, hallucinated, grounded)}``, the (chosen, rejected) decoder names, or None.

    chosen: fewest hallucinated objects, then most grounded ones, then the first decoder listed; rejected: most
    hallucinated, then fewest grounded, then the last listed. A pair is kept only when the rejected reply has at
    least ``min_margin`` more hallucinated objects and the two texts differ.
    """
    names = list(candidates)
    best = min(names, key=lambda n: (candidates[n][1], -candidates[n][2], names.index(n)))
    worst = max(names, key=lambda n: (candidates[n][1], -candidates[n][2], names.index(n)))
    if candidates[worst][1] - candidates[best][1] < min_margin or candidates[worst][0] == candidates[best][0]:
        return None
    return best, worst


def ranked_pairs(images: Sequence, prompt: str, replies: Mapping[str, Sequence[str]],
                 counts: Mapping[str, Sequence[tuple[int, int]]], min_margin: int = 1,
                 meta: Sequence[dict] | None = None) -> list[dict]:
    """Preference rows from several decoders' replies to the same ``prompt`` on each image: per image, the replies
    are ranked by ``counts[name][i] = (hallucinated, grounded)`` (:func:`rank_replies`); images where no reply beats
    another by ``min_margin`` give no row. Provenance columns: ``chosen_source`` / ``rejected_source`` (decoder
    names), ``chosen_hallucinations`` / ``rejected_hallucinations``, ``chosen_grounded`` / ``rejected_grounded``,
    plus ``meta[i]``."""
    names = list(replies)
    if len(names) < 2:
        raise ValueError(f"ranking needs the replies of at least two decoders, got {names}")
    for name in names:
        if len(replies[name]) != len(images) or len(counts[name]) != len(images):
            raise ValueError(f"decoder {name!r}: {len(replies[name])} replies and {len(counts[name])} counts for "
                             f"{len(images)} images")
    rows = []
    for i, image in enumerate(images):
        cands = {name: (replies[name][i], *counts[name][i]) for name in names}
        ranked = rank_replies(cands, min_margin)
        if ranked is None:
            continue
        best, worst = ranked
        rows.append(preference_example(
            image, prompt, cands[best][0], cands[worst][0], source="self_generated", task="caption",
            **(meta[i] if meta is not None else {}), chosen_source=best, rejected_source=worst,
            chosen_hallucinations=cands[best][1], rejected_hallucinations=cands[worst][1],
            chosen_grounded=cands[best][2], rejected_grounded=cands[worst][2]))
    return rows


# ------------------------------------------------------------------------------------------- a user's dataset
def parse_column_map(spec) -> dict[str, str] | None:
    """A column renaming from ``None``, a mapping, or ``old=new`` entries in the knob syntax of every script and
    recipe (:func:`dleaf.cli.parse_knobs`): a list (``["question=prompt", "image=images"]``) or one string with the
    entries separated by commas (``"question=prompt,image=images"``). Errors name the bad entry."""
    from dleaf.cli import parse_knobs
    from dleaf.io import InputError

    if not spec:
        return None
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    entries = [e.strip() for e in spec.split(",")] if isinstance(spec, str) else list(spec)
    bad = [e for e in entries if not isinstance(e, str) or "=" not in e]
    if bad:
        raise InputError(f"column_map entries look like old=new (question=prompt), got {bad[0]!r}")
    try:
        out = parse_knobs(entries)
    except InputError as e:
        raise InputError(f"column_map: {str(e).replace('knob', 'column')}") from None
    empty = [k for k, v in out.items() if v in (None, "")]
    if empty:
        raise InputError(f"column_map entry {empty[0]}= names no new column")
    return {k: str(v) for k, v in out.items()}


def _wrap_plain_row(row: dict, image_token: str) -> dict:
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, str):
        images = row.get("images")
        n = len(images) if isinstance(images, list) else 1
        if image_token and image_token in prompt:
            return row  # already a rendered text prompt with its own image tokens: leave it to the collator
        row = dict(row, prompt=user_prompt(prompt, n))
    if isinstance(chosen, str):
        row["chosen"] = assistant_reply(chosen)
    if isinstance(rejected, str):
        row["rejected"] = assistant_reply(rejected)
    return row


def _splits_message(path, splits, split, split_flag) -> str:
    return (f"{path} holds the splits {', '.join(splits)}; choose one with {split_flag or 'split='}"
            + (f" (not {split!r})" if split else ""))


def check_dataset_path(path: str | Path, split: str | None = None, split_flag: str | None = None) -> Path:
    """``path`` if it can hold a preference dataset (a ``save_to_disk`` folder, a folder of parquet files, or a
    parquet / JSON lines file); a FileNotFoundError or ValueError naming what is wrong otherwise. With ``split``: a
    saved ``DatasetDict`` must hold that split (the error names ``split_flag``, the option that chooses it); a
    single file, a folder of parquet files or a saved ``Dataset`` is its own split and takes any. Cheap: only
    ``dataset_dict.json`` is read, so scripts call it before loading any model."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}: expected a save_to_disk folder, or a parquet / JSON lines file")
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            if split is not None:
                import json

                try:
                    splits = list(json.loads((path / "dataset_dict.json").read_text())["splits"])
                except (OSError, ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}/dataset_dict.json is not a DatasetDict's split list") from None
                if split not in splits:
                    raise ValueError(_splits_message(path, splits, split, split_flag))
            return path
        if (path / "dataset_info.json").exists():
            return path
        if not sorted(path.glob("*.parquet")):
            raise FileNotFoundError(f"{path} is neither a save_to_disk folder nor holds parquet files")
        return path
    if path.suffix.lower() not in (".parquet", ".json", ".jsonl"):
        raise ValueError(f"cannot read {path.name}: expected .parquet, .json or .jsonl")
    return path


def load_preference_dataset(path: str | Path, split: str | None = "train", column_map: Any = None,
                            wrap_plain_text: bool = True, image_token: str = "<image>", limit: int | None = None,
                            split_flag: str | None = None):
    """Load a vision preference dataset from disk (no downloads).

    ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a ``.parquet`` /
    ``.json`` / ``.jsonl`` file (or a folder of parquet files). ``split`` chooses a split of a saved
    ``DatasetDict`` (a missing one is a ValueError naming ``split_flag``, the option that sets it); a single file,
    a folder of parquet files or a saved ``Dataset`` is its own split, whatever ``split`` says. ``column_map``
    renames columns first (see :func:`parse_column_map`; for an RLAIF-V export: ``["question=prompt",
    "image=images"]``). A single ``image`` column is turned into a one-image ``images`` list. With ``wrap_plain_text``, plain-string prompts without
    ``image_token`` become a user turn with one image placeholder per image, and plain-string chosen/rejected become
    assistant turns, so the processor's chat template is applied. ``limit`` keeps the first rows. The result is
    checked by :mod:`dpo_link.validate` before training, not here.
    """
    import datasets

    path = check_dataset_path(path)
    renames = parse_column_map(column_map)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split is None or split not in ds:
                raise ValueError(_splits_message(path, list(ds), split, split_flag))
            ds = ds[split]
    else:  # local files: one split (load_dataset names it "train") that is the whole data
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}[files[0].suffix.lower()]
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    if renames:
        missing = [c for c in renames if c not in ds.column_names]
        if missing:
            raise ValueError(f"column_map renames {', '.join(missing)}, which {path} does not have; its columns are "
                             f"{', '.join(ds.column_names)}")
        ds = ds.rename_columns(renames)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if "image" in ds.column_names and "images" not in ds.column_names:
        ds = ds.map(lambda row: {"images": [row["image"]]}, remove_columns=["image"])
    if wrap_plain_text and all(c in ds.column_names for c in ("prompt", "chosen", "rejected")):
        first = ds[0]
        if any(isinstance(first[c], str) for c in ("prompt", "chosen", "rejected")):
            ds = ds.map(lambda row: _wrap_plain_row(row, image_token))
    return ds
