"""Configuration of D-LEAF and of the baselines that share its mechanism (PAI, SPIN, the ablations).

Every knob of the project's definition (``METHOD.md``, summarised in ``docs/method.md``) is a field here, validated
on construction so that a bad value fails before any model is touched. A method is chosen by name with
:func:`method_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

LAYER_SIGNALS = ("liae", "mass_deficit")
LIAE_VARIANTS = ("mixed", "mean_head")
IAF_VARIANTS = ("mass", "focus")
THRESHOLDS = ("running", "best")
HEAD_SELECTIONS = ("below_mean", "bottom_k", "all_but_best")
LOCALIZATIONS = ("threshold", "everywhere", "random")
FUSION_TARGETS = ("best", "random")


def _choice(owner: str, name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


def _layer_range(owner: str, start: int, end: int | None) -> None:
    if start < 0:
        raise ValueError(f"{owner}.layer_start must be >= 0, got {start}")
    if end is not None and end <= start:
        raise ValueError(f"{owner}.layer_end must be None (all layers) or > layer_start={start}, got {end}")


@dataclasses.dataclass(frozen=True)
class DLeafConfig:
    """D-LEAF: flag layers by a causal dynamic threshold on a layer signal, rank their heads by image attention
    focus, and fuse the weak heads' attention rows toward the best head's.

    Layer signal (``layer_signal``): ``"liae"``, the layer image-attention entropy (``liae_variant`` ``"mixed"``:
    entropy of the head-mixed image profile, or ``"mean_head"``: mean of per-head entropies; ``liae_normalize``
    divides by log |I|), flagged when it rises above its threshold; or ``"mass_deficit"``, minus the layer's
    head-mean image mass, flagged when the image mass falls below its threshold.

    Threshold (``threshold``), per sample and per layer, from the sample's earlier generated positions only:
    ``"running"``: flagged when signal > mean + ``kappa`` * std of the earlier values (population std);
    ``"best"``: flagged when signal > the lowest earlier value + ``margin``. Nothing is flagged until ``warmup``
    earlier values exist. Only layers in ``[layer_start, layer_end)`` are ever flagged.

    ``localization``: ``"threshold"`` is D-LEAF; ``"everywhere"`` fuses in every eligible layer at every position
    (the no-localization ablation); ``"random"`` flags each eligible layer at each position with probability
    ``random_rate`` (seeded by ``seed``), the random-layer ablation at D-LEAF's flag rate.

    ``fusion_target``: ``"best"`` fuses toward h* (D-LEAF); ``"random"`` fuses each corrected row toward a head drawn
    uniformly among the heads other than h* (per sample, position and layer, seeded by ``seed``; a corrected head
    equal to the draw is left alone): the random-target null, with D-LEAF's sites and strength and no image-seeking
    direction.

    Heads: ``h* = argmax IAF`` (``iaf_variant`` ``"mass"`` or ``"focus"``); corrected heads are those below the
    layer's mean IAF (``"below_mean"``), the ``bottom_k`` lowest (``"bottom_k"``, never h*), or every head but h*
    (``"all_but_best"``). Correction: ``a[h] <- (1 - gamma) a[h] + gamma a[h*]`` on the current query row.
    """

    gamma: float = 0.5
    layer_signal: str = "liae"
    liae_variant: str = "mixed"
    liae_normalize: bool = True
    iaf_variant: str = "mass"
    threshold: str = "running"
    kappa: float = 1.0
    margin: float = 0.0
    warmup: int = 2
    layer_start: int = 0
    layer_end: int | None = None
    head_selection: str = "below_mean"
    bottom_k: int = 1
    localization: str = "threshold"
    random_rate: float = 0.1
    fusion_target: str = "best"
    seed: int = 0

    def __post_init__(self):
        owner = type(self).__name__
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"{owner}.gamma must lie in [0, 1] (a convex mix of two heads' rows); got {self.gamma}")
        _choice(owner, "layer_signal", self.layer_signal, LAYER_SIGNALS)
        _choice(owner, "liae_variant", self.liae_variant, LIAE_VARIANTS)
        _choice(owner, "iaf_variant", self.iaf_variant, IAF_VARIANTS)
        _choice(owner, "threshold", self.threshold, THRESHOLDS)
        _choice(owner, "head_selection", self.head_selection, HEAD_SELECTIONS)
        _choice(owner, "localization", self.localization, LOCALIZATIONS)
        _choice(owner, "fusion_target", self.fusion_target, FUSION_TARGETS)
        if self.kappa != self.kappa or self.margin != self.margin:
            raise ValueError(f"{owner}.kappa and margin must be numbers, got {self.kappa}, {self.margin}")
        if self.warmup < 1:
            raise ValueError(f"{owner}.warmup must be >= 1 (a threshold needs an earlier value); got {self.warmup}")
        if self.bottom_k < 1:
            raise ValueError(f"{owner}.bottom_k must be >= 1, got {self.bottom_k}")
        if not 0.0 <= self.random_rate <= 1.0:
            raise ValueError(f"{owner}.random_rate must lie in [0, 1], got {self.random_rate}")
        _layer_range(owner, self.layer_start, self.layer_end)


@dataclasses.dataclass(frozen=True)
class PAIConfig:
    """PAI (Liu et al., ECCV 2024), attention part: in layers ``[layer_start, layer_end)``, the current query row's
    pre-softmax scores over image keys become ``w + alpha |w|``."""

    alpha: float = 0.2
    layer_start: int = 2
    layer_end: int | None = None

    def __post_init__(self):
        if self.alpha < 0:
            raise ValueError(f"PAIConfig.alpha must be >= 0, got {self.alpha}")
        _layer_range("PAIConfig", self.layer_start, self.layer_end)


@dataclasses.dataclass(frozen=True)
class SPINConfig:
    """SPIN (Sarkar et al., 2025): in layers ``[layer_start, layer_end)``, keep the ``floor(keep_ratio * H)`` heads
    (at least one) with the largest image mass on the current query row, and multiply the other heads' outputs by
    ``scale``."""

    keep_ratio: float = 0.95
    scale: float = 0.08
    layer_start: int = 0
    layer_end: int | None = None

    def __post_init__(self):
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"SPINConfig.keep_ratio must lie in (0, 1], got {self.keep_ratio}")
        if not 0.0 <= self.scale <= 1.0:
            raise ValueError(f"SPINConfig.scale must lie in [0, 1], got {self.scale}")
        _layer_range("SPINConfig", self.layer_start, self.layer_end)


MethodConfig = DLeafConfig | PAIConfig | SPINConfig

#: Methods by name: the config class and the fields each name fixes.
METHODS: dict[str, tuple[type, dict]] = {
    "dleaf": (DLeafConfig, {}),
    "no_localization": (DLeafConfig, {"localization": "everywhere"}),
    "random_layers": (DLeafConfig, {"localization": "random"}),
    "random_target": (DLeafConfig, {"fusion_target": "random"}),
    "pai": (PAIConfig, {}),
    "spin": (SPINConfig, {}),
}


def method_config(name: str, **knobs) -> MethodConfig:
    """The configuration of the method called ``name`` (one of :data:`METHODS`), with ``knobs`` overriding its
    defaults; an unknown name or knob is an error that lists what is valid."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods are {', '.join(METHODS)} (or 'greedy' for none)")
    cls, fixed = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(knobs) - fields)
    if unknown:
        raise ValueError(f"method {name!r} has no knob(s) {', '.join(unknown)}; its knobs are {', '.join(sorted(fields))}")
    clash = sorted(k for k in knobs if k in fixed and knobs[k] != fixed[k])
    if clash:
        raise ValueError(f"method {name!r} fixes {', '.join(f'{k}={fixed[k]!r}' for k in clash)}")
    return cls(**{**knobs, **fixed})
