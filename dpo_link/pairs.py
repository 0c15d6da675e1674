"""Preference pairs for DPO in TRL's vision preference format, from three sources.

Every example has the columns TRL's ``DPOTrainer`` reads for vision data (its conversational form)::

    images    [PIL.Image]                                                     one image per {"type": "image"} part
    prompt    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}]
    chosen    [{"role": "assistant", "content": [{"type": "text", "text": ...}]}]
    rejected  [{"role": "assistant", "content": [{"type": "text", "text": ...}]}]

plus provenance columns (``source``, ``task``, hallucination counts, ...) that the trainer drops and the model card
and the correspondence suite read.

Sources:

- :func:`organism_pairs`: the organism's exact ground truth. ``chosen`` is a faithful description (or the right
  yes/no answer); ``rejected`` is the same description with sentences naming objects that the scene's theme makes
  likely but the image lacks (absent theme partners of present objects), inserted where the organism itself would
  say them, or the wrong yes/no answer.
- :func:`self_generated_pairs`: the model's own replies under several decoders (plain greedy, D-LEAF, sampling),
  ranked by their exact hallucination count; the least hallucinating reply is ``chosen`` and the most hallucinating
  one ``rejected``, so a D-LEAF reply preferred over a greedy one "distils" D-LEAF into an adapter.
- :func:`load_preference_dataset`: any TRL-format vision preference dataset on disk (``save_to_disk`` folders,
  parquet or JSON lines), with column renaming and plain-text rows (such as an RLAIF-V export with ``question`` /
  ``image`` columns) turned into the conversational form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dleaf.organism import world

COLUMNS: tuple[str, ...] = ("images", "prompt", "chosen", "rejected")
# seeds of the scene streams used for DPO data; the profile and every evaluation use world_seed 0, so DPO pairs never
# share a scene with an evaluation split
TRAIN_WORLD_SEED = 1
EVAL_WORLD_SEED = 2


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


def _dataset(rows: list[dict]):
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


# ------------------------------------------------------------------------------------------ organism ground truth
def description_sentences(description: str) -> list[str]:
    """Split a world description into its sentences (each ends with " ."); the first is the opening."""
    return [s.strip() + " ." for s in description.split(" .") if s.strip()]


def inject_objects(scene: world.Scene, description: str, objects: Sequence[str],
                   rng: np.random.Generator) -> str:
    """``description`` of ``scene`` with one sentence per object of ``objects`` (all absent from the scene) inserted
    at its place in the canonical order, so that an absent partner follows its present partner exactly where a
    model driven by the theme prior names it. Each injected object gets a location in a free cell."""
    sentences = description_sentences(description)
    present = [o for o, _ in scene.canonical()]
    if len(sentences) != len(present) + 1:
        raise ValueError(f"description has {len(sentences)} sentences but the scene has {len(present)} objects plus "
                         "an opening; pass a description written by world.describe for this scene")
    for o in objects:
        if o in scene.object_set:
            raise ValueError(f"cannot inject {o!r}: it is in the scene ({', '.join(scene.objects)})")
    order = {o: i for i, o in enumerate(world.OBJECTS)}
    free = [c for c in range(world.GRID * world.GRID) if c not in scene.cells]
    cells = rng.choice(free, size=len(objects), replace=False)
    items = [(o, s) for o, s in zip(present, sentences[1:])]
    for obj, cell in zip(objects, cells):
        loc = world.LOCATIONS[int(cell)]
        pos = sum(order[o] < order[obj] for o, _ in items)
        if pos == 0:
            template = world.SENTENCE_TEMPLATES[int(rng.integers(len(world.SENTENCE_TEMPLATES)))]
        else:
            template = world.FOLLOW_TEMPLATE
        items.insert(pos, (obj, template.format(obj=obj, loc=loc)))
    return " ".join([sentences[0]] + [s for _, s in items])


def absent_partners(scene: world.Scene) -> list[str]:
    """Absent theme partners of the scene's objects, in canonical order (what the prior invites)."""
    partners = {p for o in scene.objects for p in world.PARTNERS[o]} - scene.object_set
    return sorted(partners, key=world.OBJECTS.index)


