"""Performance benchmark: D-LEAF against plain decoding and its peers, measured side by side.

Every configuration decodes with one manual greedy loop (:func:`greedy_loop`): a prefill, then one cached forward per
new token, a fixed number of new tokens and no early stop, so that only the attention (or, for the contrastive
baseline, the second stream) differs between configurations. The loop's tokens equal ``model.generate``'s for plain
greedy decoding (checked by the benchmark and by the tests).

Configurations (:data:`CONFIGS`):

==================  ===============================================================================================
``plain_sdpa``      plain greedy, text decoder on ``sdpa`` attention
``plain_eager``     plain greedy, text decoder on ``eager`` attention
``dleaf``           D-LEAF (default knobs) watching every layer (eager on watched layers)
``dleaf_range``     D-LEAF watching a restricted layer range, ``unwatched="sdpa"`` on the other layers
``dleaf_sdpa``      D-LEAF watching every layer with ``unwatched="sdpa"``: the rows D-LEAF never changes (all but
                    the last at prefill) go through sdpa, only the active rows eagerly
``dleaf_compiled``  ``dleaf_sdpa`` with the per-token step compiled (``compile=True``; compiled in the warm-up)
``pai``             PAI's attention part (engine, layers from 2, eager on watched layers)
``spin``            SPIN (engine, every layer, eager)
``vcd``             a two-pass contrastive baseline in the style of VCD: two caches, one forward of each per step,
                    ``logits = (1 + alpha) l(image) - alpha l(noised image)`` with VCD's plausibility cut-off
                    (``beta``); the decoder on ``sdpa`` (its fastest attention)
==================  ===============================================================================================

Models (:func:`build_model_and_inputs`): ``organism`` (the committed checkpoint when present, else a randomly
initialised organism of the same shape) and ``llava_shaped``: a randomly initialised
``LlavaForConditionalGeneration`` shaped like LLaVA-1.5 but scaled to a small CPU (576 image tokens from a 336 px image
with patch 14 and a tiny CLIP tower; a Llama decoder with many layers and heads), built offline with the organism's
word-level tokenizer.

Timing: each configuration runs ``repeats`` times in the same process, round-robin (the order rotates every round),
after ``warmup`` untimed rounds; the report gives medians and the ratio of each configuration's median to those of
``plain_eager`` and ``plain_sdpa``. Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the loaded
baseline; on CPU, each configuration runs once in a fresh subprocess that reports its peak resident set size above
the loaded-model baseline (``resource.getrusage``; the high-water mark is reset through ``/proc/self/clear_refs``
after loading where the kernel allows it). Paired steps (:func:`bench_paired`): whole-run repeats on a shared CPU scatter by several percent, which hides an
overhead of a few percent; so each configuration also decodes side by side with plain eager and plain sdpa, the
three taking turns one cached step at a time, and the report gives the ratio of their median step times and the
median per-step difference. Teacher-forced scoring: a 64-token response scored by
:func:`dleaf.engine.response_logprobs` in one pass with D-LEAF attached, against step-by-step scoring (a prefill of
the prompt and one cached step per response token) with D-LEAF attached; and the same two after a
:class:`dleaf.engine.PromptCache` of the prompt made once (:func:`dleaf.engine.cached_response_logprobs` against
:func:`dleaf.engine.cached_stepwise_logprobs`), which times the response's own cost.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import engine
from .io import write_json_atomic

CONFIGS = ("plain_sdpa", "plain_eager", "dleaf", "dleaf_range", "dleaf_sdpa", "dleaf_compiled", "pai", "spin", "vcd")
MODELS = ("organism", "llava_shaped")
BASELINES = ("plain_eager", "plain_sdpa")


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

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0:
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
    seed: int = 0

    def __post_init__(self):
        bad = [m for m in self.models + self.memory_models + self.score_models if m not in MODELS]
        if bad:
            raise ValueError(f"unknown model(s) {bad}; valid: {', '.join(MODELS)}")
        bad = [c for c in self.configs if c not in CONFIGS]
        if bad:
            raise ValueError(f"unknown configuration(s) {bad}; valid: {', '.join(CONFIGS)}")
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
        if self.vcd_alpha < 0 or not 0.0 <= self.vcd_beta < 1.0 or not 0 <= self.vcd_noise_step < 1000:
            raise ValueError("vcd_alpha must be >= 0, vcd_beta in [0, 1), vcd_noise_step in [0, 1000)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchConfig":
        d = dict(d)
        d["llava_shape"] = LlavaShape(**d.get("llava_shape", {}))
        for k in ("models", "batch_sizes", "configs", "memory_models", "score_models", "score_batch_sizes",
                  "dleaf_range"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# ---------------------------------------------------------------------------------------------------- models
def build_llava_shaped(shape: LlavaShape = LlavaShape(), seed: int = 0):
    """A randomly initialised LLaVA-1.5-shaped ``LlavaForConditionalGeneration`` and its processor, offline."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, \
        LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from .organism import build
    from .organism.chat import CHAT_TEMPLATE

    tok = build.build_tokenizer()
    tok.model_max_length = shape.max_positions
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": shape.image_size},
                                              crop_size={"height": shape.image_size, "width": shape.image_size}),
        tokenizer=tok, patch_size=shape.patch, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch, projection_dim=shape.vision_hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
                       num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                       num_key_value_heads=shape.text_heads, max_position_embeddings=shape.max_positions,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-1, image_seq_length=shape.image_tokens, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    gen.do_sample = False
    return model, processor


