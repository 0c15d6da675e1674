"""D-LEAF: flag layers by a causal threshold on a layer signal, rank their heads by image attention focus, and fuse
the weak heads' attention rows toward the best head's; and its ablations (``no_localization``, ``random_layers``,
``random_target``).

The formulas are written twice: for many query rows at once (:meth:`DLeaf._rows`, teacher-forced scoring and
``generate(use_cache=False)``, through :mod:`dleaf.attention_stats`) and for the one row of a decoding step
(:func:`one_row_step`, few operators, no host synchronisation). Tests check both against a brute-force loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import torch

from .. import attention_stats as stats
from ..engine.kernels import softmax_scores
from .base import Method, MethodConfig, choice, layer_range, register
from .localizers import check_localization

LAYER_SIGNALS = ("liae", "mass_deficit")
LIAE_VARIANTS = ("mixed", "mean_head")
IAF_VARIANTS = ("mass", "focus")
THRESHOLDS = ("running", "best")
HEAD_SELECTIONS = ("below_mean", "bottom_k", "all_but_best")
LOCALIZATIONS = ("threshold", "everywhere", "random")  # computed natively; "oracle" and any other registered
# localizer (dleaf.methods.localizers) run through the localizer protocol
FUSION_TARGETS = ("best", "random")


@dataclasses.dataclass(frozen=True)
class DLeafConfig(MethodConfig):
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
    ``random_rate`` (seeded by ``seed``), the random-layer ablation at D-LEAF's flag rate; ``"oracle"`` flags the
    (position, layer) cells named by ``flags`` (:mod:`dleaf.methods.localizers.oracle`), the prompt's last row
    included; any other localizer registered in :mod:`dleaf.methods.localizers` is accepted.

    ``fusion_target``: ``"best"`` fuses toward h* (D-LEAF); ``"random"`` fuses each corrected row toward a head drawn
    uniformly among the heads other than h* (per sample, position and layer, seeded by ``seed``; a corrected head
    equal to the draw is left alone): the random-target null, with D-LEAF's sites and strength and no image-seeking
    direction.

    Heads: ``h* = argmax IAF`` (``iaf_variant`` ``"mass"`` or ``"focus"``); corrected heads are those below the
    layer's mean IAF (``"below_mean"``), the ``bottom_k`` lowest other than h* (``"bottom_k"``), or every head but h*
    (``"all_but_best"``). Correction: ``a[h] <- (1 - gamma) a[h] + gamma a[h*]`` on the current query row.

    Knobs:
        gamma: fusion strength in [0, 1] (0: plain decoding, bit for bit)
        layer_signal: "liae" (layer image-attention entropy) or "mass_deficit" (minus the head-mean image mass)
        liae_variant: "mixed" (entropy of the head-mixed profile) or "mean_head" (mean of per-head entropies)
        liae_normalize: divide LIAE by log |I|
        iaf_variant: "mass" (image mass) or "focus" (mass times one minus the normalised entropy)
        threshold: "running" (mean + kappa std of earlier values) or "best" (lowest earlier value + margin)
        kappa: standard deviations above the running mean
        margin: margin above the lowest earlier value ("best")
        warmup: earlier values needed before a layer can be flagged
        layer_start: first layer watched
        layer_end: one past the last layer watched (None: the last layer)
        head_selection: "below_mean", "bottom_k" or "all_but_best"
        bottom_k: heads corrected with "bottom_k" (never h*)
        localization: "threshold" (D-LEAF), "everywhere", "random", "oracle" (the cells of flags) or another
            registered localizer
        random_rate: flag probability with localization="random"
        fusion_target: "best" (h*) or "random" (a head other than h*)
        seed: seed of the random localization and target draws
        flags: with localization="oracle", the flag provider (a FlagSet, a mapping, a callable or a JSON flag file)
        calibration: with localization="calibrated", the calibration file (its path or mapping) of
            scripts/calibrate_localizer.py
        percentile: with localization="calibrated", the per-layer percentile of the calibration above which a row
            is flagged
        detector: with localization="learned", a fitted detector, its JSON file or a shipped one's name (organism)
        detector_threshold: with localization="learned", the detector probability above which a row is flagged
            (none: the threshold the detector file records, else 0.5)
    """

    #: the method's trace holds per-layer flags (dleaf.generation counts them)
    traces_flags: ClassVar[bool] = True

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
    flags: object | None = None
    calibration: object | None = None
    percentile: float = 95.0
    detector: object | None = None
    detector_threshold: float | None = None

    def __post_init__(self):
        owner = type(self).__name__
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"{owner}.gamma must lie in [0, 1] (a convex mix of two heads' rows); got {self.gamma}")
        choice(owner, "layer_signal", self.layer_signal, LAYER_SIGNALS)
        choice(owner, "liae_variant", self.liae_variant, LIAE_VARIANTS)
        choice(owner, "iaf_variant", self.iaf_variant, IAF_VARIANTS)
        choice(owner, "threshold", self.threshold, THRESHOLDS)
        choice(owner, "head_selection", self.head_selection, HEAD_SELECTIONS)
        check_localization(owner, self)
        choice(owner, "fusion_target", self.fusion_target, FUSION_TARGETS)
        if self.kappa != self.kappa or self.margin != self.margin:
            raise ValueError(f"{owner}.kappa and margin must be numbers, got {self.kappa}, {self.margin}")
        if self.warmup < 1:
            raise ValueError(f"{owner}.warmup must be >= 1 (a threshold needs an earlier value); got {self.warmup}")
        if self.bottom_k < 1:
            raise ValueError(f"{owner}.bottom_k must be >= 1, got {self.bottom_k}")
        if not 0.0 <= self.random_rate <= 1.0:
            raise ValueError(f"{owner}.random_rate must lie in [0, 1], got {self.random_rate}")
        layer_range(owner, self.layer_start, self.layer_end)


