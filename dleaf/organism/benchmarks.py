"""The organism's registration with the rest of the library (imported by :mod:`dleaf.plugins`; nothing outside the
organism imports it): its two benchmarks, registered with the evaluation harness (:mod:`dleaf.eval.registry`), the
vocabulary its captions are scored with, and its model family (:func:`dleaf.models.build` ``("organism", shape,
seed)``: a randomly initialised organism of any :class:`~dleaf.organism.build.OrganismShape`, for tests and
benchmarks; the trained checkpoints load by name with :func:`dleaf.models.load`).

``organism_caption``: captions of the first ``n_images`` scenes of each held-out split (``indist``,
``adversarial``, ``replication``), scored with CHAIR against each scene's exact object set; sections are the splits,
ids ``split/index``. ``organism_pope``: per scene one question about a present object and one about an absent object
(drawn at random, among the most frequent training objects, or among the present objects' theme partners); sections
``split/negatives``, ids ``split/negatives/question index``. Their protocols are ``data/protocols/organism_*.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import metrics, models
from ..eval.registry import Benchmark, BenchmarkSpec, Item, limit_count, register_benchmark, select
from ..io import InputError
from . import world

#: The organism's object words: each category, its plural, and its theme partners as related categories.
VOCAB = metrics.ObjectVocabulary.from_categories(world.OBJECTS, related=world.PARTNERS)
HELD_OUT_SPLITS = tuple(s for s in world.SPLITS if s != "train")


def _splits(protocol, requested: Sequence[str] | None) -> list[str]:
    splits = select(requested, protocol["splits"], "split")
    for split in splits:
        if split not in HELD_OUT_SPLITS:
            raise InputError(f"protocol {protocol.path}: {split!r} is not a held-out organism split "
                             f"({', '.join(HELD_OUT_SPLITS)})")
    return splits


def organism_caption_benchmark(protocol, splits: Sequence[str] | None = None, limit: int | None = None) -> Benchmark:
    """Captions of ``n_images`` scenes (or the first ``limit``) of each held-out split; ids ``split/index``."""
    items = []
    n = limit_count(int(protocol["n_images"]), limit)
    for split in _splits(protocol, splits):
        for i, scene in enumerate(world.scenes(split, n, int(protocol["world_seed"]))):
            items.append(Item(f"{split}/{i}", split, "caption", protocol["prompt"],
                              lambda s=scene: world.render(s), scene.object_set))
    return Benchmark("organism_caption", protocol, items, VOCAB)


def organism_pope_benchmark(protocol, splits: Sequence[str] | None = None, negatives: Sequence[str] | None = None,
                            limit: int | None = None) -> Benchmark:
    """Yes/no questions on ``n_images`` scenes (or the first ``limit``) per split and negative sampling; sections
    ``split/negatives``, ids ``split/negatives/question index`` (two questions per scene, present one first)."""
    items = []
    n = limit_count(int(protocol["n_images"]), limit)
    negs = select(negatives, protocol["negatives"], "negative sampling")
    popularity = world.object_frequencies() if "popular" in negs else None
    for split in _splits(protocol, splits):
        scene_list = world.scenes(split, n, int(protocol["world_seed"]))
        for neg in negs:
            section = f"{split}/{neg}"
            qs = world.pope_questions(scene_list, neg, seed=int(protocol["question_seed"]), popularity=popularity)
            for q_index, q in enumerate(qs):
                items.append(Item(f"{section}/{q_index}", section, "yesno", protocol["prompt"].format(object=q.obj),
                                  lambda s=q.scene: world.render(s), bool(q.label)))
    return Benchmark("organism_pope", protocol, items)


def _caption(protocol, options: Mapping[str, Any], limit: int | None) -> Benchmark:
    return organism_caption_benchmark(protocol, options.get("splits"), limit)


def _pope(protocol, options: Mapping[str, Any], limit: int | None) -> Benchmark:
    return organism_pope_benchmark(protocol, options.get("splits"), options.get("negatives"), limit)


register_benchmark(BenchmarkSpec(
    name="organism_caption", kind="caption", build=_caption,
    protocol_keys=("world_seed", "n_images", "splits", "prompt", "max_new_tokens"),
    options={"splits": "organism splits to run (indist, adversarial, replication)"},
    description="CHAIR on the organism's held-out scenes (exact ground truth)"))
register_benchmark(BenchmarkSpec(
    name="organism_pope", kind="yesno", build=_pope,
    protocol_keys=("world_seed", "n_images", "splits", "negatives", "question_seed", "prompt", "max_new_tokens"),
    options={"splits": "organism splits to run (indist, adversarial, replication)",
             "negatives": "negative samplings to run (random, popular, adversarial)"},
    description="POPE-style yes/no questions on the organism's held-out scenes"))


def _shape() -> type:
    from .build import OrganismShape

    return OrganismShape


def _processor(shape):
    from .build import build_processor

    return build_processor(shape)


def _model(processor, shape, seed: int):
    from .build import build_model

    return build_model(processor.tokenizer, shape, seed=seed)


models.register_family("organism", _shape, _processor, _model,
                       "a tiny Llava (patch-local CLIP tower, Llama decoder) over the synthetic world's words")


def _is_world(model) -> bool:
    from .build import is_world_checkpoint

    return is_world_checkpoint(model)


models.register_world(_is_world)
