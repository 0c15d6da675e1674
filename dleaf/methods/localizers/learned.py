"""``learned``: flag a row where a fitted detector (:mod:`dleaf.detect`) says it predicts a hallucinated object word.

Knobs (the method configuration's): ``detector``, a :class:`dleaf.detect.Detector`, the path of its JSON file or
the name of a shipped one (``organism``; refused when it was fitted on another model), and ``detector_threshold``,
the probability above which a row is flagged (None, the default: the threshold recorded in the detector file, chosen
where it was fitted; 0.5 for a file that records none, the line above which a calibrated detector's row is more
likely hallucinated than not).

Causality. The detector reads, at one row, the features of its ``layers`` (LIAE, image mass, per-head mass and
focus): a row's layer-``l`` features exist once its layer ``l`` has run. The localizer computes each feature layer's
values from that layer's own attention rows (before any correction: the correction acts only from the last feature
layer on), and flags the row in every watched layer from the detector's last feature layer ``l* = max(layers)`` on,
never in a shallower layer. Since no layer below ``l*`` is corrected, and no layer up to ``l*`` reads a corrected
hidden state (a layer's keys and values come from the layers below it), the features at every row equal those of
the plain model on the same tokens: the flags are those of teacher-forced scoring of the reply, in every decoding
mode. The localizer holds no state from one forward call to the next (its features are the current call's), so
reordering beams, rolling back the cache and replaying in one pass need nothing. The shipped organism detector uses
layer 0 alone, so it flags in every layer.
"""

from __future__ import annotations

import torch

from ... import attention_stats as stats
from . import Localizer, register_localizer


@register_localizer("learned")
class Learned(Localizer):
    needs_rows = True

    def __init__(self, config, host):
        from ...detect import as_detector

        super().__init__(config, host)
        path = getattr(config, "detector", None)
        if path is None:
            raise ValueError(f"{type(config).__name__}: localization='learned' needs detector (a detector file of "
                             "dleaf.detect)")
        self.detector = as_detector(path)
        self.detector.check_model(host.model)
        t = getattr(config, "detector_threshold", None)
        if t is None:
            t = self.detector.threshold if self.detector.threshold is not None else 0.5
        self.threshold = float(t)
        self.last = max(self.detector.layers)
        self.step: dict = {}

    def begin(self, batch, device):
        missing = [layer for layer in self.detector.layers if layer not in self.host.watched]
        if missing:
            raise ValueError(f"the detector reads layers {missing}, which the method does not watch")

    def before_forward(self, kwargs, new_sequence):
        self.step = {}

    def end_forward(self):
        self.step = {}

    def flags(self, call, rows=None):
        if rows is None:
            raise ValueError("the learned localizer needs the layer's attention rows")
        layer = call.layer
        if layer in self.detector.layers:
            liae = stats.layer_entropy(rows, call.image, "mixed", False, check=False)  # (B, Qa)
            mass = stats.head_focus(rows, call.image, "mass", check=False)  # (B, H, Qa)
            focus = stats.head_focus(rows, call.image, "focus", check=False)
            self.step[layer] = (liae, mass, focus)
        if layer < self.last:
            return torch.zeros_like(call.active)
        if "flag" not in self.step:
            B, Qa = call.active.shape
            per = [self.step[lay] for lay in self.detector.layers]
            liae = torch.stack([p[0] for p in per], -1).reshape(B * Qa, -1).double()
            mass = torch.stack([p[1].transpose(1, 2) for p in per], 2).reshape(B * Qa, len(per), -1).double()
            focus = torch.stack([p[2].transpose(1, 2) for p in per], 2).reshape(B * Qa, len(per), -1).double()
            from ...detect import features_from_values

            prob = self.detector.torch_probability(features_from_values(liae, mass, focus)).reshape(B, Qa)
            self.step["prob"] = prob
            self.step["flag"] = prob > self.threshold
        return self.step["flag"] & call.active


__all__ = ["Learned"]
