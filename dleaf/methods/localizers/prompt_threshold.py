"""``prompt_threshold``: a per-layer threshold from the prompt's own rows, fixed for the reply.

At the call that holds a sample's first active row (the prefill, or the one teacher-forced pass of scoring and of
``generate(use_cache=False)``), each watched layer's signal is computed at the prompt's query rows after its image
(the text rows between the last image token and the prompt's last token, that last row excluded: it is position 0,
the row to be judged), and the layer's threshold is ``tau = mean + kappa * sd`` of those values (population sd); with
no such row the layer never flags. Every active row, position 0 included, is flagged in a layer where its signal
exceeds ``tau``. The threshold is a function of the prompt alone, so it needs no headroom below the signal's maximum
over the reply (a running threshold over earlier reply rows can lie above every value the signal takes) and it can
act at the first generated token.

Signal (:func:`row_signal`, the configuration's ``layer_signal``, D-LEAF's knob): ``"liae"``, the layer image-
attention entropy (``liae_variant``, ``liae_normalize``; high = diffuse), or ``"mass_deficit"``, minus the head-mean
image mass of the row (the image-mass deficit of :mod:`dleaf.premise` and :mod:`dleaf.actionability`). Knobs read
from the configuration where it has them (D-LEAF has ``layer_signal``, ``liae_variant``, ``liae_normalize`` and
``kappa``), else D-LEAF's defaults (PAI and SPIN).

The prompt rows are read from the layer's own eager attention (the model's rows before any correction; the prompt
rows are never corrected). With ``unwatched="sdpa"`` and a padded batch, the engine computes the prefill's earlier
rows with the fast kernel and hands the method only the last one: the localizer then refuses (attach with
``unwatched="eager"``).
"""

from __future__ import annotations

import math

import torch

from ... import attention_stats as stats
from . import Localizer, register_localizer

SIGNALS = ("liae", "mass_deficit")
_SIGNAL_KNOBS = ("layer_signal", "liae_variant", "liae_normalize")


def signal_knobs(config) -> dict:
    """``{"layer_signal", "liae_variant", "liae_normalize"}`` of a method configuration (D-LEAF's defaults where it
    has no such field)."""
    from ..dleaf import DLeafConfig

    defaults = DLeafConfig()
    knobs = {k: getattr(config, k, getattr(defaults, k)) for k in _SIGNAL_KNOBS}
    if knobs["layer_signal"] not in SIGNALS:
        raise ValueError(f"layer_signal must be one of {', '.join(SIGNALS)}, got {knobs['layer_signal']!r}")
    return knobs


def row_signal(rows: torch.Tensor, image: torch.Tensor, knobs: dict) -> torch.Tensor:
    """(B, Q) float64: the layer signal of attention rows ``rows`` (B, H, Q, K) with image keys ``image`` (B, K);
    larger = more anomalous (more diffuse image attention, or less image mass)."""
    if knobs["layer_signal"] == "liae":
        signal = stats.layer_entropy(rows, image, knobs["liae_variant"], knobs["liae_normalize"], check=False)
    else:
        signal = -stats.image_mass(rows, image, check=False).mean(dim=1)
    return signal.to(torch.float64)


def prompt_rows(host, q_len: int) -> torch.Tensor:
    """(B, q_len) bool: which of a forward call's query rows (a call that starts at the sequence's first column) are
    prompt rows after the sample's image: after its last image token, before its first active row."""
    pos = host.row_positions(0)  # (B, q_len), 0 at the first active row
    image = host.image  # (B, T0) over the prompt's columns
    cols = torch.arange(image.shape[1], device=image.device)
    last_image = torch.where(image, cols, torch.full_like(cols, -1)).max(dim=1).values  # (B,)
    q = torch.arange(q_len, device=pos.device)[None, :]
    return (pos < 0) & (q > last_image[:, None])


def prompt_threshold(signal: torch.Tensor, mask: torch.Tensor, kappa: float) -> torch.Tensor:
    """(B,) ``mean + kappa * sd`` of ``signal`` (B, Q) over ``mask`` per sample (population sd; inf where the mask
    is empty)."""
    n = mask.sum(dim=1).to(torch.float64)
    s = torch.where(mask, signal, torch.zeros_like(signal))
    mean = s.sum(dim=1) / n.clamp(min=1)
    dev = torch.where(mask, signal - mean[:, None], torch.zeros_like(signal))
    sd = ((dev * dev).sum(dim=1) / n.clamp(min=1)).sqrt()
    return torch.where(n > 0, mean + kappa * sd, torch.full_like(mean, math.inf))


@register_localizer("prompt_threshold")
class PromptThreshold(Localizer):
    """The module docstring's flags. State per sample and layer: the prompt's threshold (inf until it is known)."""

    needs_rows = True

    def __init__(self, config, host):
        super().__init__(config, host)
        self.knobs = signal_knobs(config)
        self.kappa = float(getattr(config, "kappa", 1.0))
        if self.kappa != self.kappa:
            raise ValueError(f"kappa must be a number, got {self.kappa}")
        self.tau: torch.Tensor | None = None  # (L, B) float64

    def begin(self, batch, device):
        self.tau = torch.full((self.host.num_layers, batch), math.inf, dtype=torch.float64, device=device)

    def reorder(self, index):
        self.tau = self.tau.index_select(1, index)

    def rollback(self, length):
        return True  # the threshold depends on the prompt only (a crop into the prompt starts the sequence over)

    def _learn(self, call):
        """At the call holding the first active row: the layer's threshold from the prompt rows before it."""
        pos = call.positions()
        if not bool((pos == 0).any()):
            return
        if call.prefix is not None or call.first + pos.shape[1] != call.query.shape[2]:
            raise ValueError("the prompt_threshold localizer needs the prompt's attention rows, which the engine "
                             "computed with the fast kernel (unwatched='sdpa'); attach with unwatched='eager'")
        if self.host._call.get("first_column", 0) != 0:
            raise ValueError("the prompt_threshold localizer needs a call that starts at the prompt's first token")
        mask = prompt_rows(self.host, call.query.shape[2])  # (B, Q): no prompt row is ever corrected
        starts = pos == 0  # the samples whose first active row is in this call
        if not bool(mask.any()):
            tau = torch.full((pos.shape[0],), math.inf, dtype=torch.float64, device=pos.device)
        else:
            with torch.no_grad():
                weights = call.weights()  # the model's own rows, before any correction
                tau = prompt_threshold(row_signal(weights, call.image, self.knobs), mask, self.kappa)
        learn = starts.any(dim=1)
        self.tau[call.layer] = torch.where(learn, tau, self.tau[call.layer])

    def flags(self, call, rows=None):
        if rows is None:
            raise ValueError("the prompt_threshold localizer needs the layer's attention rows")
        self._learn(call)
        signal = row_signal(rows, call.image, self.knobs)  # (B, Qa)
        return call.active & (signal > self.tau[call.layer][:, None])


__all__ = ["PromptThreshold", "SIGNALS", "prompt_rows", "prompt_threshold", "row_signal", "signal_knobs"]
