"""SPIN (Sarkar et al., 2025): damp the outputs of the heads that attend least to the image."""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import attention_stats as stats
from .base import Method, MethodConfig, layer_range, register
from .localizers import check_localization


@dataclasses.dataclass(frozen=True)
class SPINConfig(MethodConfig):
    """SPIN (Sarkar et al., 2025): in layers ``[layer_start, layer_end)``, keep the ``floor(keep_ratio * H)`` heads
    (at least one) with the largest image mass on the current query row, and multiply the other heads' outputs by
    ``scale``. ``localization`` restricts the suppression to the rows a localizer flags
    (:mod:`dleaf.methods.localizers`; SPIN itself: ``"everywhere"``).

    Knobs:
        keep_ratio: fraction of heads kept (those with the most image mass), in (0, 1]
        scale: factor on the other heads' outputs, in [0, 1] (1: plain decoding)
        layer_start: first layer acted on
        layer_end: one past the last layer acted on (None: the last layer)
        localization: where to suppress: "everywhere" (SPIN), "random", "threshold" (D-LEAF's LIAE flags, its
            default threshold knobs), "oracle" (the cells of flags), "prompt_threshold", "calibrated" or
            "learned"
        random_rate: flag probability with localization="random"
        seed: seed of the random localization
        flags: with localization="oracle", the flag provider (a FlagSet, a mapping, a callable or a JSON flag file)
        calibration: with localization="calibrated", the calibration file (its path or mapping) of
            scripts/calibrate_localizer.py
        percentile: with localization="calibrated", the per-layer percentile of the calibration above which a row
            is flagged
        detector: with localization="learned", a fitted detector, its JSON file or a shipped one's name (organism)
        detector_threshold: with localization="learned", the detector probability above which a row is flagged
            (none: the threshold the detector file records, else 0.5)
    """

    keep_ratio: float = 0.95
    scale: float = 0.08
    layer_start: int = 0
    layer_end: int | None = None
    localization: str = "everywhere"
    random_rate: float = 0.1
    seed: int = 0
    flags: object | None = None
    calibration: object | None = None
    percentile: float = 95.0
    detector: object | None = None
    detector_threshold: float | None = None

    def __post_init__(self):
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"SPINConfig.keep_ratio must lie in (0, 1], got {self.keep_ratio}")
        if not 0.0 <= self.scale <= 1.0:
            raise ValueError(f"SPINConfig.scale must lie in [0, 1], got {self.scale}")
        layer_range("SPINConfig", self.layer_start, self.layer_end)
        check_localization("SPINConfig", self)
        if not 0.0 <= self.random_rate <= 1.0:
            raise ValueError(f"SPINConfig.random_rate must lie in [0, 1], got {self.random_rate}")


@register("spin", "SPIN: keep the heads with the most image mass, scale the other heads' outputs down")
class SPIN(Method):
    config_class = SPINConfig

    def attend(self, call):
        cfg, first = self.config, call.first
        weights = call.weights()
        rows = weights if first == 0 else weights[:, :, first:]  # (B, H, Qa, K)
        mass = stats.image_mass(rows, call.image, check=False)  # (B, H, Qa)
        keep = max(1, int(math.floor(cfg.keep_ratio * self.host.num_heads)))
        order = mass.argsort(dim=1, descending=True).argsort(dim=1)  # rank of each head, 0 = most mass
        damp = (order >= keep) & self.rows_to_act(call, rows)[:, None, :]  # every active row for SPIN itself
        out = torch.matmul(weights, call.values())
        scale = torch.where(damp, torch.full_like(mass, cfg.scale), torch.ones_like(mass)).to(out.dtype)
        out = torch.cat([out[:, :, :first], out[:, :, first:] * scale[..., None]], dim=2)
        return call.finish(out, weights)
