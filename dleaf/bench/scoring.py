"""Teacher-forced scoring in the benchmark: one pass against step by step, with and without a cached prompt."""

from __future__ import annotations

import time

import torch

from .. import engine
from .loop import Stream, sync
from .models import set_text_attention

# ---------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def stepwise_logprobs(model, prompt: dict, response: torch.Tensor, times: dict | None = None) -> torch.Tensor:
    """Teacher-forced log-probabilities of ``response`` (B, R) after ``prompt``, step by step: a prefill of the prompt
    (whose last row scores response token 0), then one cached step per response token 0..R-2. ``times``, when
    given, receives the prefill's duration as ``prefill_s``."""
    stream = Stream(model, prompt)
    t0 = time.perf_counter()
    logits = [stream.prefill()]
    if times is not None:
        sync(response.device)
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
        sync(device)
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
        sync(device)
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

