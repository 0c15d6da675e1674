"""The benchmark's decoding loop: a prefill and one cached forward per token, for every configuration."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from .. import engine
from ..methods import vcd
from .config import BenchConfig, plan_of
from .models import set_text_attention

# ---------------------------------------------------------------------------------------------------- the loop
def cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class Stream:
    """One sequence state of the greedy loop: attention mask, next positions and key/value cache. Positions follow
    ``generate``: ``cumsum(attention_mask) - 1`` at prefill (0 on left padding), then one more per step."""

    def __init__(self, model, inputs: dict):
        self.model, self.inputs = model, inputs

    def prefill(self) -> torch.Tensor:
        mask = self.inputs["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = self.model(**self.inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
        self.cache, self.mask, self.pos = cache_of(out), mask, pos[:, -1:]
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.pos = self.pos + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos,
                         use_cache=True, logits_to_keep=1, **{engine.cache_kwarg(self.model): self.cache})
        return out.logits[:, -1]


def contrastive_logits(alpha: float, beta: float) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """VCD's combination of the two streams' logits (:func:`dleaf.methods.vcd.contrastive_logits`):
    ``(1 + alpha) l(image) - alpha l(noised)`` over the tokens whose probability under the image is at least ``beta``
    times the best one (the others get -inf)."""

    def combine(logits: list[torch.Tensor]) -> torch.Tensor:
        return vcd.contrastive_logits(logits[0], logits[1], alpha, beta)

    return combine


noised_pixels = vcd.noised_pixels


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def only_stream(logits: list[torch.Tensor]) -> torch.Tensor:
    return logits[0]


@torch.no_grad()
def greedy_loop(model, inputs_list: Sequence[dict], new_tokens: int,
                combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
                processors=None) -> tuple[torch.Tensor, dict]:
    """Greedy decoding of exactly ``new_tokens`` tokens (no early stop): one prefill of each stream, then one cached
    step of each stream per token; the next token is the argmax of ``combine(logits of the streams)`` (default: the
    only stream's logits), passed through ``processors`` (a method's logits processors, from
    :func:`dleaf.engine.generation_kwargs`) with the tokens so far. Returns the new tokens (B, new_tokens) and the
    timings ``prefill_s`` (prefill and first token) and ``decode_s`` (the ``new_tokens - 1`` cached steps)."""
    device = inputs_list[0]["input_ids"].device
    combine = combine or only_stream
    streams = [Stream(model, inputs) for inputs in inputs_list]
    ids = inputs_list[0]["input_ids"]

    def pick(logits):
        nonlocal ids
        logits = combine(logits)
        if processors:
            logits = processors(ids, logits)
        token = logits.argmax(dim=-1)
        if processors:
            ids = torch.cat([ids, token[:, None]], dim=1)
        return token

    sync(device)
    t0 = time.perf_counter()
    token = pick([s.prefill() for s in streams])
    tokens = [token]
    sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = pick([s.step(token) for s in streams])
        tokens.append(token)
    sync(device)
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


def noised_inputs(inputs: dict, cfg: BenchConfig) -> dict:
    """``inputs`` with the image distorted as VCD's second stream sees it (for the explicit two-stream reference:
    ``greedy_loop(model, [inputs, noised_inputs(inputs, cfg)], n, contrastive_logits(alpha, beta))``)."""
    return {**inputs, "pixel_values": noised_pixels(inputs["pixel_values"], cfg.vcd_noise_step, cfg.seed)}


def run_config(model, inputs: dict, config: str, cfg: BenchConfig,
               new_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Decode ``inputs`` once with configuration ``config`` (:func:`dleaf.bench.config.plan_of`), the method
    attached through the engine, with the logits processors it asks for; returns (tokens, timings)."""
    new_tokens = cfg.new_tokens if new_tokens is None else new_tokens
    plan = plan_of(config, model.config.text_config.num_hidden_layers, cfg)
    set_text_attention(model, plan.attention)
    with plan.attached(model) as iv:
        processors = engine.generation_kwargs(iv, inputs).get("logits_processor")
        return greedy_loop(model, [inputs], new_tokens, None, processors)
