"""``threshold``: D-LEAF's localization, for corrections other than D-LEAF's own fusion.

A watched layer is flagged at an active row when its layer signal (LIAE, or the image-mass deficit) exceeds the
causal threshold of the same sample's earlier active rows in that layer (:func:`dleaf.methods.dleaf.causal_threshold`).
The knobs are the method configuration's where it has them (``layer_signal``, ``liae_variant``, ``liae_normalize``,
``threshold``, ``kappa``, ``margin``, ``warmup``), else D-LEAF's defaults. D-LEAF itself computes the same flags
natively, fused with its fusion; this copy runs the same two formulas per layer on the rows the method is given (the
model's own attention rows before any correction): D-LEAF's one-row kernel for a single active row (every decoding
step, the prefill's last row), its multi-row formula otherwise (teacher-forced scoring), so that it flags exactly
the cells D-LEAF flags.
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
        from ..dleaf import causal_threshold, prefix_statistics

        if rows is None:
            raise ValueError("the threshold localizer needs the layer's attention rows")
        if rows.shape[2] == 1:
            return self._one_row(call, rows)
        cfg, active = self.knobs, call.active
        if cfg.layer_signal == "liae":
            signal = stats.layer_entropy(rows, call.image, cfg.liae_variant, cfg.liae_normalize, check=False)
        else:
            signal = -stats.image_mass(rows, call.image, check=False).mean(dim=1)
        signal = signal.to(torch.float64)  # (B, Qa)
        count, total, squares, best = prefix_statistics(signal, active, *self.stats[:, call.layer].unbind(0))
        tau, ready = causal_threshold(count, total, squares, best, cfg)
        return active & ready & (signal > tau)

    def _one_row(self, call, rows):
        """One active row: the signal and flag of :func:`dleaf.methods.dleaf.one_row_step` (at zero strength), the
        running statistics updated as D-LEAF's one-row path updates them."""
        from ..dleaf import causal_threshold, one_row_step

        cfg, active = self.knobs, call.active  # active (B, 1)
        stats_ = self.stats[:, call.layer]  # (4, B, 1)
        count, total, squares, best = stats_[..., None].unbind(0)  # (B, 1, 1)
        tau, ready = causal_threshold(count, total, squares, best, cfg)
        gate = active[:, :, None] & ready
        n = self.host.image.sum(dim=-1).to(rows.dtype)
        big = n > 1
        safe = torch.where(big, n, torch.full_like(n, 2.0))
        neg_inv_log = -torch.where(big, 1.0 / torch.log(safe), torch.zeros_like(n))[:, None, None]
        image_row = self.host.image_row(rows.shape[-1], rows.dtype)
        _, signal, flag, _, _ = one_row_step(rows, image_row, gate, tau, neg_inv_log, 0.0, cfg)
        signal, act = signal[..., 0].to(torch.float64), active  # (B, 1)
        count0, total0, squares0, best0 = stats_.unbind(0)
        with torch.no_grad():
            s_act = torch.where(act, signal.detach(), 0.0)
            count0.add_(act)
            total0.add_(s_act)
            squares0.addcmul_(s_act, s_act)
            torch.minimum(best0, torch.where(act, signal.detach(), math.inf), out=best0)
        return flag[:, :, 0]


__all__ = ["Threshold"]
