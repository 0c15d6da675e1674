"""VCD (Leng et al., CVPR 2024): visual contrastive decoding against a noised copy of the image.

A second stream decodes the same tokens with the image distorted by forward-diffusion noise; the next-token logits
become ``(1 + alpha) l(image) - alpha l(noised)``, over the tokens whose probability under the image is at least
``beta`` times the best one's (VCD's adaptive plausibility constraint; the others get ``-inf``). It acts on the
logits, so it runs inside ``model.generate`` as a logits processor: ``engine.generation_kwargs(iv, inputs)`` returns
it. The noised stream mirrors the image stream call for call (the same keyword arguments as ``generate`` gives the
model, with the noised pixels and its own cache), follows beam search's reordering of the batch, and rolls back with
the image stream's cache.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .base import Method, MethodConfig, register


@dataclasses.dataclass(frozen=True)
class VCDConfig(MethodConfig):
    """VCD (Leng et al., CVPR 2024): contrast the next-token logits with those under a noised image.

    Knobs:
        alpha: contrast weight, logits (1 + alpha) l(image) - alpha l(noised) (0: plain decoding)
        beta: plausibility cut-off, in [0, 1): tokens below beta times the best probability are excluded
        noise_step: forward-diffusion step (of 1000, linear beta schedule) that noises the image
        seed: seed of the Gaussian noise
    """

    alpha: float = 1.0
    beta: float = 0.1
    noise_step: int = 500
    seed: int = 0

    def __post_init__(self):
        if not self.alpha >= 0:
            raise ValueError(f"VCDConfig.alpha must be >= 0, got {self.alpha}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"VCDConfig.beta must lie in [0, 1), got {self.beta}")
        if not 0 <= self.noise_step < 1000:
            raise ValueError(f"VCDConfig.noise_step must lie in [0, 1000), got {self.noise_step}")


def noised_pixels(pixel_values: torch.Tensor, step: int = 500, seed: int = 0) -> torch.Tensor:
    """VCD's distorted image: the forward diffusion ``sqrt(abar_t) x + sqrt(1 - abar_t) eps`` at ``step`` of a
    1000-step linear beta schedule (1e-4 to 0.02), with seeded Gaussian ``eps``."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = float(torch.cumprod(1 - betas, 0)[step])
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(pixel_values.shape, generator=g, dtype=torch.float32).to(pixel_values)
    return math.sqrt(abar) * pixel_values + math.sqrt(1 - abar) * eps


