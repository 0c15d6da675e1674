"""What a benchmark run measures (:class:`BenchConfig`) and what each configuration decodes with (:func:`plan_of`: a
:class:`dleaf.settings.Setting` with the engine's options and the attention implementation)."""

from __future__ import annotations

import dataclasses
import math

from ..methods import method_names, registration
from ..settings import GREEDY, Setting

#: The configurations measured by default.
CONFIGS = ("plain_sdpa", "plain_eager", "dleaf", "dleaf_range", "dleaf_sdpa", "dleaf_compiled", "pai", "spin", "vcd")
MODELS = ("organism", "llava_shaped")
BASELINES = ("plain_eager", "plain_sdpa")
#: Floating-point types a run can load its model in (``BenchConfig.dtype``).
DTYPES = ("float32", "bfloat16", "float16")
#: Configurations that are not a method name: plain decoding on either kernel and D-LEAF's speed variants. Every
#: registered method name (``python -m dleaf methods``) is a configuration too, with its default knobs.
SPECIAL = ("plain_sdpa", "plain_eager", "dleaf_range", "dleaf_sdpa", "dleaf_compiled")


def config_names() -> tuple[str, ...]:
    """Every configuration the benchmark can measure."""
    return SPECIAL + tuple(method_names())


# ---------------------------------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class LlavaShape:
    """A LLaVA-1.5-shaped model scaled to a small CPU: 336 px images, patch 14 (576 image tokens), a tiny CLIP tower
    and a Llama decoder with many layers and heads."""

    image_size: int = 336
    patch: int = 14
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    text_hidden: int = 512
    text_layers: int = 16
    text_heads: int = 16
    text_intermediate: int = 1376
    max_positions: int = 2048
    vocab_size: int = 0  # 0: the tokenizer's (89 words); larger pads the embedding and LM head (LLaVA-1.5: 32000)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 0 or (v == 0 and f.name != "vocab_size"):
                raise ValueError(f"LlavaShape.{f.name} must be a positive int, got {v!r}")
        if self.image_size % self.patch:
            raise ValueError(f"LlavaShape.patch {self.patch} must divide image_size {self.image_size}")
        if self.text_hidden % self.text_heads:
            raise ValueError(f"LlavaShape.text_hidden {self.text_hidden} is not divisible by text_heads "
                             f"{self.text_heads}")

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures; recorded with its results.

    ``dleaf_range``: the watched layers of the ``dleaf_range`` configuration as fractions of the decoder's depth,
    ``[floor(a L), floor(b L))``. ``vcd_alpha``/``vcd_beta``: the contrastive weight and the plausibility cut-off
    (tokens with probability below ``beta`` times the best one under the image are excluded); ``vcd_noise_step``:
    the forward-diffusion step (of 1000, linear beta schedule) that noises the image, as in VCD.
    """

    models: tuple[str, ...] = MODELS
    batch_sizes: tuple[int, ...] = (1, 8)
    configs: tuple[str, ...] = CONFIGS
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    memory: bool = True
    memory_models: tuple[str, ...] = ("llava_shaped",)
    score_models: tuple[str, ...] = MODELS
    score_batch_sizes: tuple[int, ...] = (1,)
    score_tokens: int = 64
    score_repeats: int = 3
    check_tokens: int = 8
    paired_steps: int = 40
    paired_warmup: int = 5
    dleaf_range: tuple[float, float] = (0.25, 0.75)
    vcd_alpha: float = 1.0
    vcd_beta: float = 0.1
    vcd_noise_step: int = 500
    llava_shape: LlavaShape = LlavaShape()
    organism_shape: dict | None = None  # OrganismShape fields for a random organism (tests); None: the default
    use_checkpoint: bool = True  # the committed organism when present
    device: str = "cpu"
    dtype: str = "float32"  # the model's weights and the pixel values (DTYPES)
    checks: bool = True  # the equivalence checks at the start (gamma 0 = plain; the compiled step = the eager one)
    check_steps: int = 8  # decoding steps each equivalence check compares
    bootstrap: int = 2000  # bootstrap resamples of the paired steps (0: no interval)
    seed: int = 0

    def __post_init__(self):
        bad = [m for m in self.models + self.memory_models + self.score_models if m not in MODELS]
        if bad:
            raise ValueError(f"unknown model(s) {bad}; valid: {', '.join(MODELS)}")
        bad = [c for c in self.configs if c not in config_names()]
        if bad:
            raise ValueError(f"unknown configuration(s) {bad}; valid: {', '.join(config_names())}")
        for name in BASELINES:
            if name not in self.configs:
                raise ValueError(f"configs must include {name!r} (the ratios are taken to it)")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2 (a prefill and at least one cached step), got {self.new_tokens}")
        if self.repeats < 1 or self.warmup < 0 or self.score_repeats < 1:
            raise ValueError("repeats and score_repeats must be >= 1 and warmup >= 0")
        if any(b < 1 for b in self.batch_sizes + self.score_batch_sizes):
            raise ValueError("batch sizes must be >= 1")
        if self.paired_steps < 0 or self.paired_warmup < 0:
            raise ValueError(f"paired_steps and paired_warmup must be >= 0, got {self.paired_steps}, "
                             f"{self.paired_warmup}")
        if self.score_tokens < 2:
            raise ValueError(f"score_tokens must be >= 2, got {self.score_tokens}")
        a, b = self.dleaf_range
        if not 0.0 <= a < b <= 1.0:
            raise ValueError(f"dleaf_range must be fractions 0 <= a < b <= 1, got {self.dleaf_range}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.check_steps < 2 or self.bootstrap < 0:
            raise ValueError(f"check_steps must be >= 2 and bootstrap >= 0, got {self.check_steps}, {self.bootstrap}")
        if self.vcd_alpha < 0 or not 0.0 <= self.vcd_beta < 1.0 or not 0 <= self.vcd_noise_step < 1000:
            raise ValueError("vcd_alpha must be >= 0, vcd_beta in [0, 1), vcd_noise_step in [0, 1000)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchConfig":
        d = dict(d)
        d["llava_shape"] = LlavaShape(**d.get("llava_shape", {}))
        for k in ("models", "batch_sizes", "configs", "memory_models", "score_models", "score_batch_sizes",
                  "dleaf_range"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a configuration decodes with: the text decoder's attention implementation, the decoding
    :class:`dleaf.settings.Setting` (method and knobs; ``greedy`` for plain decoding; labelled with the configuration's
    name) and the engine's options (``unwatched``, ``compile``)."""

    attention: str
    setting: Setting
    options: dict

    def attached(self, model):
        """``with plan.attached(model) as iv:`` the setting's method attached with the engine's options."""
        return self.setting.attached(model, **self.options)