@dataclasses.dataclass(frozen=True)
class OrganismPairConfig:
    """What fixes a set of ground-truth pairs; recorded in the model card.

    ``adversarial_fraction`` of the scenes are drawn like the adversarial split (every present object's partners
    absent), the rest like the training scenes (whole or partial themes), so the adapter also sees scenes where
    naming every partner is right. ``question_fraction`` of the pairs are yes/no questions, half about a present
    object, half about an absent partner (POPE's adversarial negatives). Each rejected description adds 1 to
    ``max_injected`` absent objects (partners first, other absent objects when the scene has no absent partner).
    Scenes come from ``world_seed``'s streams (default: one no evaluation uses).
    """

    n: int = 2000
    adversarial_fraction: float = 0.5
    question_fraction: float = 0.3
    max_injected: int = 2
    world_seed: int = TRAIN_WORLD_SEED
    start: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.n <= 0:
            raise ValueError(f"n must be positive, got {self.n}")
        for name in ("adversarial_fraction", "question_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if self.max_injected < 1:
            raise ValueError(f"max_injected must be >= 1 (a rejected caption needs a hallucination), got "
                             f"{self.max_injected}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")


def organism_examples(config: OrganismPairConfig = OrganismPairConfig()) -> list[dict]:
    """The rows of :func:`organism_pairs` as a list of dicts (PIL images, conversational turns, provenance)."""
    rng = np.random.default_rng([config.seed, config.world_seed, config.start])
    rows = []
    for i in range(config.start, config.start + config.n):
        adversarial = rng.random() < config.adversarial_fraction
        split = "adversarial" if adversarial else "train"
        scene = world.sample_scene(world.split_seed(split, i, config.world_seed), split)
        partners = absent_partners(scene)
        meta = {"source": "ground_truth", "scene_kind": split, "scene_seed": scene.seed,
                "objects": list(scene.objects)}
        if rng.random() < config.question_fraction:
            if rng.random() < 0.5:
                obj = scene.objects[int(rng.integers(len(scene.objects)))]
            else:
                pool = partners or [o for o in world.OBJECTS if o not in scene.object_set]
                obj = pool[int(rng.integers(len(pool)))]
            right = world.answer(scene, obj)
            wrong = (f"no , there is no {obj} ." if obj in scene.object_set else f"yes , there is a {obj} .")
            rows.append(preference_example(
                world.render(scene), world.QUESTION_TEMPLATE.format(obj=obj), right, wrong, task="question",
                injected=[] if obj in scene.object_set else [obj],
                chosen_hallucinations=0, rejected_hallucinations=0 if obj in scene.object_set else 1, **meta))
            continue
        absent = [o for o in world.OBJECTS if o not in scene.object_set]
        pool = partners or absent
        k = int(rng.integers(1, config.max_injected + 1))
        picked = [pool[j] for j in sorted(rng.choice(len(pool), size=min(k, len(pool)), replace=False))]
        chosen = world.describe(scene, seed=int(rng.integers(2**31)))
        rejected = inject_objects(scene, chosen, picked, rng)
        prompt = world.CAPTION_PROMPTS[int(rng.integers(len(world.CAPTION_PROMPTS)))]
        rows.append(preference_example(world.render(scene), prompt, chosen, rejected, task="caption",
                                       injected=picked, chosen_hallucinations=0,
                                       rejected_hallucinations=len(picked), **meta))
    return rows


def organism_pairs(config: OrganismPairConfig = OrganismPairConfig()):
    """Ground-truth preference pairs for the organism as a ``datasets.Dataset`` (see :class:`OrganismPairConfig`)."""
    return _dataset(organism_examples(config))


# ---------------------------------------------------------------------------------------- self-generated pairs
@dataclasses.dataclass(frozen=True)
class Decoder:
    """One way to decode a reply: an engine method (``"greedy"``, ``"dleaf"``, ``"pai"``, ``"spin"``, ...) with its
    knobs, greedy or sampled. ``name`` labels the replies in the data."""

    name: str
    method: str = "greedy"
    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0


DEFAULT_DECODERS: tuple[Decoder, ...] = (Decoder("greedy"), Decoder("dleaf", "dleaf"))


def generate_replies(model, processor, scenes: Sequence[world.Scene], prompt: str, decoder: Decoder,
                     max_new_tokens: int = 80, batch_size: int = 64) -> list[str]:
    """One reply per scene to ``prompt`` under ``decoder`` (batched, left-padded)."""
    import torch

    from dleaf import engine
    from dleaf.organism.chat import user_turn

    text = processor.apply_chat_template(user_turn(prompt), add_generation_prompt=True, tokenize=False)
    replies: list[str] = []
    gen = {"max_new_tokens": max_new_tokens, "do_sample": decoder.do_sample}
    if decoder.do_sample:
        gen["temperature"] = decoder.temperature
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i:i + batch_size]
        batch = processor(text=[text] * len(chunk), images=[world.render(s) for s in chunk], return_tensors="pt",
                          padding=True)
        batch = batch.to(model.device)
        if decoder.do_sample:
            torch.manual_seed(decoder.seed + i)
        with torch.no_grad(), engine.attached(model, decoder.method, **dict(decoder.knobs)):
            out = model.generate(**batch, **gen)
        replies += processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [r.strip() for r in replies]


