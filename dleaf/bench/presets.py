"""Named benchmark runs (``scripts/bench.py --preset NAME``): a :class:`~dleaf.bench.config.BenchConfig`'s fields
set at once, which any flag given beside ``--preset`` overrides.

``llava7b``: the GPU measurement. A randomly initialised LLaVA-1.5-7B-shaped model made on the device (a Llama
decoder of 32 layers, 32 heads, hidden 4096, MLP 11008, vocabulary 32000; 576 image tokens from a one-layer CLIP
tower; a 616-token prompt), batch 1 and 8, 64 new tokens, the eight configurations (plain sdpa and eager, D-LEAF on
every layer eager, with ``unwatched="sdpa"`` and compiled, PAI, SPIN, VCD), the equivalence checks first, then 60
paired steps after 3 untimed ones, two whole-run repeats after one warm-up, peak memory and scoring. Sized to run in
about 8 minutes on one H100 in bfloat16 (``scripts/gpu_check.sh``). Not run yet: no GPU has been available.

``tiny``: the same run on a tiny model (4 layers, hidden 32, 16 image tokens), fewer steps and no memory runs, as a
rehearsal of ``llava7b`` on a CPU (``bash scripts/gpu_check.sh --device cpu --preset tiny``).
"""

from __future__ import annotations

from .config import BenchConfig, LlavaShape

#: The configurations of the GPU measurement.
GPU_CONFIGS = ("plain_sdpa", "plain_eager", "dleaf", "dleaf_sdpa", "dleaf_compiled", "pai", "spin", "vcd")

#: LLaVA-1.5-7B's decoder (Vicuna-7B), with a tiny CLIP tower that still makes 576 image tokens.
LLAVA7B_SHAPE = LlavaShape(text_hidden=4096, text_layers=32, text_heads=32, text_intermediate=11008,
                           vocab_size=32000, max_positions=4096)

TINY_SHAPE = LlavaShape(image_size=56, text_hidden=32, text_layers=4, text_heads=4, text_intermediate=64,
                        vocab_size=256)

PRESETS: dict[str, dict] = {
    "llava7b": dict(models=("llava_shaped",), llava_shape=LLAVA7B_SHAPE, configs=GPU_CONFIGS, batch_sizes=(1, 8),
                    new_tokens=64, repeats=2, warmup=1, paired_steps=60, paired_warmup=3, memory=True,
                    memory_models=("llava_shaped",), score_models=("llava_shaped",), score_batch_sizes=(1,),
                    score_tokens=64, score_repeats=2, check_tokens=8, check_steps=8, device="cuda",
                    dtype="bfloat16"),
    "tiny": dict(models=("llava_shaped",), llava_shape=TINY_SHAPE, configs=GPU_CONFIGS, batch_sizes=(1, 8),
                 new_tokens=6, repeats=1, warmup=1, paired_steps=4, paired_warmup=1, memory=False,
                 memory_models=("llava_shaped",), score_models=("llava_shaped",), score_batch_sizes=(1,),
                 score_tokens=4, score_repeats=1, check_tokens=4, check_steps=4, bootstrap=200),
}


def preset(name: str, **overrides) -> BenchConfig:
    """The :class:`BenchConfig` of preset ``name``, with ``overrides`` (any field) on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return BenchConfig(**{**PRESETS[name], **overrides})


#: BenchConfig fields that ``scripts/bench.py`` sets through a flag of another name (an inverted switch); the
#: LLaVA shape is the base that ``--llava_shape NAME=INT`` overrides (:func:`preset_llava_shape`).
_FLAG_OF = {"memory": "no_memory", "use_checkpoint": "random_organism", "checks": "no_checks"}
_INVERTED = set(_FLAG_OF)


def preset_llava_shape(name: str | None) -> LlavaShape:
    """The LLaVA shape of preset ``name`` (the default shape for None or a preset without one)."""
    if name is None:
        return LlavaShape()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name].get("llava_shape", LlavaShape())


def preset_flag_defaults(name: str) -> dict:
    """Preset ``name`` as defaults of the benchmark script's flags (parser destinations): every field but the LLaVA
    shape, the switches inverted where the flag says the opposite (``memory`` -> ``no_memory``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    out = {}
    for field, value in PRESETS[name].items():
        if field == "llava_shape":
            continue
        out[_FLAG_OF.get(field, field)] = (not value) if field in _INVERTED else value
    return out


def apply_preset_defaults(parser, argv=None) -> str | None:
    """If ``argv`` (default ``sys.argv[1:]``) names ``--preset NAME``, make the preset's fields the defaults of
    ``parser``'s flags, so that a flag given beside it still wins; returns the preset's name (None without one).
    A preset field with no flag in ``parser`` is an error (the preset would be silently incomplete)."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset is None or known.preset not in PRESETS:
        return None  # an unknown name is refused by the parser's own choices
    defaults = preset_flag_defaults(known.preset)
    dests = {action.dest for action in parser._actions}
    missing = sorted(set(defaults) - dests)
    if missing:
        raise ValueError(f"preset {known.preset!r} sets {missing}, which the parser has no flag for")
    parser.set_defaults(**defaults)
    return known.preset