def build_organism(cfg: BenchConfig):
    """The committed organism when present (and ``cfg.use_checkpoint``), else a random one; with its source."""
    from .organism import build

    if cfg.use_checkpoint and cfg.organism_shape is None and (build.ORGANISM_DIR / "config.json").is_file():
        model, processor = build.load_organism()
        return model.eval(), processor, "checkpoint"
    shape = build.OrganismShape(**(cfg.organism_shape or {}))
    processor = build.build_processor(shape)
    return build.build_model(processor.tokenizer, shape, seed=cfg.seed).eval(), processor, "random"


def build_model_and_inputs(name: str, cfg: BenchConfig, batch_sizes: Sequence[int]):
    """``(model, inputs by batch size, description)`` for model ``name``; the inputs are caption prompts on
    held-out organism scenes (one scene per sample), on ``cfg.device``."""
    from .organism import world
    from .organism.profile import _prompt_batch

    if name == "organism":
        model, processor, source = build_organism(cfg)
    elif name == "llava_shaped":
        model, processor = build_llava_shaped(cfg.llava_shape, seed=cfg.seed)
        source = "random"
    else:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    model.to(cfg.device)
    n = max(batch_sizes)
    scenes = world.scenes("adversarial", n)
    batch = _prompt_batch(processor, scenes, [world.CAPTION_PROMPTS[0]] * n)
    inputs = {b: {k: v[:b].to(cfg.device) for k, v in batch.items()} for b in batch_sizes}
    tc = model.config.text_config
    image_id = engine.image_token_id(model)
    desc = {
        "name": name, "source": source,
        "layers": int(tc.num_hidden_layers), "heads": int(tc.num_attention_heads), "hidden": int(tc.hidden_size),
        "intermediate": int(tc.intermediate_size), "vocab": int(tc.vocab_size),
        "image_tokens": int((batch["input_ids"][0] == image_id).sum()),
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    return model, inputs, desc


def set_text_attention(model, name: str) -> None:
    """Switch the text decoder (only) to attention implementation ``name``; the vision tower stays on sdpa."""
    model.set_attn_implementation({"text_config": name, "vision_config": "sdpa"})


# ---------------------------------------------------------------------------------------------------- the loop
def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class _Stream:
    """One sequence state of the greedy loop: attention mask, next positions and key/value cache. Positions follow
    ``generate``: ``cumsum(attention_mask) - 1`` at prefill (0 on left padding), then one more per step."""

    def __init__(self, model, inputs: dict):
        self.model, self.inputs = model, inputs

    def prefill(self) -> torch.Tensor:
        mask = self.inputs["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = self.model(**self.inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
        self.cache, self.mask, self.pos = _cache_of(out), mask, pos[:, -1:]
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.pos = self.pos + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos,
                         use_cache=True, logits_to_keep=1, **{engine.cache_kwarg(self.model): self.cache})
        return out.logits[:, -1]


def contrastive_logits(alpha: float, beta: float) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """VCD's combination of the two streams' logits: ``(1 + alpha) l(image) - alpha l(noised)`` over the tokens
    whose probability under the image is at least ``beta`` times the best one (the others get -inf)."""

    def combine(logits: list[torch.Tensor]) -> torch.Tensor:
        clean, noised = logits[0].float(), logits[1].float()
        mixed = (1 + alpha) * clean - alpha * noised
        if beta > 0:
            logp = torch.log_softmax(clean, dim=-1)
            cut = logp.max(dim=-1, keepdim=True).values + math.log(beta)
            mixed = mixed.masked_fill(logp < cut, -math.inf)
        return mixed

    return combine


def noised_pixels(pixel_values: torch.Tensor, step: int = 500, seed: int = 0) -> torch.Tensor:
    """VCD-style distorted image: the forward diffusion ``sqrt(abar_t) x + sqrt(1 - abar_t) eps`` at ``step`` of a
    1000-step linear beta schedule (1e-4 to 0.02), with seeded Gaussian ``eps``."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = float(torch.cumprod(1 - betas, 0)[step])
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(pixel_values.shape, generator=g, dtype=torch.float32).to(pixel_values)
    return math.sqrt(abar) * pixel_values + math.sqrt(1 - abar) * eps


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _only_stream(logits: list[torch.Tensor]) -> torch.Tensor:
    return logits[0]


@torch.no_grad()
def greedy_loop(model, inputs_list: Sequence[dict], new_tokens: int,
                combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Greedy decoding of exactly ``new_tokens`` tokens (no early stop): one prefill of each stream, then one cached
    step of each stream per token; the next token is the argmax of ``combine(logits of the streams)`` (default: the
    only stream's logits). Returns the new tokens (B, new_tokens) and the timings ``prefill_s`` (prefill and first
    token) and ``decode_s`` (the ``new_tokens - 1`` cached steps)."""
    device = inputs_list[0]["input_ids"].device
    combine = combine or _only_stream
    streams = [_Stream(model, inputs) for inputs in inputs_list]
    _sync(device)
    t0 = time.perf_counter()
    token = combine([s.prefill() for s in streams]).argmax(dim=-1)
    tokens = [token]
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = combine([s.step(token) for s in streams]).argmax(dim=-1)
        tokens.append(token)
    _sync(device)
    t2 = time.perf_counter()
    return torch.stack(tokens, dim=1), {"prefill_s": t1 - t0, "decode_s": t2 - t1}


@torch.no_grad()
def generate_tokens(model, inputs: dict, new_tokens: int) -> torch.Tensor:
    """``model.generate``'s greedy tokens with end-of-sequence disabled (exactly ``new_tokens`` of them)."""
    from transformers import GenerationConfig

    gc_ = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           eos_token_id=None, pad_token_id=model.generation_config.pad_token_id,
                           bos_token_id=model.generation_config.bos_token_id)
    out = model.generate(**inputs, generation_config=gc_)
    return out[:, inputs["input_ids"].shape[1]:]