# ---------------------------------------------------------------------------------------------------- the formulas
def select_heads(iaf: torch.Tensor, rule: str = "below_mean", k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The best head and the heads to correct, per query row.

    ``iaf``: (B, H, Q) image attention focus. Returns ``best`` (B, 1, Q), ``h* = argmax_h IAF`` (the first on ties),
    and ``selected`` (B, H, Q) bool: ``"below_mean"``: IAF[h] < mean_h IAF; ``"bottom_k"``: the ``k`` heads of lowest
    IAF other than h* (all of them when fewer; ties broken by the lower head index); ``"all_but_best"``: every
    h != h*.
    """
    best = iaf.argmax(dim=1, keepdim=True)
    if rule == "below_mean":
        return best, iaf < iaf.mean(dim=1, keepdim=True)
    heads = torch.arange(iaf.shape[1], device=iaf.device)[None, :, None]
    if rule == "all_but_best":
        selected = heads != best
    elif rule == "bottom_k":
        # rank the heads other than h* (h* is moved to the top, so a tie into the bottom k cannot take a place)
        others = iaf.masked_fill(heads == best, math.inf)
        rank = others.argsort(dim=1, stable=True).argsort(dim=1)  # 0 = lowest IAF
        selected = (rank < k) & (heads != best)
    else:
        raise ValueError(f"unknown head selection rule {rule!r}; valid: below_mean, bottom_k, all_but_best")
    return best, selected


def fuse_heads(rows: torch.Tensor, best: torch.Tensor, corrected: torch.Tensor, gamma) -> torch.Tensor:
    """Eq. 4: ``a~[h] = (1 - gamma) a[h] + gamma a[h*]`` where ``corrected[h]``, else ``a[h]`` unchanged.

    ``rows`` (B, H, Q, K) post-softmax attention, ``best`` (B, 1, Q) the index h*, ``corrected`` (B, H, Q) bool,
    ``gamma`` a float or a 0-d tensor. Written as ``a + gamma * c * (a[h*] - a)`` so that uncorrected rows (and
    gamma = 0) are returned bit for bit.
    """
    B, H, Q, K = rows.shape
    target = torch.gather(rows, 1, best[..., None].expand(B, 1, Q, K))
    # lerp computes a + w (b - a) for |w| < 0.5 (so w = 0 returns a bit for bit) in one pass over the rows
    weight = gamma * corrected[..., None].to(rows.dtype)
    if not torch.is_tensor(weight) or weight.dtype != rows.dtype:
        weight = torch.as_tensor(weight, dtype=rows.dtype, device=rows.device)
    return torch.lerp(rows, target.expand(B, H, Q, K), weight)


def random_target(best: torch.Tensor, corrected: torch.Tensor, shift: torch.Tensor):
    """``fusion_target="random"``: the target head ``(h* + shift) mod H`` (``shift`` uniform in [1, H), so uniform
    among the heads other than h*) and the corrected heads without the target itself. ``best`` (B, 1, Q),
    ``corrected`` (B, H, Q), ``shift`` (B, 1, Q)."""
    H = corrected.shape[1]
    target = (best + shift) % H
    heads = torch.arange(H, device=corrected.device)[None, :, None]
    return target, corrected & (heads != target)


def causal_threshold(count, total, squares, best, cfg: DLeafConfig):
    """The causal threshold ``tau`` of a layer from the running statistics of earlier active positions (``count``,
    ``total``, ``squares``, ``best``, any matching shapes: one layer, or every watched layer at once) and ``ready``
    (at least ``warmup`` earlier positions). Shared by the one-row and the multi-row paths."""
    if cfg.threshold == "running":
        n = count.clamp(min=1)
        mean = total / n
        tau = mean + cfg.kappa * (squares / n - mean * mean).clamp(min=0).sqrt()
    else:
        tau = best + cfg.margin
    return tau, count >= cfg.warmup


def prefix_statistics(signal, active, count0, total0, squares0, best0):
    """Multi-row path: for each of a call's rows (``signal``, ``active``: (B, Qa), float64 signal), the running
    statistics of the same sample's earlier active rows (``count``, ``total``, ``squares``, ``best``, each (B, Qa)),
    starting from the state before the call (``count0`` ... ``best0``, (B, 1) views), which is then advanced in place
    past the call's active rows. Shared by D-LEAF and the ``threshold`` localizer."""
    act = active.to(torch.float64)
    s_act = torch.where(active, signal, torch.zeros_like(signal))
    count = count0 + torch.cumsum(act, 1) - act
    total = total0 + torch.cumsum(s_act, 1) - s_act
    squares = squares0 + torch.cumsum(s_act * s_act, 1) - s_act * s_act
    s_inf = torch.where(active, signal, torch.full_like(signal, math.inf))
    prev_best = torch.cat([torch.full_like(s_inf[:, :1], math.inf), torch.cummin(s_inf, 1).values[:, :-1]], 1)
    best = torch.minimum(best0, prev_best)
    with torch.no_grad():  # the state only feeds comparisons: no gradient
        count0 += act.sum(1, keepdim=True)
        total0 += s_act.sum(1, keepdim=True)
        squares0 += (s_act * s_act).sum(1, keepdim=True)
        torch.minimum(best0, s_inf.min(1, keepdim=True).values, out=best0)
    return count, total, squares, best


def flag_gate(active, ready, draw, cfg: DLeafConfig):
    """Where a layer may be flagged, before its signal is known: by ``cfg.localization``, ``active & ready``
    (``"threshold"``: flagged where the signal also exceeds ``tau``), ``active`` (``"everywhere"``) or
    ``active & (draw < random_rate)`` (``"random"``, ``draw`` uniform)."""
    if cfg.localization == "threshold":
        return active & ready
    if cfg.localization == "random":
        return active & (draw < cfg.random_rate)
    return active  # "everywhere"; a localizer of dleaf.methods.localizers then narrows it (DLeaf._gate)


def layer_flags(signal, gate, tau, cfg: DLeafConfig):
    """The flags of a layer: ``gate & (signal > tau)`` for ``localization="threshold"``, else ``gate``."""
    return gate & (signal > tau) if cfg.localization == "threshold" else gate


def one_row_step(rows, image_row, gate, tau, neg_inv_log, gamma, cfg: DLeafConfig, inplace: bool = False,
                 target_shift=None):
    """D-LEAF on one query row of one layer: the layer signal, the flag, IAF, the selected heads and the fused rows.

    ``rows`` (B, H, 1, K) post-softmax attention; ``image_row`` (B, 1, K) the image-key mask as numbers of ``rows``'
    dtype; ``gate`` (B, 1, 1) bool and ``tau`` (B, 1, 1) float64, the flag gate and the causal threshold of this layer
    (:func:`flag_gate`, :func:`causal_threshold`: they depend only on earlier positions, so the caller computes them
    for every layer at once); ``neg_inv_log`` (B, 1, 1) ``-1 / log |I|``; ``gamma`` a float or a 0-d tensor.
    ``inplace`` writes the fused rows into ``rows`` (no autograd). ``target_shift`` (B, 1, 1) integers in [1, H) for
    ``fusion_target="random"``: the target head is ``(h* + shift) mod H`` (:func:`random_target`). The same formulas
    as the multi-row path, written for one row with few operators: the image mass as one masked dot product (shared
    by the signal and IAF), the head-mixed profile as one batched product, the fusion as one ``lerp``. No host
    synchronisation and no branching on tensor values, so it can be compiled or captured.
    Returns ``(new_rows, signal, flag, iaf, corrected)``: ``signal`` (B, 1, 1) in ``rows``' dtype, ``flag``
    (B, 1, 1), ``iaf`` and ``corrected`` (B, H, 1).
    """
    B, H, _, K = rows.shape
    r = rows.view(B, H, K) if rows.is_contiguous() else rows.reshape(B, H, K)
    mass = (r * image_row).sum(dim=-1, keepdim=True)  # (B, H, 1): the masked sum, as the multi-row path has it
    safe = mass + (mass == 0)  # 1 where a head has no image mass (its masked row is all zeros)
    p = None
    if cfg.layer_signal == "liae":
        if cfg.liae_variant == "mixed":
            # the head-mixed profile mean_h (a_h restricted to I) / mass_h as one product (B, 1, H) @ (B, H, K)
            q = torch.bmm(torch.reciprocal(H * safe).transpose(1, 2), r) * image_row  # (B, 1, K)
            neg_entropy = torch.special.xlogy(q, q).sum(dim=-1, keepdim=True)  # (B, 1, 1)
        else:
            p = r * image_row / safe
            neg_entropy = torch.special.xlogy(p, p).sum(dim=-1, keepdim=True).mean(dim=1, keepdim=True)
        signal = neg_entropy * neg_inv_log if cfg.liae_normalize else -neg_entropy
    else:
        signal = -mass.mean(dim=1, keepdim=True)
    if cfg.iaf_variant == "mass":
        iaf = mass
    else:
        p = r * image_row / safe if p is None else p
        iaf = mass * (1.0 - torch.special.xlogy(p, p).sum(dim=-1, keepdim=True) * neg_inv_log)
    flag = layer_flags(signal, gate, tau, cfg)  # (B, 1, 1); a float32 signal compares with a float64 tau exactly

    best_head, selected = select_heads(iaf, cfg.head_selection, cfg.bottom_k)
    corrected = selected & flag  # (B, H, 1)
    if target_shift is not None:
        best_head, corrected = random_target(best_head, corrected, target_shift)
    target = torch.gather(r, 1, best_head.expand(B, 1, K))  # (B, 1, K), a copy
    weight = corrected * gamma
    if weight.dtype != rows.dtype:  # in the rows' precision (a float64 model keeps all of gamma's digits)
        weight = (corrected.to(rows.dtype) * gamma).to(rows.dtype)
    # lerp computes a + w (b - a) for |w| < 0.5, so w = 0 (uncorrected heads, gamma 0) returns a bit for bit
    if inplace:
        r.lerp_(target, weight)  # r shares rows' memory
        new_rows = rows
    else:
        new_rows = torch.lerp(r, target.expand(B, H, K), weight).view(B, H, 1, K)
    return new_rows, signal, flag, iaf, corrected


def one_row_attention(scores, mask, scaling: float, image_row, gate, tau, neg_inv_log, gamma,
                      cfg: DLeafConfig, target_shift=None, softcap=None):
    """The watched layer's work on one query row between the two attention products: scale, cap, mask and softmax
    the row's scores ``query @ key^T`` (B, H, 1, K) exactly as eager attention does
    (:func:`dleaf.engine.kernels.softmax_scores`), then :func:`one_row_step`. This is the region
    ``attach(..., compile=True)`` compiles: one call in place of the operators of both."""
    rows = softmax_scores(scores, mask, scaling, softcap=softcap)
    return one_row_step(rows, image_row, gate, tau, neg_inv_log, gamma, cfg, target_shift=target_shift)


@functools.cache
def compiled_one_row_attention():
    """:func:`one_row_attention` compiled once per process (``torch.compile``, dynamic shapes: the key length grows
    every step). The first call of each configuration compiles (seconds to tens of seconds on a CPU)."""
    return torch.compile(one_row_attention, dynamic=True)


# ---------------------------------------------------------------------------------------------------- the method
@register("random_target", "D-LEAF's flags, heads and gamma, fused toward a random head other than h* (null)",
          fixed={"fusion_target": "random"})
@register("random_layers", "D-LEAF with each eligible layer flagged at random with probability random_rate",
          fixed={"localization": "random"})
@register("no_localization", "D-LEAF fusing in every eligible layer at every position (no localization)",
          fixed={"localization": "everywhere"})
@register("dleaf_learned", "D-LEAF's fusion at the rows a fitted token-level hallucination detector flags "
          "(gamma 1; the shipped detector reads the organism; another model needs its own, detector=FILE)",
          fixed={"localization": "learned"}, defaults={"gamma": 1.0, "detector": "organism"})
@register("dleaf", "D-LEAF: flag layers by LIAE against a causal threshold, fuse weak heads toward the best head")
class DLeaf(Method):
    """D-LEAF's behaviour. Per sequence and batch row it keeps the running statistics of each watched layer's signal
    over earlier active positions (count, total, sum of squares, lowest value), from which each position's causal
    threshold follows; they move with the batch under beam search."""

    config_class = DLeafConfig
    native_localizations = LOCALIZATIONS

    def __init__(self, config: DLeafConfig, host):
        super().__init__(config, host)
        self._call = None  # the attention call being computed (for a localizer of dleaf.methods.localizers)
        self.stats: torch.Tensor | None = None
        self.layer_stats: list = []
        self.row_context: dict | None = None
        self.derived: dict = {}  # per-sequence values derived from the image positions (1 / log |I|, ...)
        self.generator: torch.Generator | None = None
        self.target_generator: torch.Generator | None = None
        if config.fusion_target == "random":
            self.target_generator = torch.Generator().manual_seed(config.seed)  # on the CPU: the same draws anywhere
        self.gamma_value = None

    # ------------------------------------------------------------------ state
    def begin(self, batch: int, device) -> None:
        L = self.host.num_layers
        # the running statistics per layer and sample: count, total, sum of squares, best (minimum) signal
        self.stats = torch.stack([torch.zeros(L, batch, 1, dtype=torch.float64, device=device)] * 3
                                 + [torch.full((L, batch, 1), math.inf, dtype=torch.float64, device=device)])
        # per layer, (count, total, squares, best) as (B, 1) views, made once per sequence (no indexing per step)
        self.layer_stats = [tuple(t.unbind(0)) for t in self.stats.unbind(1)]
        self.derived = {}
        self.row_context = None
        if self.config.localization == "random" and self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.config.seed)
        if self.localizer is not None:
            self.localizer.begin(batch, device)

    def before_forward(self, kwargs: dict, new_sequence: bool) -> None:
        self.row_context = None
        if self.localizer is not None:
            self.localizer.before_forward(kwargs, new_sequence)

    def end_forward(self) -> None:
        self._flush_row_signals()
        if self.localizer is not None:
            self.localizer.end_forward()

    def reorder(self, index) -> None:
        self.stats.copy_(self.stats.index_select(2, index))  # in place: the per-layer views stay valid
        self.derived = {}
        if self.localizer is not None:
            self.localizer.reorder(index)

    def rollback(self, length: int) -> bool:
        return False  # the running statistics of the removed positions cannot be taken out again

    def check_replay(self) -> None:
        if self.config.localization == "random" or self.config.fusion_target == "random":
            raise NotImplementedError(
                "generate(use_cache=False) recomputes every earlier position at each step, which would draw the "
                "random layers or targets again; use the default cache with localization='random' or "
                "fusion_target='random'")
        if self.localizer is not None:
            self.localizer.check_replay()

    def set_gamma(self, gamma) -> None:
        self.gamma_value = gamma

    def gamma(self):
        return self.gamma_value if self.gamma_value is not None else self.config.gamma

    def running_statistics(self) -> dict[str, torch.Tensor] | None:
        if self.stats is None:
            return None
        count, total, squares, best = self.stats[..., 0].unbind(0)
        return {"count": count, "total": total, "squares": squares, "best": best}

    def _inv_log_image(self, dtype) -> torch.Tensor:
        """1 / log |I| per sample (0 where |I| <= 1), shape (B, 1), cached per dtype for the sequence."""
        key = ("inv_log_image", dtype)
        if key not in self.derived:
            n = self.host.image.sum(dim=-1).to(dtype)
            big = n > 1
            safe = torch.where(big, n, torch.full_like(n, 2.0))
            self.derived[key] = torch.where(big, 1.0 / torch.log(safe), torch.zeros_like(n))[:, None]
        return self.derived[key]

    def _neg_inv_log_image(self, dtype) -> torch.Tensor:
        """``-1 / log |I|`` shaped (B, 1, 1), cached per dtype for the sequence."""
        key = ("neg_inv_log_image", dtype)
        if key not in self.derived:
            self.derived[key] = -self._inv_log_image(dtype)[:, :, None]
        return self.derived[key]

    # ------------------------------------------------------------------ attention
    def attend(self, call):
        module, first, active = call.module, call.first, call.active
        self._call = call
        if (self.host.compile and call.query.shape[2] == 1 and not (module.training and call.dropout)
                and call.sinks is None and not (self.localizer is not None and self.localizer.needs_rows)):
            # decoding step (or the prefill's last row with unwatched="sdpa"): the products stay eager, the softmax
            # and D-LEAF between them run as one compiled region
            weights, record = self._one_row_compiled(call)
            call.record(record)
            return call.finish(torch.matmul(weights, call.values()), weights)
        weights = call.weights()
        rows = weights if first == 0 else weights[:, :, first:]  # (B, H, Qa, K)
        if rows.shape[2] == 1:
            new_rows, record = self._one_row(call.layer, rows, active)
        else:
            new_rows, record = self._rows(call.layer, rows, call.image, active)
        call.record(record)
        if first == 0:
            weights = new_rows
        elif torch.is_grad_enabled():
            weights = torch.cat([weights[:, :, :first], new_rows], dim=2)
        else:  # no autograd: write the corrected rows in place instead of copying the whole (B, H, Q, K) matrix
            weights[:, :, first:] = new_rows
        return call.finish(torch.matmul(weights, call.values()), weights)

    def _one_row(self, layer, rows, active):
        """:meth:`_rows` for a single active query row (every decoding step, and the prefill's last row); see
        :func:`one_row_step`. The thresholds of every watched layer come from :meth:`_row_context`, made once per
        forward call, and the running statistics are updated for every layer at once after the forward call
        (:meth:`_flush_row_signals`)."""
        *args, shift = self._one_row_inputs(layer, active, rows.shape[-1], rows.dtype, rows)
        out = one_row_step(rows, *args, self.config, inplace=not torch.is_grad_enabled(), target_shift=shift)
        return out[0], self._one_row_done(layer, *out[1:])

    def _one_row_compiled(self, call):
        """``compile=True``: the softmax of one query row's scores and :func:`one_row_step` as one compiled region
        (:func:`one_row_attention`)."""
        scores = call.scores()
        *args, shift = self._one_row_inputs(call.layer, call.active, scores.shape[-1], scores.dtype)
        out = compiled_one_row_attention()(scores, call.attention_mask, call.scaling, *args, self.config, shift,
                                           call.softcap)
        return out[0], self._one_row_done(call.layer, *out[1:])

    def _one_row_inputs(self, layer, active, k_len, dtype, rows=None):
        """What :func:`one_row_step` needs besides the rows: image mask, gate, threshold, -1/log|I|, gamma and the
        random target's draw (None unless ``fusion_target="random"``)."""
        cfg = self.config
        ctx = self._row_context(active)
        i = layer - ctx["first_layer"]
        gate = ctx["gate"][i]
        if cfg.localization == "random":
            draw = torch.rand(active.shape, generator=self.generator, device=active.device)
            gate = flag_gate(active, None, draw, cfg)[:, :, None]
        elif self.localizer is not None:
            gate = self._gate(active, rows)[:, :, None]
        return (self.host.image_row(k_len, dtype), gate, ctx["tau"][i], self._neg_inv_log_image(dtype), self.gamma(),
                self._target_shift(active.shape[0], 1, active.device))

    def _one_row_done(self, layer, signal, flag, iaf, corrected):
        """Keep the layer's signal for the running statistics; the trace record (None without a trace)."""
        ctx = self.row_context
        ctx["signals"][layer] = signal
        if self.host.trace is None:
            return None
        i = layer - ctx["first_layer"]
        tau = torch.where(ctx["ready"][i], ctx["tau"][i], math.nan).view(-1, 1)
        return {"signal": signal.to(torch.float64).view(-1, 1), "tau": tau, "flag": flag.view(-1, 1), "iaf": iaf,
                "corrected": corrected}

    def _row_context(self, active: torch.Tensor) -> dict:
        """Per forward call of the one-row path: every watched layer's causal threshold and flag gate, computed at
        once from the running statistics (they depend only on earlier positions), as per-layer views."""
        ctx = self.row_context
        if ctx is None:
            cfg = self.config
            watched = self.host.watched
            lo, hi = min(watched), max(watched) + 1
            count, total, squares, best = self.stats[:, lo:hi, :, :, None].unbind(0)  # each (Lw, B, 1, 1)
            tau, ready = causal_threshold(count, total, squares, best, cfg)
            active = active[:, :, None]  # (B, 1, 1)
            gate = flag_gate(active, ready, None, cfg) if cfg.localization != "random" else ready
            gate = gate.expand(ready.shape)  # "everywhere": the active rows, the same for every layer
            ctx = {"first_layer": lo, "last_layer": hi, "active": active, "tau": tau.unbind(0),
                   "ready": ready.unbind(0), "gate": gate.unbind(0), "signals": {}}
            self.row_context = ctx
        return ctx

    def _flush_row_signals(self) -> None:
        """After a forward call of the one-row path: fold every watched layer's signal into its running statistics
        (count, total, sum of squares, best), all layers in one set of operations."""
        ctx, self.row_context = self.row_context, None
        if ctx is None or not ctx["signals"]:
            return
        lo, hi, active = ctx["first_layer"], ctx["last_layer"], ctx["active"]
        if sorted(ctx["signals"]) != list(range(lo, hi)):
            raise RuntimeError(f"D-LEAF saw layers {sorted(ctx['signals'])} of the watched [{lo}, {hi}) in one forward "
                               "call; every watched layer must run once per call")
        signal = torch.stack([ctx["signals"][layer] for layer in range(lo, hi)]).to(torch.float64)[..., 0]
        active = active[:, :, 0]  # (B, 1), against the (Lw, B, 1) signals and statistics
        count, total, squares, best = self.stats[:, lo:hi].unbind(0)
        with torch.no_grad():  # the state only feeds comparisons: no gradient
            s_act = torch.where(active, signal.detach(), 0.0)
            count.add_(active)
            total.add_(s_act)
            squares.addcmul_(s_act, s_act)
            torch.minimum(best, torch.where(active, signal.detach(), math.inf), out=best)

    def _rows(self, layer, rows, image, active):
        """Flag, rank and fuse the active rows of one layer; update the running state. Returns the new rows and the
        trace record of this layer."""
        cfg = self.config
        B, H, Qa, K = rows.shape
        if cfg.layer_signal == "liae":
            signal = stats.layer_entropy(rows, image, cfg.liae_variant, cfg.liae_normalize, check=False)
        else:
            signal = -stats.image_mass(rows, image, check=False).mean(dim=1)
        iaf = stats.head_focus(rows, image, cfg.iaf_variant, check=False)  # (B, H, Qa)
        signal = signal.to(torch.float64)  # (B, Qa)

        # the running statistics of each row's earlier rows; the state advances past this call's rows
        count, total, squares, best = prefix_statistics(signal, active, *self.layer_stats[layer])
        draw = None
        if cfg.localization == "random":
            draw = torch.rand(active.shape, generator=self.generator, device=active.device)
        tau, ready = causal_threshold(count, total, squares, best, cfg)
        gate = flag_gate(active, ready, draw, cfg) if self.localizer is None else self._gate(active, rows)
        flag = layer_flags(signal, gate, tau, cfg)
        tau = torch.where(ready, tau, torch.full_like(tau, math.nan))

        best_head, selected = select_heads(iaf, cfg.head_selection, cfg.bottom_k)
        corrected = selected & flag[:, None, :]
        shift = self._target_shift(B, Qa, rows.device)
        if shift is not None:  # fusion_target="random"
            best_head, corrected = random_target(best_head, corrected, shift)
        new_rows = fuse_heads(rows, best_head, corrected, self.gamma())
        record = {"signal": signal, "tau": tau, "flag": flag, "iaf": iaf, "corrected": corrected}
        return new_rows, record

    def _gate(self, active, rows):
        """The rows a localizer of :mod:`dleaf.methods.localizers` flags in the current call's layer, (B, Qa)."""
        return self.localizer.flags(self._call, rows) & active

    def _target_shift(self, b: int, q: int, device) -> torch.Tensor | None:
        """``fusion_target="random"``: a (B, 1, Q) draw uniform in [1, H) per sample, row and layer; else None."""
        if self.target_generator is None or self.host.num_heads < 2:
            return None
        shift = torch.randint(1, self.host.num_heads, (b, 1, q), generator=self.target_generator)
        return shift.to(device)
