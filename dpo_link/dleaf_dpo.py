"""D-LEAF as a DPO step: its DPO loss and reward accuracy on preference pairs, the loss over a gamma sweep, and the
slope of that loss at gamma = 0 by autograd, checked by a finite difference.

With D-LEAF's implicit reward ``r_D(x, y) = beta * log pi_D(y | x) / pi_0(y | x)`` (sums over reply tokens,
:mod:`dpo_link.rewards`), the DPO loss of D-LEAF on pairs (x, y_w, y_l) is
``L(gamma) = mean -log sigmoid(r_D(x, y_w) - r_D(x, y_l))``; ``L(0) = log 2`` exactly (at gamma 0 the engine
returns the plain model bit for bit). D-LEAF moves in DPO's direction on the pairs when ``L(gamma) < log 2``; its
reward accuracy is the share of pairs with ``r_D(y_w) > r_D(y_l)``.

The slope: D-LEAF moves each corrected attention row ``a`` of a flagged layer to ``a + gamma (a[h*] - a)``. Near
gamma = 0 the flagged (position, layer, head) sites are those of the uncorrected model, so ``dL/dgamma`` at 0 is the
derivative with the flags held fixed: :func:`dpo_link.rewards.score` passes gamma to the engine as a differentiable
0-d tensor and one backward pass gives it. Negative means D-LEAF's correction is a DPO descent direction on these
pairs. The central difference ``(L(h) - L(-h)) / 2h`` (gamma may be negative: the fusion extrapolated) checks it;
it agrees as long as no flag flips between -h and h, which holds for small h except on threshold ties.

Every function takes the base model, or a ``peft.PeftModel`` whose adapter is then disabled (pi_0 and pi_D are both
the model without the adapter), and a list of collated preference batches (:func:`dpo_link.collate.pair_batches`:
chosen rows first, rejected second).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from dleaf.config import DLeafConfig

from .rewards import check_beta, dpo_loss, dpo_losses, implicit_rewards, score, split_adapter, split_pairs

LOG2 = math.log(2.0)


def _reference(model, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [score(model, b, DLeafConfig(gamma=0.0)).sequence() for b in batches]


def _batches(batches) -> list[dict]:
    out = [b[0] if isinstance(b, tuple) else b for b in batches]
    if not out:
        raise ValueError("no preference batches given")
    return out


def _pair_rewards(base, batch, reference, beta, config, gamma) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) r_D of one batch: D-LEAF at ``config``, its fusion strength replaced by ``gamma`` (a 0-d
    tensor) unless that is None."""
    return split_pairs(implicit_rewards(score(base, batch, config, gamma=gamma).sequence(), reference, beta))


def loss_curve(model, batches: Sequence, beta: float, config: DLeafConfig, gammas: Sequence[float]) -> list[dict]:
    """:func:`dpo_link.rewards.dpo_loss` of D-LEAF (``config`` with each gamma of ``gammas``; values outside [0, 1]
    extrapolate the fusion) on the pairs, one dict per gamma with ``gamma`` added."""
    check_beta(beta)
    base, reference = split_adapter(model)
    batches = _batches(batches)
    was_training = base.training
    base.eval()
    out = []
    try:
        with reference(), torch.no_grad():
            ref = _reference(base, batches)
            for g in gammas:
                g = float(g)
                inside = 0.0 <= g <= 1.0  # a configured gamma; outside [0, 1] the engine takes it as a tensor
                cfg = dataclasses.replace(config, gamma=g if inside else config.gamma)
                override = None if inside else torch.tensor(g, dtype=torch.float64)
                chosen, rejected = zip(*(_pair_rewards(base, b, r0, beta, cfg, override)
                                         for b, r0 in zip(batches, ref)))
                out.append({"gamma": g, **dpo_loss(torch.cat(chosen), torch.cat(rejected))})
    finally:
        base.train(was_training)
    return out


def _loss_at(base, batches, ref, beta, config, gamma: torch.Tensor, n_pairs: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for b, r0 in zip(batches, ref):
        chosen, rejected = _pair_rewards(base, b, r0, beta, config, gamma)
        part = dpo_losses(chosen, rejected).sum() / n_pairs
        if gamma.requires_grad:
            part.backward()  # per batch, so that only one batch's graph is held at a time
            total = total + part.detach()
        else:
            total = total + part
    return total


def _n_pairs(batches) -> int:
    return sum(int(b["input_ids"].shape[0]) // 2 for b in batches)


def loss_slope(model, batches: Sequence, beta: float, config: DLeafConfig) -> dict:
    """``dL/dgamma`` at gamma = 0 by autograd (flags fixed by the uncorrected model), with ``L(0)`` (log 2)."""
    check_beta(beta)
    base, reference = split_adapter(model)
    batches = _batches(batches)
    was_training = base.training
    base.eval()
    gamma = torch.zeros((), dtype=torch.float64, requires_grad=True)
    try:
        with reference():
            ref = _reference(base, batches)
            with torch.enable_grad():
                value = _loss_at(base, batches, ref, beta, config, gamma, _n_pairs(batches))
    finally:
        base.train(was_training)
    slope = float(gamma.grad) if gamma.grad is not None else 0.0
    return {"slope": slope, "loss_at_0": float(value), "n": _n_pairs(batches)}


def finite_difference_slope(model, batches: Sequence, beta: float, config: DLeafConfig, h: float = 1e-2) -> dict:
    """The central difference ``(L(h) - L(-h)) / 2h`` of D-LEAF's DPO loss around gamma = 0, and the one-sided
    ``(L(h) - L(0)) / h``."""
    check_beta(beta)
    if not h > 0:
        raise ValueError(f"the finite-difference step h must be positive, got {h}")
    base, reference = split_adapter(model)
    batches = _batches(batches)
    was_training = base.training
    base.eval()
    n = _n_pairs(batches)
    try:
        with reference(), torch.no_grad():
            ref = _reference(base, batches)
            loss = {g: float(_loss_at(base, batches, ref, beta, config, torch.tensor(g, dtype=torch.float64), n))
                    for g in (h, -h, 0.0)}
    finally:
        base.train(was_training)
    lp, lm, l0 = loss[h], loss[-h], loss[0.0]
    return {"h": h, "central": (lp - lm) / (2 * h), "forward": (lp - l0) / h, "loss_plus": lp, "loss_minus": lm,
            "loss_at_0": l0}


def sweep_slope(curve: list[dict]) -> float:
    """The forward difference of a :func:`loss_curve` between its two smallest non-negative gammas (one of them 0)."""
    pts = sorted((c["gamma"], c["loss"]) for c in curve if c["gamma"] >= 0)
    if len(pts) < 2 or pts[0][0] != 0.0:
        return float("nan")
    (g0, l0), (g1, l1) = pts[0], pts[1]
    return (l1 - l0) / (g1 - g0)


def is_descent_step(loss_stats: dict, slope: float, level: float = 0.05) -> bool:
    """Whether D-LEAF is a DPO descent step on the pairs: the slope of its DPO loss at gamma 0 is negative, its loss
    (:func:`dpo_link.rewards.dpo_loss` at its gamma) is below log 2, and its reward accuracy is above 1/2 with a
    sign-test p-value below ``level``."""
    return bool(slope < 0 and loss_stats["loss"] < LOG2 and loss_stats["accuracy"] > 0.5
                and loss_stats["accuracy_p_value"] < level)