def method_of(config: str, num_layers: int, cfg: BenchConfig) -> tuple[str, str | None, dict]:
    """``(text attention to set, engine method or None, attach kwargs)`` of a configuration."""
    if config == "plain_sdpa":
        return "sdpa", None, {}
    if config == "plain_eager":
        return "eager", None, {}
    if config == "dleaf":
        return "eager", "dleaf", {}
    if config == "dleaf_sdpa":
        return "eager", "dleaf", {"unwatched": "sdpa"}
    if config == "dleaf_compiled":
        return "eager", "dleaf", {"unwatched": "sdpa", "compile": True}
    if config == "dleaf_range":
        a, b = cfg.dleaf_range
        start = min(int(math.floor(a * num_layers)), num_layers - 1)
        end = max(start + 1, min(num_layers, int(math.floor(b * num_layers))))
        return "eager", "dleaf", {"unwatched": "sdpa", "layer_start": start, "layer_end": end}
    if config == "pai":
        return "eager", "pai", {"layer_start": min(2, num_layers - 1)}
    if config == "spin":
        return "eager", "spin", {}
    if config == "vcd":
        return "sdpa", None, {}
    raise ValueError(f"unknown configuration {config!r}; valid: {', '.join(CONFIGS)}")


def noised_inputs(inputs: dict, cfg: BenchConfig) -> dict:
    """``inputs`` with the image distorted as the contrastive baseline's second stream sees it."""
    return {**inputs, "pixel_values": noised_pixels(inputs["pixel_values"], cfg.vcd_noise_step, cfg.seed)}


def decoding_plan(model, inputs: dict, config: str, cfg: BenchConfig, noised: dict | None = None):
    """What configuration ``config`` decodes with: ``(attention, method, knobs, sources, combine)``: the text
    attention to set, the method to attach (None: plain) and its knobs, the inputs of each stream (the contrastive
    baseline has a second one with the noised image; ``noised`` is made when not given) and how the streams' logits
    combine (None: the only stream's)."""
    attn, method, kwargs = method_of(config, model.config.text_config.num_hidden_layers, cfg)
    if config != "vcd":
        return attn, method, kwargs, [inputs], None
    noised = noised_inputs(inputs, cfg) if noised is None else noised
    return attn, method, kwargs, [inputs, noised], contrastive_logits(cfg.vcd_alpha, cfg.vcd_beta)


def run_config(model, inputs: dict, config: str, cfg: BenchConfig, new_tokens: int | None = None,
               noised: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Decode ``inputs`` once with configuration ``config``; returns (tokens, timings)."""
    new_tokens = cfg.new_tokens if new_tokens is None else new_tokens
    attn, method, kwargs, sources, combine = decoding_plan(model, inputs, config, cfg, noised)
    set_text_attention(model, attn)
    with engine.attached(model, method, **kwargs):
        return greedy_loop(model, sources, new_tokens, combine)


# ---------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def stepwise_logprobs(model, prompt: dict, response: torch.Tensor, times: dict | None = None) -> torch.Tensor:
    """Teacher-forced log-probabilities of ``response`` (B, R) after ``prompt``, step by step: a prefill of the prompt
    (whose last row scores response token 0), then one cached step per response token 0..R-2. ``times``, when
    given, receives the prefill's duration as ``prefill_s``."""
    stream = _Stream(model, prompt)
    t0 = time.perf_counter()
    logits = [stream.prefill()]
    if times is not None:
        _sync(response.device)
        times["prefill_s"] = time.perf_counter() - t0
    for i in range(response.shape[1] - 1):
        logits.append(stream.step(response[:, i]))
    return engine.token_logprobs(torch.stack(logits, 1), response)


SCORING_MODES = ("one_pass", "stepwise", "cached_one_pass", "cached_stepwise")


@torch.no_grad()
def score_once(model, prompt: dict, response: torch.Tensor, mode: str, times: dict | None = None,
               cache: engine.PromptCache | None = None) -> tuple[torch.Tensor, float]:
    """Score ``response`` with D-LEAF attached; (logprobs, s). ``one_pass`` and ``stepwise`` score after the whole
    prompt (step by step, ``times`` receives the prompt prefill's share, ``prefill_s``); ``cached_one_pass`` and
    ``cached_stepwise`` score after ``cache``, the prompt run once up to its last token (:class:`PromptCache`),
    so that only the response's own cost is timed."""
    if mode not in SCORING_MODES:
        raise ValueError(f"mode must be one of {', '.join(SCORING_MODES)}, got {mode!r}")
    if mode.startswith("cached") and cache is None:
        raise ValueError(f"mode {mode!r} needs the prompt's PromptCache (cache=...)")
    set_text_attention(model, "eager")
    device = response.device
    n = prompt["input_ids"].shape[1]
    with engine.attached(model, "dleaf") as iv:
        _sync(device)
        t0 = time.perf_counter()
        if mode == "one_pass":
            full = {**prompt, "input_ids": torch.cat([prompt["input_ids"], response], 1),
                    "attention_mask": torch.cat([prompt["attention_mask"], torch.ones_like(response)], 1)}
            logp, _ = engine.response_logprobs(model, full, [n] * response.shape[0], iv)
            logp = logp[:, n:]
        elif mode == "stepwise":
            logp = stepwise_logprobs(model, prompt, response, times)
        elif mode == "cached_one_pass":
            logp = engine.cached_response_logprobs(cache, response, intervention=iv)
        else:
            logp = engine.cached_stepwise_logprobs(cache, response, intervention=iv)
        _sync(device)
        return logp, time.perf_counter() - t0


def random_response(model, batch: int, length: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """A response of ordinary (non-special, non-image) tokens, drawn at random with ``seed``."""
    vocab = int(model.config.text_config.vocab_size)
    special = {engine.image_token_id(model)} | {t for t in (model.generation_config.pad_token_id,
                                                         model.generation_config.bos_token_id,
                                                         model.generation_config.eos_token_id) if t is not None}
    allowed = torch.tensor([t for t in range(vocab) if t not in special])
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (batch, length), generator=g)].to(device)


