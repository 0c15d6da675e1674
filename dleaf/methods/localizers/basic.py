"""The localizers without knowledge of the sample: ``everywhere`` and ``random``."""

from __future__ import annotations

import torch

from . import Localizer, register_localizer


@register_localizer("everywhere")
class Everywhere(Localizer):
    """Every active row of every watched layer (the call's ``active`` itself)."""

    def flags(self, call, rows=None):
        return call.active


@register_localizer("random")
class RandomRows(Localizer):
    """Each active row of each watched layer with probability ``config.random_rate``, drawn per call and layer from a
    generator seeded by ``config.seed`` (made on the sequence's device at the first sequence, as D-LEAF's own)."""

    def __init__(self, config, host):
        super().__init__(config, host)
        self.generator: torch.Generator | None = None

    def begin(self, batch, device):
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.config.seed)

    def check_replay(self):
        raise NotImplementedError(
            "generate(use_cache=False) recomputes every earlier position at each step, which would draw the random "
            "rows again; use the default cache with localization='random'")

    def flags(self, call, rows=None):
        active = call.active
        draw = torch.rand(active.shape, generator=self.generator, device=active.device)
        return active & (draw < self.config.random_rate)
