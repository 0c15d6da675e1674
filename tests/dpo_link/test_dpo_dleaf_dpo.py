"""dpo_link.dleaf_dpo: D-LEAF's DPO loss over gamma and its slope at gamma 0, each against an independent
computation (plain forward passes with D-LEAF attached, float64 log-softmax, the loss written out by hand)."""

import math

import numpy as np
import pytest
import torch

from dleaf import engine
from dleaf.config import DLeafConfig
from dpo_link import dleaf_dpo
from dpo_link.collate import pair_batches

BETA = 0.5  # not 1, so that beta and beta squared differ


def sequence_logps(model, batch, config=None, gamma=None):
    """Per row, sum over the reply's tokens of log p(y_t | x, y_<t) as step-by-step decoding sees them: each row
    alone, its reply forced one token at a time through ``generate``'s cache, with ``config`` attached (its strength
    replaced by the tensor ``gamma`` when given) or plain; float64 log-softmax of the raw logits."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][b]
        n = int(batch["attention_mask"][b].sum())
        start = int(batch["completion_mask"][b].nonzero()[0])
        reply = ids[start:n].tolist()
        iv = engine.attach(model, config) if config is not None else None
        try:
            if gamma is not None:
                iv.set_gamma(torch.tensor(gamma, dtype=torch.float64))
            with torch.no_grad():
                gen = model.generate(input_ids=ids[None, :start], attention_mask=torch.ones(1, start, dtype=torch.long),
                                     pixel_values=batch["pixel_values"][b:b + 1], max_new_tokens=len(reply),
                                     min_new_tokens=len(reply), do_sample=False, return_dict_in_generate=True,
                                     output_logits=True,
                                     prefix_allowed_tokens_fn=lambda _, sofar: [reply[sofar.shape[0] - start]])
        finally:
            if iv is not None:
                iv.detach()
        out.append(sum(float(torch.log_softmax(lg[0].double(), -1)[t]) for lg, t in zip(gen.logits, reply)))
    return torch.tensor(out, dtype=torch.float64)


_PLAIN = {}


def hand_loss(model, batches, beta, config, gamma=None):
    """mean over pairs of -log sigmoid(r_D(chosen) - r_D(rejected)), chosen rows first in each batch."""
    losses = []
    for b in batches:
        key = (id(model), id(b))
        if key not in _PLAIN:
            _PLAIN[key] = sequence_logps(model, b)
        r = beta * (sequence_logps(model, b, config, gamma) - _PLAIN[key])
        n = r.shape[0] // 2
        for c, j in zip(r[:n].tolist(), r[n:].tolist()):
            losses.append(math.log1p(math.exp(-(c - j))))
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def setup(processor, rows, make_peft):
    model = make_peft(processor, peaky=True, double=True)
    batches = [dict(b, pixel_values=b["pixel_values"].double()) for b, _ in pair_batches(rows[:4], processor, 2)]
    return model, batches


@pytest.mark.parametrize("kappa", [0.0, 1.0])
def test_autograd_slope_against_an_independent_finite_difference(setup, kappa):
    model, batches = setup
    cfg = DLeafConfig(kappa=kappa)
    slope = dleaf_dpo.loss_slope(model, batches, BETA, cfg)
    assert slope["loss_at_0"] == math.log(2) and slope["n"] == 4
    h = 1e-2
    with model.disable_adapter():
        base = model.get_base_model()
        independent = (hand_loss(base, batches, BETA, cfg, h) - hand_loss(base, batches, BETA, cfg, -h)) / (2 * h)
    assert abs(independent) > 1e-4
    assert slope["slope"] == pytest.approx(independent, rel=0.02)
    fd = dleaf_dpo.finite_difference_slope(model, batches, BETA, cfg, h=h)
    assert fd["central"] == pytest.approx(independent, rel=0.02)
    assert fd["loss_at_0"] == math.log(2)


def test_loss_curve_against_an_independent_loss(setup):
    model, batches = setup
    cfg = DLeafConfig(kappa=0.0)
    curve = dleaf_dpo.loss_curve(model, batches, BETA, cfg, [-0.1, 0.0, 0.3, 1.0])
    assert [c["gamma"] for c in curve] == [-0.1, 0.0, 0.3, 1.0]
    assert curve[1]["loss"] == math.log(2) and curve[1]["ties"] == 1.0
    with model.disable_adapter():
        base = model.get_base_model()
        expected = {0.3: hand_loss(base, batches, BETA, DLeafConfig(kappa=0.0, gamma=0.3)),
                    1.0: hand_loss(base, batches, BETA, DLeafConfig(kappa=0.0, gamma=1.0)),
                    -0.1: hand_loss(base, batches, BETA, cfg, -0.1)}
    for c in curve:
        if c["gamma"] != 0.0:
            # the engine's log-softmax is float32: its rounding over a reply moves the loss by a few 1e-7
            assert c["loss"] == pytest.approx(expected[c["gamma"]], abs=1e-6), c["gamma"]
            assert abs(c["loss"] - math.log(2)) > 2e-5
    assert dleaf_dpo.sweep_slope(curve) == pytest.approx((curve[2]["loss"] - math.log(2)) / 0.3)


def test_bad_arguments(setup):
    model, batches = setup
    with pytest.raises(ValueError, match="no preference batches"):
        dleaf_dpo.loss_curve(model, [], BETA, DLeafConfig(), [0.0])
    with pytest.raises(ValueError, match="beta must be a positive"):
        dleaf_dpo.loss_slope(model, batches, -1.0, DLeafConfig())
    with pytest.raises(ValueError, match="step h must be positive"):
        dleaf_dpo.finite_difference_slope(model, batches, BETA, DLeafConfig(), h=0.0)
    assert math.isnan(dleaf_dpo.sweep_slope([{"gamma": 0.5, "loss": 0.7}]))
