"""PAI (Liu et al., ECCV 2024), its attention part: boost the current row's pre-softmax scores over image keys."""

from __future__ import annotations

import dataclasses

import torch

from .base import Method, MethodConfig, layer_range, register
from .localizers import check_localization


@dataclasses.dataclass(frozen=True)
class PAIConfig(MethodConfig):
    """PAI (Liu et al., ECCV 2024), attention part: in layers ``[layer_start, layer_end)``, the current query row's
    pre-softmax scores over image keys become ``w + alpha |w|``. PAI's classifier-free guidance step is not included.
    ``localization`` restricts the boost to the rows a localizer flags (:mod:`dleaf.methods.localizers`; PAI itself:
    ``"everywhere"``).

    Knobs:
        alpha: strength of the boost of image-key scores (0: plain decoding)
        layer_start: first layer boosted
        layer_end: one past the last layer boosted (None: the last layer)
        localization: where to boost: "everywhere" (PAI), "random", "threshold" (D-LEAF's LIAE flags, its default
            threshold knobs), "oracle" (the cells of flags), "prompt_threshold", "calibrated" or "learned"
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

    alpha: float = 0.2
    layer_start: int = 2
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
        if self.alpha < 0:
            raise ValueError(f"PAIConfig.alpha must be >= 0, got {self.alpha}")
        layer_range("PAIConfig", self.layer_start, self.layer_end)
        check_localization("PAIConfig", self)
        if not 0.0 <= self.random_rate <= 1.0:
            raise ValueError(f"PAIConfig.random_rate must lie in [0, 1], got {self.random_rate}")


@register("pai", "PAI's attention part: the current row's pre-softmax scores over image keys become w + alpha |w|")
class PAI(Method):
    config_class = PAIConfig

    def attend(self, call):
        first, image, alpha = call.first, call.image, self.config.alpha
        plain = call.weights()[:, :, first:] if self.localizer is not None and self.localizer.needs_rows else None
        active = self.rows_to_act(call, plain)  # every active row for PAI itself (localization="everywhere")

        def boost(scores):
            rows = scores[:, :, first:]
            sel = active[:, None, :, None] & image[:, None, None, :]
            # where, not a product with a 0/1 mask: a masked key's score (the dtype's minimum) times alpha > 1
            # overflows to -inf, and inf * 0 would be NaN
            rows = torch.where(sel, rows + alpha * rows.abs(), rows)
            return torch.cat([scores[:, :, :first], rows], dim=2)

        weights = call.weights(pre_softmax=boost)
        return call.finish(torch.matmul(weights, call.values()), weights)
