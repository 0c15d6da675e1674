"""D-LEAF as a DPO step (THEORY.md points 2 and 3): its DPO loss and reward accuracy on preference pairs, the loss
over a gamma sweep, and the slope of that loss at gamma = 0 by autograd, checked by a finite difference.

With ``r_D(x, y) = beta * log pi_D(y | x) / pi_0(y | x)`` (sums over reply tokens, :mod:`dpo_link.reward_shift`),
the DPO loss of D-LEAF on pairs (x, y_w, y_l) is ``L(gamma) = mean -log sigmoid(r_D(x, y_w) - r_D(x, y_l))``;
``L(0) = log 2`` exactly (at gamma 0 the engine returns the plain model bit for bit). D-LEAF moves in DPO's direction
on the pairs when ``L(gamma) < log 2``; its reward accuracy is the share of pairs with ``r_D(y_w) > r_D(y_l)``.

The slope: near gamma = 0 the flagged (position, layer, head) sites are those of the uncorrected model, so
``dL/dgamma`` at 0 is the derivative with the flags held fixed; the engine's ``Intervention.set_gamma`` makes gamma a
differentiable 0-d tensor that every corrected row ``a + gamma (a[h*] - a)`` uses, and one backward pass gives it.
Negative means D-LEAF's correction is a DPO descent direction on these pairs. The central difference
``(L(h) - L(-h)) / 2h`` (gamma_override may be negative) checks it; it agrees as long as no flag flips between
-h and h, which holds for small h except on a measure-zero set of threshold ties.

Every function takes the base model, or a ``peft.PeftModel`` whose adapter is then disabled (pi_0 and pi_D are
both the model without the adapter), and a list of collated preference batches
(:func:`dpo_link.reward_shift.pair_batches`: chosen rows first, rejected second).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import binomtest

from dleaf.config import DLeafConfig

from .reward_shift import _check_beta, score

LOG2 = math.log(2.0)


def base_model_of(model):
    """``(transformers model, context manager factory that turns the adapter off)`` for a plain or a PEFT model."""
    if hasattr(model, "disable_adapter") and hasattr(model, "get_base_model"):
        return model.get_base_model(), model.disable_adapter
    return model, contextlib.nullcontext


def dpo_loss(chosen: np.ndarray | torch.Tensor, rejected: np.ndarray | torch.Tensor) -> dict:
    """DPO statistics of implicit rewards on pairs: ``loss`` = mean ``-log sigmoid(r_w - r_l)`` (log 2 when every
    margin is 0), ``accuracy`` = share of pairs with ``r_w > r_l`` (TRL's ``rewards/accuracies``; ties count as
    wrong), ``ties`` = share with ``r_w == r_l``, ``accuracy_p_value`` = two-sided sign test (binomial, p = 1/2) of
    the pairs with a nonzero margin (NaN when every margin is 0), ``margin`` = mean ``r_w - r_l``, and ``n`` pairs.
    Computed in float64. Mismatched lengths or no pair are errors."""
    c = torch.as_tensor(np.asarray(chosen, dtype=np.float64))
    r = torch.as_tensor(np.asarray(rejected, dtype=np.float64))
    if c.shape != r.shape or c.dim() != 1:
        raise ValueError(f"chosen and rejected rewards must be 1-d of the same length, got shapes {tuple(c.shape)} "
                         f"and {tuple(r.shape)}")
    if c.numel() == 0:
        raise ValueError("no pairs: the DPO loss of an empty preference set is undefined")
    m = c - r
    wins, decided = int((m > 0).sum()), int((m != 0).sum())
    sign_p = float(binomtest(wins, decided, 0.5).pvalue) if decided else float("nan")
    return {"n": int(c.numel()), "loss": float(-torch.nn.functional.logsigmoid(m).mean()),
            "accuracy": float((m > 0).double().mean()), "ties": float((m == 0).double().mean()),
            "accuracy_p_value": sign_p, "margin": float(m.mean()), "chosen": float(c.mean()),
            "rejected": float(r.mean())}


def _split(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if seq.shape[0] % 2:
        raise ValueError(f"a preference batch has an even number of rows (chosen then rejected), got {seq.shape[0]}")
    return seq.chunk(2)


def _reference(model, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [score(model, b, DLeafConfig(gamma=0.0)).sequence() for b in batches]


def _batches(batches) -> list[dict]:
    out = [b[0] if isinstance(b, tuple) else b for b in batches]
    if not out:
        raise ValueError("no preference batches given")
    return out


def loss_curve(model, batches: Sequence, beta: float, config: DLeafConfig, gammas: Sequence[float]) -> list[dict]:
    """:func:`dpo_loss` of D-LEAF (``config`` with each gamma of ``gammas``) on the pairs, one dict per gamma with
    ``gamma`` added. Gammas outside [0, 1] go through ``gamma_override`` (the fusion extrapolated)."""
    _check_beta(beta)
    base, off = base_model_of(model)
    batches = _batches(batches)
    was_training = base.training
    base.eval()
    out = []
    try:
        with off():
            ref = _reference(base, batches)
            for g in gammas:
                g = float(g)
                inside = 0.0 <= g <= 1.0
                cfg = dataclasses.replace(config, gamma=g if inside else config.gamma)
                override = None if inside else torch.tensor(g, dtype=torch.float64)
                chosen, rejected = [], []
                with torch.no_grad():
                    for b, r0 in zip(batches, ref):
                        rew = beta * (score(base, b, cfg, gamma_override=override).sequence() - r0)
                        c, r = _split(rew)
                        chosen.append(c), rejected.append(r)
                stats = dpo_loss(torch.cat(chosen), torch.cat(rejected))
                out.append({"gamma": g, **stats})
    finally:
        base.train(was_training)
    return out


def _loss_at(base, batches, ref, beta, config, gamma: torch.Tensor, n_pairs: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for b, r0 in zip(batches, ref):
        rew = beta * (score(base, b, config, gamma_override=gamma).sequence() - r0)
        c, r = _split(rew)
        part = -torch.nn.functional.logsigmoid(c - r).sum() / n_pairs
        if gamma.requires_grad:
            part.backward()  # per batch, so that only one batch's graph is held at a time
            total = total + part.detach()
        else:
            total = total + part
    return total


def loss_slope(model, batches: Sequence, beta: float, config: DLeafConfig) -> dict:
    """``dL/dgamma`` at gamma = 0 by autograd (flags fixed by the uncorrected model), with ``L(0)`` (log 2)."""
    _check_beta(beta)
    base, off = base_model_of(model)
    batches = _batches(batches)
    was_training = base.training
    base.eval()
    n_pairs = sum(int(b["input_ids"].shape[0]) // 2 for b in batches)
    gamma = torch.zeros((), dtype=torch.float64, requires_grad=True)
    try:
        with off():
            ref = _reference(base, batches)
            with torch.enable_grad():
                value = _loss_at(base, batches, ref, beta, config, gamma, n_pairs)
    finally:
        base.train(was_training)
    slope = float(gamma.grad) if gamma.grad is not None else 0.0
    return {"slope": slope, "loss_at_0": float(value), "n": n_pairs}


def finite_difference_slope(model, batches: Sequence, beta: float, config: DLeafConfig, h: float = 1e-2) -> dict:
    """The central difference ``(L(h) - L(-h)) / 2h`` of D-LEAF's DPO loss around gamma = 0, and the one-sided
    ``(L(h) - L(0)) / h``."""
    _check_beta(beta)
    if not h > 0:
        raise ValueError(f"the finite-difference step h must be positive, got {h}")
    base, off = base_model_of(model)
    batches = _batches(batches)
    was_training = base.training
    base.eval()
    n_pairs = sum(int(b["input_ids"].shape[0]) // 2 for b in batches)
    try:
        with off(), torch.no_grad():
            ref = _reference(base, batches)
            lp = float(_loss_at(base, batches, ref, beta, config, torch.tensor(h, dtype=torch.float64), n_pairs))
            lm = float(_loss_at(base, batches, ref, beta, config, torch.tensor(-h, dtype=torch.float64), n_pairs))
            l0 = float(_loss_at(base, batches, ref, beta, config, torch.tensor(0.0, dtype=torch.float64), n_pairs))
    finally:
        base.train(was_training)
    return {"h": h, "central": (lp - lm) / (2 * h), "forward": (lp - l0) / h, "loss_plus": lp, "loss_minus": lm,
            "loss_at_0": l0}


def sweep_slope(curve: list[dict]) -> float:
    """The forward difference of a :func:`loss_curve` between its two smallest non-negative gammas (one of them 0)."""
    pts = sorted((c["gamma"], c["loss"]) for c in curve if c["gamma"] >= 0)
    if len(pts) < 2 or pts[0][0] != 0.0:
        return float("nan")
    (g0, l0), (g1, l1) = pts[0], pts[1]
    return (l1 - l0) / (g1 - g0)