def contrastive_logits(clean: torch.Tensor, noised: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """VCD's combination: ``(1 + alpha) clean - alpha noised`` (float32) over the tokens whose probability under
    ``clean`` is at least ``beta`` times the best one's; the others get ``-inf``."""
    clean, noised = clean.float(), noised.float()
    mixed = (1 + alpha) * clean - alpha * noised
    if beta > 0:
        logp = torch.log_softmax(clean, dim=-1)
        cut = logp.max(dim=-1, keepdim=True).values + math.log(beta)
        mixed = mixed.masked_fill(logp < cut, -math.inf)
    return mixed


class ContrastiveLogitsProcessor(LogitsProcessor):
    """The logits processor that runs VCD in ``generate``: at each step it takes the noised stream's logits for the
    step the model just ran and combines them with the image stream's (:func:`contrastive_logits`). It runs after
    transformers' own processors (penalties, minimum length) and before the sampling warpers (temperature, top-k,
    top-p)."""

    def __init__(self, method: "VCD"):
        self.method = method

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        noised = self.method.noised_step_logits()
        cfg = self.method.config
        return contrastive_logits(scores, noised, cfg.alpha, cfg.beta)


@register("vcd", "VCD: contrast the next-token logits with those under a diffusion-noised image (in generate)")
class VCD(Method):
    config_class = VCDConfig
    acts_on_attention = False
    scores_teacher_forced = False

    def __init__(self, config: VCDConfig, host):
        super().__init__(config, host)
        self.armed: dict | None = None
        self.cache = None
        self.pending: dict | None = None

    def watched_layers(self, num_layers: int) -> range:
        return range(0)

    def generation_kwargs(self, inputs: dict) -> dict:
        pixels = inputs.get("pixel_values")
        if pixels is None:
            raise ValueError("VCD needs the image inputs (pixel_values) of the generate call")
        self.armed = {"inputs": dict(inputs), "noised": noised_pixels(pixels, self.config.noise_step, self.config.seed),
                      "features": {}}
        return {"logits_processor": LogitsProcessorList([ContrastiveLogitsProcessor(self)])}

    def begin(self, batch: int, device) -> None:
        if self.armed is None:
            raise ValueError("VCD acts on the logits inside model.generate: pass "
                             "**engine.generation_kwargs(intervention, inputs) to generate")
        self.cache, self.pending = None, None

    def _expanded(self, rows: int) -> dict:
        """The armed inputs with the noised pixels, expanded as ``generate`` expands a batch (beams, returned
        sequences) to ``rows`` rows."""
        inputs = {**self.armed["inputs"], "pixel_values": self.armed["noised"]}
        batch = int(inputs["input_ids"].shape[0]) if "input_ids" in inputs else rows
        if rows == batch:
            return inputs
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if rows % batch or any(v.shape[0] != batch for v in tensors.values()):
            raise NotImplementedError("generate expanded the batch (beams or returned sequences) and this model's image "
                                      "inputs are not one row per sample, so VCD cannot expand its noised copy alike")
        return {**inputs, **{k: v.repeat_interleave(rows // batch, dim=0) for k, v in tensors.items()}}

    def _check_prompt(self, input_ids: torch.Tensor) -> None:
        armed = self.armed["inputs"].get("input_ids")
        if armed is None:
            return
        rows, batch = input_ids.shape[0], armed.shape[0]
        if (rows % batch or armed.shape[1] != input_ids.shape[1]
                or not torch.equal(armed.to(input_ids.device).repeat_interleave(rows // batch, dim=0), input_ids)):
            raise ValueError("the prompts of this generate call are not those engine.generation_kwargs was given; call "
                             "generation_kwargs with the inputs passed to generate")

    def _noised_features(self, rows: int, device):
        """The noised image through the model's own image encoder (what ``generate`` passes pre-encoded as
        ``mm_encoder_outputs``), for a batch of ``rows`` rows."""
        if rows not in self.armed["features"]:
            encoder = self.host.model.base_model.get_image_features
            params = inspect.signature(encoder).parameters
            kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                      for k, v in self._expanded(rows).items() if k in params and k != "kwargs"}
            with torch.no_grad():
                self.armed["features"][rows] = encoder(**kwargs, return_dict=True)
        return self.armed["features"][rows]

    def before_forward(self, kwargs: dict, new_sequence: bool) -> None:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            raise NotImplementedError("VCD's noised stream needs a 2-D attention mask; a static cache (4-D masks "
                                      "prepared for it) is not supported with VCD")
        ids = kwargs.get("input_ids")
        rows = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
        if new_sequence and ids is not None:
            self._check_prompt(ids)
        call = dict(kwargs)
        if call.get("mm_encoder_outputs"):
            encoded = dict(call["mm_encoder_outputs"])
            if encoded.get("image") is not None:
                encoded["image"] = self._noised_features(rows, ids.device if ids is not None else None)
            call["mm_encoder_outputs"] = encoded
        elif call.get("pixel_values") is not None:
            call["pixel_values"] = self._expanded(rows)["pixel_values"].to(call["pixel_values"].device)
        for name in ("cache", "past_key_values"):
            if name in call:
                call[name] = self.cache
        if "cache" not in call and "past_key_values" not in call and call.get("use_cache", True):
            call[_cache_name(self.host.model)] = self.cache
        self.pending = call

    def noised_step_logits(self) -> torch.Tensor:
        """Run the noised stream for the step the image stream just ran; its last logits (B, V)."""
        if self.pending is None:
            raise RuntimeError("VCD's logits processor was called without a forward call of the attached model")
        call, self.pending = self.pending, None
        with torch.no_grad(), self.host.aside():
            out = self.host.model(**call)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        return out.logits[:, -1]

    def reorder(self, index) -> None:
        if self.cache is not None:
            self.cache.reorder_cache(index)

    def rollback(self, length: int) -> bool:
        if self.cache is not None:
            extra = int(self.cache.get_seq_length()) - length
            if extra > 0:
                self.cache.crop(-extra)
        return True


def _cache_name(model) -> str:
    from ..engine.interface import cache_kwarg

    return cache_kwarg(model)
