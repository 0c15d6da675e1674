"""Teacher-forced scoring: a response's per-token log-probabilities in one forward pass, with or without a method
attached, and after a prompt run once (:class:`PromptCache`)."""

from __future__ import annotations

import inspect

import torch

from . import cache_events
from .interface import attached_to, cache_kwarg, image_token_id, text_attention_modules
from .intervention import Intervention


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., tokens]`` in float32: (..., V) logits and (...) token ids give (...)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]


def response_logprobs(model, inputs: dict, response_start: torch.Tensor | list[int],
                      intervention: Intervention | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced per-token log-probabilities of each sample's response, in one forward pass.

    ``inputs`` are model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...) holding prompt and
    response, left-padded; ``response_start[b]`` is the column of sample b's first response token. With an attached
    ``intervention``, every position from the last prompt token on is corrected exactly as step-by-step decoding
    would correct it. Returns ``(logprobs, mask)``, both (B, T): ``logprobs[b, t]`` is log p(input_ids[b, t] |
    input_ids[b, :t]) where ``mask[b, t]`` (a response column), else 0.
    """
    input_ids = inputs["input_ids"]
    b, t = input_ids.shape
    start = torch.as_tensor(response_start, device=input_ids.device).long().reshape(-1)
    if start.shape[0] != b:
        raise ValueError(f"response_start has {start.shape[0]} entries for a batch of {b}")
    if bool((start < 1).any()) or bool((start > t).any()):
        raise ValueError(f"response_start must lie in [1, {t}] (a response needs a prompt before it); got "
                         f"{start.tolist()}")
    if intervention is None:
        logits = model(**inputs, use_cache=False).logits
    else:
        _check_scoring(intervention, "response_logprobs")
        with intervention.scoring(response_start=start):
            logits = model(**inputs, use_cache=False).logits
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    logp = torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)
    columns = torch.arange(t, device=input_ids.device)[None, :]
    mask = columns >= start[:, None]
    if "attention_mask" in inputs:
        mask = mask & inputs["attention_mask"].bool()
    return torch.where(mask, logp, torch.zeros_like(logp)), mask


def _check_scoring(intervention, owner: str) -> None:
    if not intervention.attached:
        raise ValueError(f"the intervention passed to {owner} is detached")
    if not intervention.method.scores_teacher_forced:
        raise NotImplementedError(f"{type(intervention.method).__name__} acts in generate only; {owner} cannot apply "
                                  "it to teacher-forced scoring")


# ---------------------------------------------------------------------------------------------------- prompt cache
PER_TOKEN_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class PromptCache:
    """A batch of prompts run once, up to but not including each prompt's last token, to score many responses
    after it (:func:`cached_response_logprobs`, :func:`cached_stepwise_logprobs`).

    D-LEAF, PAI and SPIN act only from a prompt's last token on, so the keys and values of the rows before it are the
    same under every method and knob (gamma included): they are computed once, by the plain model (an attached
    intervention is set aside while they are), and every scoring call after that pays only for its own tokens. A
    scoring call appends to the cache and crops it back to the prompt when it ends.

    ``inputs``: the prompts' model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...), left-padded to a
    common length of at least 2. Positions are those :func:`response_logprobs` uses (the model's default
    ``arange``). Models with multimodal rotary positions (Qwen2-VL's M-RoPE) are refused: their text positions after
    the image depend on the whole prompt, which a cached call does not see; score them with
    :func:`response_logprobs`.
    """

    def __init__(self, model, inputs: dict):
        if "input_ids" not in inputs:
            raise ValueError("PromptCache needs the prompts' input_ids (to find the image tokens)")
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"PromptCache needs input_ids of shape (batch, length >= 2), got {tuple(ids.shape)}")
        if "position_ids" in inputs:
            raise ValueError("PromptCache takes no position_ids: it uses the model's default positions, as "
                             "response_logprobs does")
        inner = getattr(model, "model", model)
        if hasattr(inner, "get_rope_index") or hasattr(model, "get_rope_index"):
            raise ValueError(f"{type(model).__name__} has multimodal rotary positions (M-RoPE), which a cached prompt "
                             "cannot carry; score it with response_logprobs (one pass over prompt and response)")
        image_id = image_token_id(model)
        if bool((ids[:, -1] == image_id).any()):
            raise ValueError("a prompt ends with an image token; the last prompt token must be text (it is scored "
                             "with the responses, without the image inputs)")
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        self.input_ids, self.attention_mask = ids, mask
        self.length = ids.shape[1] - 1  # rows held in the cache
        head = {k: (v[:, :-1] if k in PER_TOKEN_INPUTS else v) for k, v in inputs.items()}
        head["attention_mask"] = mask[:, :-1]
        self.model = model
        attached = self._attached()
        if attached is not None:
            attached.detach()
        if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
            head["logits_to_keep"] = 1  # the prompt's logits are not needed
        try:
            with torch.no_grad():
                out = model(**head, use_cache=True)
        finally:
            if attached is not None:
                attached.reattach()
        self.cache = getattr(out, "cache", None)
        if self.cache is None:
            self.cache = out.past_key_values
        if self.cache is None or not hasattr(self.cache, "crop"):
            raise RuntimeError(f"{type(model).__name__} returned no croppable key/value cache for the prompt")

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def _check(self, response: torch.Tensor, response_mask: torch.Tensor | None) -> torch.Tensor:
        if response.dim() != 2 or response.shape[0] != self.batch_size or response.shape[1] < 1:
            raise ValueError(f"response must have shape ({self.batch_size}, length >= 1) for this prompt cache, got "
                             f"{tuple(response.shape)}")
        if int(self.cache.get_seq_length()) != self.length:
            raise RuntimeError(f"the prompt cache holds {int(self.cache.get_seq_length())} rows, expected "
                               f"{self.length}; was it used outside the cached scorers?")
        if response_mask is None:
            return torch.ones_like(response)
        if response_mask.shape != response.shape:
            raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}, response "
                             f"{tuple(response.shape)}")
        return response_mask

    def _attached(self) -> "Intervention | None":
        return attached_to(text_attention_modules(self.model))

    def _check_intervention(self, intervention) -> None:
        attached = self._attached()
        if intervention is None and attached is not None:
            raise ValueError("an intervention is attached to the prompt cache's model: pass it to the cached scorer "
                             "(or detach it to score the plain model)")
        if intervention is not None and intervention is not attached:
            raise ValueError("the intervention passed to the cached scorer is not the one attached to the prompt "
                             "cache's model (detached, or attached to another model)")

    def _rewind(self) -> None:
        """Crop the cache back to the prompt (``crop`` takes the negative count of tokens to remove)."""
        extra = int(self.cache.get_seq_length()) - self.length
        if extra > 0:
            with cache_events.muted(self.cache):  # the scoring sequence is over: nothing to roll back
                self.cache.crop(-extra)

    def _call(self, ids: torch.Tensor, mask: torch.Tensor, intervention, resume: torch.Tensor | None,
              score_from=None):
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": True, cache_kwarg(self.model): self.cache}
        if intervention is None or resume is None:
            return self.model(**kwargs).logits
        _check_scoring(intervention, "the prompt cache scorers")
        with intervention.scoring(response_start=score_from, tokens_so_far=resume):
            return self.model(**kwargs).logits


def _response_logp(logits: torch.Tensor, response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = token_logprobs(logits, response)
    return torch.where(mask.bool(), logp, torch.zeros_like(logp))


def cached_response_logprobs(prompt: PromptCache, response: torch.Tensor, response_mask: torch.Tensor | None = None,
                             intervention: Intervention | None = None) -> torch.Tensor:
    """Teacher-forced log-probabilities of ``response`` (B, R) after the cached prompts, in one forward pass over the
    prompts' last token and the response: (B, R), ``[b, t] = log p(response[b, t] | prompt[b], response[b, :t])``
    where ``response_mask`` (right padding; default all ones) is set, else 0.

    Equal, up to rounding, to the response columns of :func:`response_logprobs` over prompt and response, with the
    same ``intervention`` (attached to the prompt cache's model) correcting every row from the last prompt token on.
    """
    mask = prompt._check(response, response_mask)
    prompt._check_intervention(intervention)
    ids = torch.cat([prompt.input_ids[:, -1:], response], dim=1)
    full_mask = torch.cat([prompt.attention_mask, mask.to(prompt.attention_mask.dtype)], dim=1)
    resume = torch.cat([prompt.input_ids, response], dim=1)
    start = torch.full((prompt.batch_size,), prompt.input_ids.shape[1], device=response.device)
    try:
        logits = prompt._call(ids, full_mask, intervention, resume, start)
    finally:
        prompt._rewind()
    return _response_logp(logits[:, :-1], response, mask)


def cached_stepwise_logprobs(prompt: PromptCache, response: torch.Tensor, response_mask: torch.Tensor | None = None,
                             intervention: Intervention | None = None) -> torch.Tensor:
    """:func:`cached_response_logprobs` computed step by step, as decoding would: the prompts' last token, then one
    cached forward call per response token (R calls in all). The reference the one-pass scorer is checked and
    benchmarked against."""
    mask = prompt._check(response, response_mask)
    prompt._check_intervention(intervention)
    full_mask = torch.cat([prompt.attention_mask, mask.to(prompt.attention_mask.dtype)], dim=1)
    n = prompt.input_ids.shape[1]
    logits = []
    try:
        ids = prompt.input_ids[:, -1:]
        logits.append(prompt._call(ids, full_mask[:, :n], intervention, prompt.input_ids)[:, -1])
        for t in range(response.shape[1] - 1):
            logits.append(prompt._call(response[:, t:t + 1], full_mask[:, :n + t + 1], None, None)[:, -1])
    finally:
        prompt._rewind()
    return _response_logp(torch.stack(logits, dim=1), response, mask)
