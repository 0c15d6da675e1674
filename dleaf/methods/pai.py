"""PAI (Liu et al., ECCV 2024), its attention part: boost the current row's pre-softmax scores over image keys."""

from __future__ import annotations

import dataclasses

import torch

from .base import Method, MethodConfig, layer_range, register


@dataclasses.dataclass(frozen=True)
class PAIConfig(MethodConfig):
    """PAI (Liu et al., ECCV 2024), attention part: in layers ``[layer_start, layer_end)``, the current query row's
    pre-softmax scores over image keys become ``w + alpha |w|``. PAI's classifier-free guidance step is not included.

    Knobs:
        alpha: strength of the boost of image-key scores (0: plain decoding)
        layer_start: first layer boosted
        layer_end: one past the last layer boosted (None: the last layer)
    """

    alpha: float = 0.2
    layer_start: int = 2
    layer_end: int | None = None

    def __post_init__(self):
        if self.alpha < 0:
            raise ValueError(f"PAIConfig.alpha must be >= 0, got {self.alpha}")
        layer_range("PAIConfig", self.layer_start, self.layer_end)


@register("pai", "PAI's attention part: the current row's pre-softmax scores over image keys become w + alpha |w|")
class PAI(Method):
    config_class = PAIConfig

    def attend(self, call):
        first, active, image, alpha = call.first, call.active, call.image, self.config.alpha

        def boost(scores):
            rows = scores[:, :, first:]
            sel = (active[:, None, :, None] & image[:, None, None, :]).to(rows.dtype)
            rows = rows + alpha * rows.abs() * sel
            return torch.cat([scores[:, :, :first], rows], dim=2)

        weights = call.weights(pre_softmax=boost)
        return call.finish(torch.matmul(weights, call.values()), weights)
