"""The organism's attention regime (:mod:`dleaf.attention_regime`): its greedy captions of a held-out split through
the harness, teacher-forced with eager attention, with each grounded object's region taken from the scene layout
(the patches of its cell, :meth:`dleaf.organism.world.Scene.patches_of`: 2 x 2 of 36 with 8 px patches, 4 x 4 of
144 with 4 px ones)."""

from __future__ import annotations

from collections.abc import Sequence

from .. import attention_regime
from .. import eval as harness
from ..settings import Setting
from . import world
from .benchmarks import VOCAB

__all__ = ["scene_regions", "regime_from_run", "organism_regime", "regime_section"]


def scene_regions(scenes: Sequence[world.Scene], n_tokens: int) -> list[dict[str, list[int]]]:
    """Per scene, each object's image tokens (row-major patch indices of its cell, for ``n_tokens`` square
    patches)."""
    patch = world.CANVAS // int(round(n_tokens ** 0.5))
    return [{obj: s.patches_of(obj, patch) for obj in s.objects} for s in scenes]


def _n_image_tokens(model) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def regime_from_run(model, processor, bench, rows: Sequence[dict], split: str, world_seed: int,
                    batch_size: int = 50) -> dict:
    """The :func:`dleaf.attention_regime.regime_table` of one split's captions from a harness run (``rows`` in
    the order of ``bench.items``), with object regions from the split's scenes."""
    scenes = world.scenes(split, len(bench.items), world_seed)
    if [s.object_set for s in scenes] != [it.truth for it in bench.items]:
        raise ValueError(f"the benchmark's items are not the first {len(bench.items)} scenes of {split}")
    records = attention_regime.regime_records(
        model, processor, [it.image() for it in bench.items], [it.prompt for it in bench.items],
        [r["raw"] for r in rows], truths=[sorted(it.truth) for it in bench.items], vocab=VOCAB,
        regions=scene_regions(scenes, _n_image_tokens(model)), batch_size=batch_size)
    return attention_regime.regime_table(records)


def organism_regime(model, processor, split: str = "adversarial", n_images: int = 300, batch_size: int = 50,
                    progress=None) -> dict:
    """Greedy captions of the first ``n_images`` scenes of ``split`` (the ``organism_caption`` benchmark), then
    their attention regime table."""
    say = progress or (lambda msg: None)
    bench = harness.load_benchmark("organism_caption", limit=n_images, splits=[split])
    say(f"captioning {split} ({len(bench.items)} images)")
    run = harness.evaluate(model, processor, bench, Setting(), batch_size)
    say(f"attention regime on {split}")
    return regime_from_run(model, processor, bench, run["rows"], split, int(bench.protocol["world_seed"]),
                           batch_size)


def regime_section(profile: dict) -> list[str]:
    """The profile's attention-regime section (markdown lines; empty when no model has one): per model and split,
    :func:`dleaf.attention_regime.regime_markdown`."""
    tables = {(name, split): table for name, res in profile.get("models", {}).items()
              for split, table in res.get("attention_regime", {}).items()}
    if not tables:
        return []
    lines = ["## Attention regime (sinks, image-attention deficit, visual sinks, grounding heads)", "",
             attention_regime.REGIME_INTRO + " Object regions come from the scene layout: the patches of the "
             "object's cell (2 x 2 of 36 with 8 px patches, 4 x 4 of 144 with 4 px ones; chance 1/9 either way).", ""]
    for (name, split), table in tables.items():
        lines += [attention_regime.regime_markdown(table, heading="###", name=f"{name}, {split}")]
    return lines
