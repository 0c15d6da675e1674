"""``threshold``: D-LEAF's localization, for corrections other than D-LEAF's own fusion.

A watched layer is flagged at an active row when its layer signal (LIAE, or the image-mass deficit) exceeds the
causal threshold of the same sample's earlier active rows in that layer (:func:`dleaf.methods.dleaf.causal_threshold`).
The knobs are the method configuration's where it has them (``layer_signal``, ``liae_variant``, ``liae_normalize``,
``threshold``, ``kappa``, ``margin``, ``warmup``), else D-LEAF's defaults. D-LEAF itself computes the same flags
natively, fused with its fusion (one-row kernel, compiled path); this copy is the multi-row formula, run per layer
on the rows the method is given, which are the model's own attention rows before any correction.
"""

from __future__ import annotations

import math

import torch

from ... import attention_stats as stats
from . import Localizer, register_localizer

_KNOBS = ("layer_signal", "liae_variant", "liae_normalize", "threshold", "kappa", "margin", "warmup")


@register_localizer("threshold")
class Threshold(Localizer):
    needs_rows = True

    def __init__(self, config, host):
        from ..dleaf import DLeafConfig

        super().__init__(config, host)
        defaults = DLeafConfig()
        self.knobs = DLeafConfig(**{k: getattr(config, k, getattr(defaults, k)) for k in _KNOBS})
        self.stats: torch.Tensor | None = None

    def begin(self, batch, device):
        L = self.host.num_layers
        self.stats = torch.stack([torch.zeros(L, batch, 1, dtype=torch.float64, device=device)] * 3
                                 + [torch.full((L, batch, 1), math.inf, dtype=torch.float64, device=device)])

    def reorder(self, index):
        self.stats.copy_(self.stats.index_select(2, index))

    def rollback(self, length):
        return False  # the running statistics of the removed positions cannot be taken out again

    def flags(self, call, rows=None):
        from ..dleaf import causal_threshold

        if rows is None:
            raise ValueError("the threshold localizer needs the layer's attention rows")
        cfg, active = self.knobs, call.active
        if cfg.layer_signal == "liae":
            signal = stats.layer_entropy(rows, call.image, cfg.liae_variant, cfg.liae_normalize, check=False)
        else:
            signal = -stats.image_mass(rows, call.image, check=False).mean(dim=1)
        signal = signal.to(torch.float64)  # (B, Qa)
        act = active.to(torch.float64)
        s_act = torch.where(active, signal, torch.zeros_like(signal))
        count0, total0, squares0, best0 = self.stats[:, call.layer].unbind(0)  # (B, 1) views
        count = count0 + torch.cumsum(act, 1) - act
        total = total0 + torch.cumsum(s_act, 1) - s_act
        squares = squares0 + torch.cumsum(s_act * s_act, 1) - s_act * s_act
        s_inf = torch.where(active, signal, torch.full_like(signal, math.inf))
        prev_best = torch.cat([torch.full_like(s_inf[:, :1], math.inf), torch.cummin(s_inf, 1).values[:, :-1]], 1)
        best = torch.minimum(best0, prev_best)
        tau, ready = causal_threshold(count, total, squares, best, cfg)
        with torch.no_grad():
            count0 += act.sum(1, keepdim=True)
            total0 += s_act.sum(1, keepdim=True)
            squares0 += (s_act * s_act).sum(1, keepdim=True)
            torch.minimum(best0, s_inf.min(1, keepdim=True).values, out=best0)
        return active & ready & (signal > tau)


__all__ = ["Threshold"]