def plan_of(config: str, num_layers: int, cfg: BenchConfig) -> Plan:
    """The :class:`Plan` of a configuration: plain decoding, one of D-LEAF's speed variants, or a registered method
    with its default knobs (a layer range that starts past a small model's last layer starts at its last layer; VCD
    takes ``cfg.vcd_*``). Methods that act on attention run on eager attention, the others on sdpa (their
    fastest)."""
    if config in ("plain_sdpa", "plain_eager"):
        return Plan(config.split("_")[1], Setting(GREEDY, label=config), {})
    if config == "dleaf_sdpa":
        return Plan("eager", Setting("dleaf", label=config), {"unwatched": "sdpa"})
    if config == "dleaf_compiled":
        return Plan("eager", Setting("dleaf", label=config), {"unwatched": "sdpa", "compile": True})
    if config == "dleaf_range":
        a, b = cfg.dleaf_range
        start = min(int(math.floor(a * num_layers)), num_layers - 1)
        end = max(start + 1, min(num_layers, int(math.floor(b * num_layers))))
        return Plan("eager", Setting("dleaf", {"layer_start": start, "layer_end": end}, label=config),
                    {"unwatched": "sdpa"})
    if config not in method_names():
        raise ValueError(f"unknown configuration {config!r}; valid: {', '.join(config_names())}")
    reg = registration(config)
    defaults = {**{f.name: f.default for f in dataclasses.fields(reg.config_class)}, **reg.defaults}
    knobs = {}
    if defaults.get("layer_start", 0) >= num_layers:
        knobs["layer_start"] = num_layers - 1
    if config == "vcd":
        knobs.update(alpha=cfg.vcd_alpha, beta=cfg.vcd_beta, noise_step=cfg.vcd_noise_step, seed=cfg.seed)
    return Plan("eager" if reg.method_class.acts_on_attention else "sdpa", Setting(config, knobs, label=config), {})


def method_of(config: str, num_layers: int, cfg: BenchConfig) -> tuple[str, str | None, dict]:
    """``(text attention to set, engine method or None, attach kwargs)`` of a configuration (see :func:`plan_of`)."""
    plan = plan_of(config, num_layers, cfg)
    setting = plan.setting
    return plan.attention, (setting.method if setting.attaches else None), {**setting.knob_dict, **plan.options}
