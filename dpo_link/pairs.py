"""The organism's preference pairs: the only module of ``dpo_link`` that knows the synthetic world.

Rows are in TRL's vision preference format (:mod:`dpo_link.data`), plus provenance columns (``source``, ``task``,
``scene_seed``, ``objects``, ``injected``, hallucination counts):

- :func:`organism_pairs`: the world's exact ground truth. ``chosen`` is a faithful description (or the right
  yes/no answer); ``rejected`` is the same description with sentences naming objects that the scene's theme makes
  likely but the image lacks (absent theme partners of present objects), inserted where the organism itself would
  say them, or the wrong yes/no answer.
- :func:`self_generated_pairs`: the model's own captions under several decoding settings (:class:`dleaf.settings.
  Setting`; default plain greedy and D-LEAF), ranked by
  their exact hallucination count against the scene (:func:`dpo_link.data.ranked_pairs`); the least
  hallucinating reply is ``chosen`` and the most hallucinating one ``rejected``, so a D-LEAF reply preferred over a
  greedy one "distils" D-LEAF into an adapter.
- For the correspondence suite: :func:`held_out_rows` (an adapter's held-out pairs, as its run record describes
  them), :func:`caption_items` and :data:`VOCABULARY` (the object words a reply token is grounded or hallucinated
  against).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dleaf import generation
from dleaf.organism import world
from dleaf.settings import Setting

from .data import preference_dataset, preference_example, ranked_pairs

# seeds of the scene streams used for DPO data; the profile and every evaluation use world_seed 0, so DPO pairs never
# share a scene with an evaluation split
TRAIN_WORLD_SEED = 1
EVAL_WORLD_SEED = 2
#: the object words of the world (a reply token that is one of them is grounded or hallucinated)
VOCABULARY: tuple[str, ...] = world.OBJECTS


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
    return preference_dataset(organism_examples(config))


def held_out_rows(n: int, run_record: Mapping[str, Any] | None = None) -> tuple[list[dict], dict]:
    """The first ``n`` held-out pairs of an organism adapter: the stream its run record (``dpo_run.json``) names
    under ``data.eval.config`` (world seed 2 and the default fractions when there is none), continued to ``n``.
    Returns the rows and a description of them for the report."""
    recorded = ((run_record or {}).get("data", {}).get("eval", {}) or {}).get("config")
    fields = {f.name for f in dataclasses.fields(OrganismPairConfig)}
    base = {k: v for k, v in recorded.items() if k in fields} if recorded else {"world_seed": EVAL_WORLD_SEED}
    config = OrganismPairConfig(**{**base, "n": n})
    return organism_examples(config), {"source": "organism held-out pairs", "config": dataclasses.asdict(config)}


def caption_items(n: int, split: str = "adversarial") -> tuple[list, list[str], list[list[str]]]:
    """``(images, prompts, objects)`` of the first ``n`` scenes of an evaluation split (world seed 0), each with the
    first caption prompt: what the organism's free generations are scored on."""
    scenes = world.scenes(split, n, 0)
    return [world.render(s) for s in scenes], [world.CAPTION_PROMPTS[0]] * n, [list(s.objects) for s in scenes]


# ---------------------------------------------------------------------------------------- self-generated pairs
def adversarial_scenes(n: int, start: int = 0) -> list[world.Scene]:
    """Scenes drawn like the adversarial split (every present object's theme partners absent) from the training
    pairs' scene stream (world seed 1), from index ``start`` on: what self-generated pairs caption."""
    return world.scenes("adversarial", n, world_seed=TRAIN_WORLD_SEED, start=start)


#: plain greedy decoding against D-LEAF (default knobs): the settings self-generated pairs compare
DEFAULT_SETTINGS: tuple[Setting, ...] = (Setting(label="greedy"), Setting("dleaf", label="dleaf"))


def hallucination_counts(replies: Sequence[str], scenes: Sequence[world.Scene]) -> list[tuple[int, int]]:
    """Per reply, (hallucinated objects, grounded objects) against the scene's exact object set."""
    from dleaf import metrics
    from dleaf.organism.profile import VOCAB

    result = metrics.chair(list(replies), [s.object_set for s in scenes], VOCAB)
    return [(len(c.hallucinated), len(c.mentioned - c.hallucinated)) for c in result.per_caption]


def self_generated_pairs(model, processor, scenes: Sequence[world.Scene],
                         settings: Sequence[Setting] = DEFAULT_SETTINGS, prompt: str = world.CAPTION_PROMPTS[0],
                         max_new_tokens: int = 80, batch_size: int = 64, min_margin: int = 1) -> list[dict]:
    """Preference rows from the model's own captions of ``scenes``, one per decoding setting (through the one
    generation loop, :func:`dleaf.generation.generate_texts`), ranked by their exact hallucination count against
    each scene (:func:`dpo_link.data.ranked_pairs`; a reply is named by its setting's label): scenes where no reply
    hallucinates less than another by ``min_margin`` objects give no row."""
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise ValueError(f"self-generated pairs need at least two decoding settings with distinct labels, got "
                         f"{labels}")
    if not scenes:
        raise ValueError("self_generated_pairs needs at least one scene")
    images = [world.render(s) for s in scenes]
    was_training = model.training
    model.eval()
    try:
        replies = {s.label: generation.generate_texts(model, processor, [prompt] * len(scenes), images, s,
                                                      max_new_tokens, batch_size) for s in settings}
    finally:
        model.train(was_training)
    counts = {label: hallucination_counts(r, scenes) for label, r in replies.items()}
    meta = [{"scene_seed": s.seed, "objects": list(s.objects)} for s in scenes]
    return ranked_pairs(images, prompt, replies, counts, min_margin, meta)