def hallucination_counts(replies: Sequence[str], scenes: Sequence[world.Scene]) -> list[tuple[int, int]]:
    """Per reply, (hallucinated objects, grounded objects) against the scene's exact object set."""
    from dleaf import metrics
    from dleaf.organism.profile import VOCAB

    result = metrics.chair(list(replies), [s.object_set for s in scenes], VOCAB)
    return [(len(c.hallucinated), len(c.mentioned - c.hallucinated)) for c in result.per_caption]


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


def self_generated_pairs(model, processor, scenes: Sequence[world.Scene], decoders: Sequence[Decoder] = DEFAULT_DECODERS,
                         prompt: str = world.CAPTION_PROMPTS[0], max_new_tokens: int = 80, batch_size: int = 64,
                         min_margin: int = 1, return_rows: bool = False):
    """Pairs from the model's own replies, ranked by their exact hallucination count (see :func:`rank_replies`).

    Every scene is captioned once per decoder; scenes where no reply hallucinates less than another by
    ``min_margin`` objects give no pair. Provenance columns: ``chosen_source`` / ``rejected_source`` (decoder
    names), ``chosen_hallucinations`` / ``rejected_hallucinations``, ``chosen_grounded`` / ``rejected_grounded``.
    """
    if len({d.name for d in decoders}) != len(decoders) or len(decoders) < 2:
        raise ValueError(f"self-generated pairs need at least two decoders with distinct names, got "
                         f"{[d.name for d in decoders]}")
    if not scenes:
        raise ValueError("self_generated_pairs needs at least one scene")
    was_training = model.training
    model.eval()
    replies = {d.name: generate_replies(model, processor, scenes, prompt, d, max_new_tokens, batch_size)
               for d in decoders}
    model.train(was_training)
    counts = {name: hallucination_counts(r, scenes) for name, r in replies.items()}
    rows = []
    for i, scene in enumerate(scenes):
        cands = {name: (replies[name][i], *counts[name][i]) for name in replies}
        ranked = rank_replies(cands, min_margin)
        if ranked is None:
            continue
        best, worst = ranked
        rows.append(preference_example(
            world.render(scene), prompt, cands[best][0], cands[worst][0], source="self_generated", task="caption",
            scene_seed=scene.seed, objects=list(scene.objects), chosen_source=best, rejected_source=worst,
            chosen_hallucinations=cands[best][1], rejected_hallucinations=cands[worst][1],
            chosen_grounded=cands[best][2], rejected_grounded=cands[worst][2]))
    if return_rows:
        return rows
    return _dataset(rows)


# ------------------------------------------------------------------------------------------- a user's dataset
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


def load_preference_dataset(path: str | Path, split: str | None = "train", column_map: Mapping[str, str] | None = None,
                            wrap_plain_text: bool = True, image_token: str = "<image>", limit: int | None = None):
    """Load a vision preference dataset from disk (no downloads).

    ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a ``.parquet`` /
    ``.json`` / ``.jsonl`` file (or a folder of parquet files). ``column_map`` renames columns first (for an RLAIF-V
    export: ``{"question": "prompt", "image": "images"}``). A single ``image`` column is turned into a one-image
    ``images`` list. With ``wrap_plain_text``, plain-string prompts without ``image_token`` become a user turn with
    one image placeholder per image, and plain-string chosen/rejected become assistant turns, so the processor's
    chat template is applied. ``limit`` keeps the first rows. The result is checked by :mod:`dpo_link.validate`
    before training, not here.
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}: expected a save_to_disk folder, or a parquet / JSON lines file")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
    else:
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"{path} is neither a save_to_disk folder nor holds parquet files")
        suffix = files[0].suffix.lower()
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}.get(suffix)
        if builder is None:
            raise ValueError(f"cannot read {files[0].name}: expected .parquet, .json or .jsonl")
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files])
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise ValueError(f"{path} holds the splits {', '.join(ds)}; choose one with split=")
        ds = ds[split]
    if column_map:
        missing = [c for c in column_map if c not in ds.column_names]
        if missing:
            raise ValueError(f"column_map renames {', '.join(missing)}, which {path} does not have; its columns are "
                             f"{', '.join(ds.column_names)}")
        ds = ds.rename_columns(dict(column_map))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if "image" in ds.column_names and "images" not in ds.column_names:
        ds = ds.map(lambda row: {"images": [row["image"]]}, remove_columns=["image"])
    if wrap_plain_text and all(c in ds.column_names for c in ("prompt", "chosen", "rejected")):
        first = ds[0]
        if any(isinstance(first[c], str) for c in ("prompt", "chosen", "rejected")):
            ds = ds.map(lambda row: _wrap_plain_row(row, image_token))
    return ds