# ---------------------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), or None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_kb() -> int:
    """The resident-set high-water mark: ``VmHWM`` where the kernel reports it (reset by ``clear_refs``; with worker
    threads alive, ``getrusage`` can keep reporting the peak from before the reset), else ``getrusage``."""
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    """Reset the process's resident-set high-water mark (Linux ``/proc/self/clear_refs``); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(spec: dict) -> dict:
    """Run one configuration once and report its peak memory above the loaded-model baseline (run in a fresh
    process by :func:`measure_memory_cpu`)."""
    cfg = BenchConfig.from_dict(spec["cfg"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(cfg.seed)
    model, inputs, _ = build_model_and_inputs(spec["model"], cfg, [spec["batch"]])
    inputs = inputs[spec["batch"]]
    noised = noised_inputs(inputs, cfg) if spec["config"] == "vcd" else None
    gc.collect()
    reset = _reset_peak_rss()
    base_kb = _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_config(model, inputs, spec["config"], cfg, noised=noised)
    peak_kb = _peak_kb()
    return {"baseline_mb": base_kb / 1024, "peak_mb": peak_kb / 1024, "extra_mb": (peak_kb - base_kb) / 1024,
            "peak_reset": reset}


def measure_memory_cpu(model_name: str, batch: int, config: str, cfg: BenchConfig, timeout: float = 1800) -> dict:
    """Peak RSS of one configuration, measured in a fresh subprocess."""
    spec = json.dumps({"model": model_name, "batch": batch, "config": config, "cfg": cfg.to_dict(),
                       "threads": torch.get_num_threads()})
    code = "import json, sys; from dleaf import bench; print(json.dumps(bench.memory_child(json.loads(sys.argv[1]))))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(Path(__file__).resolve().parents[1]))
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {model_name}/{batch}/{config} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory_cuda(model, inputs: dict, config: str, cfg: BenchConfig) -> dict:
    """Peak CUDA memory of one configuration above what is allocated before it runs."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_config(model, inputs, config, cfg)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"baseline_mb": base / 2**20, "peak_mb": peak / 2**20, "extra_mb": (peak - base) / 2**20,
            "peak_reset": True}


def memory_ratios(mem: dict[str, dict]) -> dict[str, dict]:
    """Add to each configuration's memory row its peak, and its peak above the loaded model ("extra"), as ratios to
    those of plain eager and plain sdpa decoding."""
    for row in mem.values():
        for base in BASELINES:
            row[f"peak_ratio_to_{base}"] = row["peak_mb"] / mem[base]["peak_mb"]
            row[f"extra_ratio_to_{base}"] = (row["extra_mb"] / mem[base]["extra_mb"]
                                             if mem[base]["extra_mb"] > 0 else float("nan"))
    return mem


# ---------------------------------------------------------------------------------------------------- the benchmark
def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _summarise(runs: dict[str, list[dict]], batch: int, new_tokens: int) -> dict[str, dict]:
    rows = {}
    for config, times in runs.items():
        prefill = [t["prefill_s"] for t in times]
        decode = [t["decode_s"] for t in times]
        decode_tps = [batch * (new_tokens - 1) / t["decode_s"] for t in times]
        e2e_tps = [batch * new_tokens / (t["prefill_s"] + t["decode_s"]) for t in times]
        rows[config] = {
            "repeats": len(times),
            "prefill_s": _median(prefill),
            "decode_s": _median(decode),
            "step_ms": 1000 * _median(decode) / (new_tokens - 1),
            "decode_tokens_per_s": _median(decode_tps),
            "e2e_tokens_per_s": _median(e2e_tps),
            "decode_tokens_per_s_range": [min(decode_tps), max(decode_tps)],
            "e2e_tokens_per_s_range": [min(e2e_tps), max(e2e_tps)],
        }
    for config, row in rows.items():
        for base in BASELINES:
            for metric in ("decode", "e2e"):
                row[f"{metric}_ratio_to_{base}"] = row[f"{metric}_tokens_per_s"] / rows[base][f"{metric}_tokens_per_s"]
    return rows


@torch.no_grad()
def count_step_ops(model, inputs: dict, cfg: BenchConfig) -> dict[str, int]:
    """Operators (aten calls, views included) that one cached decoding step dispatches, per configuration: on a
    small CPU or a GPU without graph capture, each costs a roughly fixed launch time whatever its size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    num_layers = model.config.text_config.num_hidden_layers
    for config in cfg.configs:
        if config == "vcd":
            continue  # two plain sdpa steps
        attn, method, kwargs = method_of(config, num_layers, cfg)
        if kwargs.get("compile"):
            continue  # under a dispatch mode the compiled region runs its eager fallback: the count would mislead
        set_text_attention(model, attn)
        with engine.attached(model, method, **kwargs):
            stream = _Stream(model, inputs)
            token = stream.prefill().argmax(dim=-1)
            _Count.n = 0
            with _Count():
                stream.step(token)
            counts[config] = _Count.n
    if "plain_sdpa" in counts:
        counts["vcd"] = 2 * counts["plain_sdpa"]
    return counts


def check_loop_equals_generate(model, inputs: dict, cfg: BenchConfig) -> bool:
    """The manual greedy loop's tokens equal ``model.generate``'s (plain greedy, eager text attention)."""
    set_text_attention(model, "eager")
    ours, _ = greedy_loop(model, [inputs], cfg.check_tokens)
    return bool(torch.equal(ours, generate_tokens(model, inputs, cfg.check_tokens)))


def bench_decoding(model, inputs_by_batch: dict, cfg: BenchConfig, log=print) -> dict:
    """Round-robin timing of every configuration at every batch size; returns the per-batch summaries."""
    out = {}
    for batch, inputs in inputs_by_batch.items():
        noised = noised_inputs(inputs, cfg)
        runs: dict[str, list[dict]] = {c: [] for c in cfg.configs}
        tokens: dict[str, torch.Tensor] = {}
        order = list(cfg.configs)
        for round_ in range(cfg.warmup + cfg.repeats):
            for config in order:
                toks, t = run_config(model, inputs, config, cfg, noised=noised)
                tokens.setdefault(config, toks)
                if round_ >= cfg.warmup:
                    runs[config].append(t)
            order = order[1:] + order[:1]  # rotate: no configuration always runs first
            log(f"  batch {batch}: round {round_ + 1}/{cfg.warmup + cfg.repeats} done")
        rows = _summarise(runs, batch, cfg.new_tokens)
        same = torch.equal(tokens["plain_eager"], tokens["plain_sdpa"])
        out[str(batch)] = {"configs": rows, "raw": runs, "plain_sdpa_tokens_equal_eager": bool(same)}
    return out


class _Stepper:
    """One configuration's decoding, advanced one cached step at a time, so that several configurations can take
    turns step by step in one process (:func:`bench_paired`). Its intervention is attached only while it steps."""

    def __init__(self, model, inputs: dict, config: str, cfg: BenchConfig, noised: dict | None = None):
        self.model, self.config = model, config
        self.attn, method, kwargs, sources, combine = decoding_plan(model, inputs, config, cfg, noised)
        self.combine = combine or _only_stream
        set_text_attention(model, self.attn)
        self.iv = engine.attach(model, method, **kwargs) if method is not None else None
        try:
            self.streams = [_Stream(model, x) for x in sources]
            logits = [s.prefill() for s in self.streams]
        finally:
            if self.iv is not None:
                self.iv.detach()
        self.token = self._next(logits)
        self.tokens = [self.token]

    def _next(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return self.combine(logits).argmax(dim=-1)

    def step(self) -> float:
        """One decoding step (every stream, and the combination); its duration in seconds."""
        set_text_attention(self.model, self.attn)
        if self.iv is not None:
            self.iv._attach()
        try:
            device = self.token.device
            _sync(device)
            t0 = time.perf_counter()
            self.token = self._next([s.step(self.token) for s in self.streams])
            _sync(device)
            dt = time.perf_counter() - t0
            self.tokens.append(self.token)
            return dt
        finally:
            if self.iv is not None:
                self.iv.detach()


@torch.no_grad()
def bench_paired(model, inputs_by_batch: dict, cfg: BenchConfig, log=print) -> dict:
    """Per-step overhead, paired: for each configuration, a fresh decoding of it, of plain eager and of plain sdpa
    take turns one cached step at a time (the order rotating every step), for ``paired_steps`` steps after
    ``paired_warmup`` untimed ones. Slow drifts of a shared machine then hit the three alike, so the ratio of the
    medians and the median of the per-step differences resolve overheads of a few percent that whole-run repeats
    cannot."""
    out = {}
    if cfg.paired_steps == 0:
        return out
    configs = [c for c in cfg.configs if c not in BASELINES]
    for batch, inputs in inputs_by_batch.items():
        noised = noised_inputs(inputs, cfg)
        rows = {}
        for config in configs:
            steppers = {name: _Stepper(model, inputs, name, cfg, noised) for name in (config,) + BASELINES}
            times = {name: [] for name in steppers}
            order = list(steppers)
            for i in range(cfg.paired_warmup + cfg.paired_steps):
                for name in order:
                    t = steppers[name].step()
                    if i >= cfg.paired_warmup:
                        times[name].append(t)
                order = order[1:] + order[:1]
            row = {"steps": cfg.paired_steps, "step_ms": 1000 * _median(times[config]), "raw_s": times}
            for base in BASELINES:
                row[f"{base}_step_ms"] = 1000 * _median(times[base])
                row[f"ratio_to_{base}"] = _median(times[base]) / _median(times[config])
                row[f"median_diff_ms_to_{base}"] = 1000 * _median([a - b for a, b in zip(times[config], times[base])])
            rows[config] = row
            del steppers
            log(f"  paired, batch {batch}: {config} {row['step_ms']:.2f} ms/step, x{row['ratio_to_plain_eager']:.3f} "
                f"of plain eager ({row['plain_eager_step_ms']:.2f} ms), x{row['ratio_to_plain_sdpa']:.3f} of plain "
                f"sdpa ({row['plain_sdpa_step_ms']:.2f} ms)")
        out[str(batch)] = rows
    return out


def bench_scoring(model, inputs_by_batch: dict, cfg: BenchConfig, log=print) -> dict:
    """One-pass against step-by-step teacher-forced scoring of a ``score_tokens`` response with D-LEAF attached:
    after the whole prompt (both modes pay its prefill), and after a :class:`dleaf.engine.PromptCache` of the prompt
    made once beforehand (the response's own cost, as when several responses are scored against one prompt)."""
    out = {}
    for batch, prompt in inputs_by_batch.items():
        response = random_response(model, batch, cfg.score_tokens, cfg.seed, prompt["input_ids"].device)
        set_text_attention(model, "eager")
        _sync(response.device)
        t0 = time.perf_counter()
        cache = engine.PromptCache(model, prompt)
        _sync(response.device)
        cache_s = time.perf_counter() - t0
        times = {m: [] for m in SCORING_MODES} | {"prompt_prefill": []}
        logps = {}
        for round_ in range(1 + cfg.score_repeats):  # one warm-up round
            for mode in (SCORING_MODES if round_ % 2 == 0 else SCORING_MODES[::-1]):
                parts = {}
                logp, s = score_once(model, prompt, response, mode, parts, cache)
                logps[mode] = logp
                if round_ > 0:
                    times[mode].append(s)
                    if "prefill_s" in parts:
                        times["prompt_prefill"].append(parts["prefill_s"])
        one, step = _median(times["one_pass"]), _median(times["stepwise"])
        c_one, c_step = _median(times["cached_one_pass"]), _median(times["cached_stepwise"])
        pre = _median(times["prompt_prefill"])
        out[str(batch)] = {
            "response_tokens": cfg.score_tokens, "one_pass_s": one, "stepwise_s": step, "speedup": step / one,
            "prompt_prefill_s": pre,
            # the response's own share estimated by subtraction: what each mode spends beyond the prompt's prefill
            "response_only_speedup": (step - pre) / (one - pre) if one > pre else float("inf"),
            "one_pass_tokens_per_s": batch * cfg.score_tokens / one,
            "stepwise_tokens_per_s": batch * cfg.score_tokens / step,
            "max_abs_logprob_diff": float((logps["one_pass"] - logps["stepwise"]).abs().max()),
            # the response's own share measured directly: both modes after the same cached prompt
            "cached": {
                "prompt_cache_s": cache_s, "one_pass_s": c_one, "stepwise_s": c_step, "speedup": c_step / c_one,
                "max_abs_logprob_diff": float((logps["cached_one_pass"] - logps["cached_stepwise"]).abs().max()),
                "max_abs_diff_to_one_pass": float((logps["cached_one_pass"] - logps["one_pass"]).abs().max()),
            },
            "raw": times,
        }
        log(f"  scoring batch {batch}: one pass {one:.3f} s, step by step {step:.3f} s, x{step / one:.1f}; after a "
            f"cached prompt: one pass {c_one:.3f} s, step by step {c_step:.3f} s, x{c_step / c_one:.1f}")
    return out


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def bench_memory(name: str, model, inputs: dict, cfg: BenchConfig, log=print) -> dict:
    """Peak memory of every configuration at every batch size (CPU: one fresh subprocess each)."""
    out = {}
    for batch in cfg.batch_sizes:
        mem = {}
        for config in cfg.configs:
            if torch.device(cfg.device).type == "cuda":
                mem[config] = measure_memory_cuda(model, inputs[batch], config, cfg)
            else:
                mem[config] = measure_memory_cpu(name, batch, config, cfg)
            log(f"  memory batch {batch} {config}: +{mem[config]['extra_mb']:.1f} MB")
        out[str(batch)] = memory_ratios(mem)
    return out


def run_memory_only(cfg: BenchConfig, out: str | Path, log=print) -> dict:
    """Measure only peak memory (CPU) for ``cfg.memory_models`` and merge it into the JSON at ``out``."""
    path = Path(out)
    result = json.loads(path.read_text()) if path.is_file() else {"bench_config": cfg.to_dict(),
                                                                     "environment": environment(), "models": {}}
    for name in cfg.memory_models:
        log(f"memory {name}")
        entry = result["models"].setdefault(name, {})
        entry["memory"] = bench_memory(name, None, None, cfg, log)
        write_json_atomic(result, path, indent=1)
    return result


def run_benchmark(cfg: BenchConfig, out: str | Path | None = None, log=print) -> dict:
    """Run the whole benchmark; write the JSON atomically to ``out`` after each model (when given)."""
    result = {"bench_config": cfg.to_dict(), "environment": environment(), "models": {},
              "reference_cost_model": {"description": LLAVA15_7B, "cost_model": cost_model(LLAVA15_7B, cfg.new_tokens)}}
    torch.manual_seed(cfg.seed)
    for name in cfg.models:
        log(f"model {name}")
        batches = sorted(set(cfg.batch_sizes) | set(cfg.score_batch_sizes if name in cfg.score_models else ()))
        model, inputs, desc = build_model_and_inputs(name, cfg, batches)
        entry = {"description": desc, "cost_model": cost_model(desc, cfg.new_tokens)}
        entry["loop_equals_generate"] = check_loop_equals_generate(model, inputs[min(batches)], cfg)
        log(f"  {desc}; loop equals generate: {entry['loop_equals_generate']}")
        entry["ops_per_step"] = count_step_ops(model, inputs[min(batches)], cfg)
        entry["decoding"] = bench_decoding(model, {b: inputs[b] for b in cfg.batch_sizes}, cfg, log)
        if cfg.paired_steps:
            entry["paired"] = bench_paired(model, {b: inputs[b] for b in cfg.batch_sizes}, cfg, log)
        if name in cfg.score_models:
            entry["scoring"] = bench_scoring(model, {b: inputs[b] for b in cfg.score_batch_sizes}, cfg, log)
        if cfg.memory and name in cfg.memory_models:
            entry["memory"] = bench_memory(name, model, inputs, cfg, log)
        result["models"][name] = entry
        if out is not None:
            write_json_atomic(result, out, indent=1)
        del model, inputs
        gc.collect()
    return result


# ---------------------------------------------------------------------------------------------------- cost model
#: LLaVA-1.5-7B's decoder, for the analytic cost model (Vicuna-7B: 32 layers, 32 heads, hidden 4096, MLP 11008,
#: vocabulary 32000; 576 image tokens).
LLAVA15_7B = {"name": "llava-1.5-7b (analytic)", "layers": 32, "heads": 32, "hidden": 4096, "intermediate": 11008,
              "vocab": 32000, "image_tokens": 576, "prompt_tokens": 640}

#: Elementwise passes over a (head, key) row that the current engine makes per watched layer and query row: the
#: eager softmax (scale, mask add, softmax: ~4, which sdpa fuses away), the statistics (image mass twice, profile,
#: head-mixed profile, entropy: ~10, all over the full key row under a mask) and the fusion (gather, difference,
#: scale, add: ~4).
PASSES_PER_HEAD_KEY = {"eager_softmax": 4, "statistics": 10, "fusion": 4}


def cost_model(desc: dict, new_tokens: int = 32) -> dict:
    """What one decoding step costs per batch row, in multiply-adds, and what D-LEAF adds to it.

    Step (Llama decoder): ``L (4 d^2 + 3 d f + 2 d K) + d V`` with K the keys at that step (the prompt plus half the
    new tokens, on average). D-LEAF per watched layer: ``H (c_stat K + c_fuse K)`` elementwise operations for the
    statistics over the current row and the fusion (``H |I|`` for the statistics if they read only the image keys),
    plus ``c_soft H K`` for materialising the softmax that sdpa would fuse, plus the head selection and thresholds,
    ``O(H)``. Returned as counts and as fractions of the step.
    """
    L, H, d, f, V = desc["layers"], desc["heads"], desc["hidden"], desc["intermediate"], desc["vocab"]
    K = desc["prompt_tokens"] + new_tokens // 2
    image = desc["image_tokens"]
    step = L * (4 * d * d + 3 * d * f + 2 * d * K) + d * V
    c = PASSES_PER_HEAD_KEY
    dleaf_now = L * H * K * (c["statistics"] + c["fusion"])
    dleaf_image_only = L * H * (c["statistics"] * image + c["fusion"] * K)
    soft = L * H * K * c["eager_softmax"]
    return {"keys": K, "step_macs": step, "attention_macs": L * 2 * d * K,
            "dleaf_elementwise": dleaf_now, "dleaf_elementwise_image_keys_only": dleaf_image_only,
            "eager_softmax_elementwise": soft,
            "dleaf_fraction_of_step": dleaf_now / step, "eager_softmax_fraction_of_step": soft / step}


# ---------------------------------------------------------------------------------------------------- report
def _nan_for_null(x):
    """A result read back from strict JSON (where NaN was written as null) with null numbers as NaN again."""
    if isinstance(x, dict):
        return {k: _nan_for_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_for_null(v) for v in x]
    return math.nan if x is None else x


def format_report(result: dict) -> str:
    """The results as text tables: per model and batch size, medians and ratios; memory; scoring."""
    result = _nan_for_null(result)
    lines = []
    for name, entry in result["models"].items():
        d = entry["description"]
        lines.append(f"\n== {name} ({d['source']}): {d['layers']} layers x {d['heads']} heads, hidden {d['hidden']}, "
                     f"{d['image_tokens']} image tokens, prompt {d['prompt_tokens']} tokens; loop equals generate: "
                     f"{entry['loop_equals_generate']}")
        ops = entry.get("ops_per_step", {})
        if ops:
            lines.append("operators per decoding step: " + ", ".join(f"{k} {v}" for k, v in ops.items()))
        for batch, dec in entry["decoding"].items():
            lines.append(f"-- batch {batch}")
            lines.append(f"{'config':<13}{'prefill s':>10}{'step ms':>9}{'dec tok/s':>11}{'/eager':>8}{'/sdpa':>7}"
                         f"{'e2e tok/s':>11}{'/eager':>8}{'/sdpa':>7}")
            for config, r in dec["configs"].items():
                lines.append(f"{config:<13}{r['prefill_s']:>10.3f}{r['step_ms']:>9.2f}{r['decode_tokens_per_s']:>11.1f}"
                             f"{r['decode_ratio_to_plain_eager']:>8.3f}{r['decode_ratio_to_plain_sdpa']:>7.3f}"
                             f"{r['e2e_tokens_per_s']:>11.1f}{r['e2e_ratio_to_plain_eager']:>8.3f}"
                             f"{r['e2e_ratio_to_plain_sdpa']:>7.3f}")
        for batch, rows in entry.get("paired", {}).items():
            lines.append(f"-- paired steps, batch {batch} (turns of one step with plain eager and plain sdpa)")
            lines.append(f"{'config':<15}{'step ms':>9}{'eager ms':>10}{'sdpa ms':>9}{'/eager':>8}{'/sdpa':>7}"
                         f"{'+ms vs eager':>14}")
            for config, r in rows.items():
                lines.append(f"{config:<15}{r['step_ms']:>9.2f}{r['plain_eager_step_ms']:>10.2f}"
                             f"{r['plain_sdpa_step_ms']:>9.2f}{r['ratio_to_plain_eager']:>8.3f}"
                             f"{r['ratio_to_plain_sdpa']:>7.3f}{r['median_diff_ms_to_plain_eager']:>14.2f}")
        for batch, mem in entry.get("memory", {}).items():
            lines.append(f"-- peak memory, batch {batch} (MB; extra = above the loaded model)")
            lines.append(f"{'config':<13}{'peak':>9}{'extra':>9}{'peak/eager':>11}{'peak/sdpa':>10}"
                         f"{'extra/eager':>12}{'extra/sdpa':>11}")
            for config, r in mem.items():
                lines.append(f"{config:<13}{r['peak_mb']:>9.1f}{r['extra_mb']:>9.1f}"
                             f"{r['peak_ratio_to_plain_eager']:>11.3f}{r['peak_ratio_to_plain_sdpa']:>10.3f}"
                             f"{r['extra_ratio_to_plain_eager']:>12.3f}{r['extra_ratio_to_plain_sdpa']:>11.3f}")
        for batch, s in entry.get("scoring", {}).items():
            lines.append(f"-- scoring a {s['response_tokens']}-token response with D-LEAF, batch {batch}: one pass "
                         f"{s['one_pass_s']:.3f} s, step by step {s['stepwise_s']:.3f} s, speed-up "
                         f"x{s['speedup']:.2f}; beyond the prompt's prefill ({s['prompt_prefill_s']:.3f} s) "
                         f"x{s['response_only_speedup']:.2f} (max |logprob diff| {s['max_abs_logprob_diff']:.1e})")
            c = s.get("cached")
            if c:
                lines.append(f"   after a cached prompt (made once in {c['prompt_cache_s']:.3f} s): one pass "
                             f"{c['one_pass_s']:.3f} s, step by step {c['stepwise_s']:.3f} s, speed-up "
                             f"x{c['speedup']:.2f} (max |logprob diff| {c['max_abs_logprob_diff']:.1e})")
    return "\n".join(lines)


def markdown_tables(result: dict) -> str:
    """The results as Markdown tables (for docs/performance.md): per model and batch size, the median decoding
    throughput and its ratios, peak memory and scoring."""
    result = _nan_for_null(result)
    out = []
    for name, entry in result["models"].items():
        d = entry["description"]
        out.append(f"### {name} ({d['source']} weights): {d['layers']} layers, {d['heads']} heads, hidden {d['hidden']}, "
                   f"{d['image_tokens']} image tokens, {d['prompt_tokens']}-token prompt\n")
        for batch, dec in entry["decoding"].items():
            rows = dec["configs"]
            out.append(f"Batch {batch}, {next(iter(rows.values()))['repeats']} interleaved repeats, medians:\n")
            out.append("| configuration | prefill s | ms / step | decode tok/s | / eager | / sdpa | end-to-end tok/s "
                       "| / eager | / sdpa |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for config, r in rows.items():
                out.append(f"| {config} | {r['prefill_s']:.3f} | {r['step_ms']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                           f"{r['decode_ratio_to_plain_eager']:.2f} | {r['decode_ratio_to_plain_sdpa']:.2f} | "
                           f"{r['e2e_tokens_per_s']:.1f} | {r['e2e_ratio_to_plain_eager']:.2f} | "
                           f"{r['e2e_ratio_to_plain_sdpa']:.2f} |")
            out.append("")
        for batch, rows in entry.get("paired", {}).items():
            steps = next(iter(rows.values()))["steps"] if rows else 0
            out.append(f"Paired steps, batch {batch}: each configuration takes turns with plain eager and plain sdpa, "
                       f"one cached step at a time, {steps} steps, medians:\n")
            out.append("| configuration | ms / step | plain eager ms | plain sdpa ms | / eager | / sdpa | "
                       "median extra ms vs eager |")
            out.append("|---|---:|---:|---:|---:|---:|---:|")
            for config, r in rows.items():
                out.append(f"| {config} | {r['step_ms']:.1f} | {r['plain_eager_step_ms']:.1f} | "
                           f"{r['plain_sdpa_step_ms']:.1f} | {r['ratio_to_plain_eager']:.3f} | "
                           f"{r['ratio_to_plain_sdpa']:.3f} | {r['median_diff_ms_to_plain_eager']:.2f} |")
            out.append("")
        for batch, mem in entry.get("memory", {}).items():
            out.append(f"Peak memory, batch {batch} (MB; extra = above the loaded model and inputs):\n")
            out.append("| configuration | peak | extra | peak / eager | peak / sdpa | extra / eager | extra / sdpa |")
            out.append("|---|---:|---:|---:|---:|---:|---:|")
            for config, r in mem.items():
                out.append(f"| {config} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} | {r['peak_ratio_to_plain_eager']:.2f} | "
                           f"{r['peak_ratio_to_plain_sdpa']:.2f} | {r['extra_ratio_to_plain_eager']:.2f} | "
                           f"{r['extra_ratio_to_plain_sdpa']:.2f} |")
            out.append("")
        if entry.get("scoring"):
            out.append("Teacher-forced scoring with D-LEAF attached:\n")
            out.append("| batch | response tokens | one pass s | step by step s | speed-up | prompt prefill s | "
                       "speed-up beyond the prompt | max abs log-prob diff |")
            out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
            for batch, sc in entry["scoring"].items():
                out.append(f"| {batch} | {sc['response_tokens']} | {sc['one_pass_s']:.3f} | {sc['stepwise_s']:.3f} | "
                           f"{sc['speedup']:.1f}x | {sc['prompt_prefill_s']:.3f} | {sc['response_only_speedup']:.1f}x | "
                           f"{sc['max_abs_logprob_diff']:.1e} |")
            out.append("")
            cached = {b: sc["cached"] for b, sc in entry["scoring"].items() if sc.get("cached")}
            if cached:
                out.append("The same response after a cached prompt (`PromptCache`, made once; only the response's "
                           "own cost is timed):\n")
                out.append("| batch | prompt cache s | one pass s | step by step s | speed-up | max abs log-prob diff |")
                out.append("|---:|---:|---:|---:|---:|---:|")
                for batch, c in cached.items():
                    out.append(f"| {batch} | {c['prompt_cache_s']:.3f} | {c['one_pass_s']:.3f} | "
                               f"{c['stepwise_s']:.3f} | {c['speedup']:.1f}x | {c['max_abs_logprob_diff']:.1e} |")
                out.append("")
        if entry.get("ops_per_step"):
            out.append("Operators dispatched by one decoding step (batch 1): " +
                       ", ".join(f"{k} {v}" for k, v in entry["ops_per_step"].items()) + "\n")
    return "\n".join(out)
