"""dpo_link.dleaf_dpo: D-LEAF's DPO loss over gamma and its slope at gamma 0, each against an independent
computation (plain forward passes with D-LEAF attached, float64 log-softmax, the loss written out by hand).

The loss is discontinuous where a D-LEAF decision flips (a layer's signal crossing its running threshold, a head's
IAF crossing the mean, two heads trading h*), so each comparison first checks that every decision it relies on is
taken the same way at each gamma it uses and along both paths (one-pass scoring, step-by-step decoding), each by a
margin far above rounding (:mod:`margins`): the fixture is built away from the discontinuities, and a fixture on a
tie fails as such (see the last test)."""

import math

import numpy as np
import pytest
import torch

import dleaf.engine.scoring as engine_scoring
from dleaf import engine
from dleaf.config import DLeafConfig
from dpo_link import dleaf_dpo
from dpo_link.collate import pair_batches
from dpo_link.rewards import score
from margins import FLAG_MARGIN, MarginTooSmall, assert_margin, assert_same_decisions, decisions, flags_of

BETA = 0.5  # not 1, so that beta and beta squared differ
H = 1e-2  # the finite-difference step
#: the query and key projections of the language model are scaled by this on top of ``peaky``'s 4: attention this
#: sharp spreads the layer signals, so that no decision the tests rely on lies within FLAG_MARGIN of its tie at any
#: gamma they use (with ``peaky`` alone the 388 decisive flags of a run have signals within 1e-3 of each other and
#: the closest lies 2e-6 from its threshold; sharpened, the closest flag lies 1.1e-4 and the closest head choice
#: 5e-5 from a tie)
SHARPEN = 4.0


def decisive_columns(batch):
    """Per row, the columns whose query rows predict a reply token (the last prompt token to the last but one reply
    token): the flags there decide the reply's log-probabilities."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        start = int(batch["completion_mask"][b].nonzero()[0])
        out.append(set(range(start - 1, int(batch["attention_mask"][b].sum()) - 1)))
    return out


def sequence_logps(model, batch, config=None, gamma=None, flags=None):
    """Per row, sum over the reply's tokens of log p(y_t | x, y_<t) as step-by-step decoding sees them: each row
    alone, its reply forced one token at a time through ``generate``'s cache, with ``config`` attached (its strength
    replaced by the tensor ``gamma`` when given) or plain; float64 log-softmax of the raw logits. ``flags``, a dict,
    receives D-LEAF's decisions (:func:`margins.decisions`: flags and head choices, keyed by row) at the
    reply's positions."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][b]
        n = int(batch["attention_mask"][b].sum())
        start = int(batch["completion_mask"][b].nonzero()[0])
        reply = ids[start:n].tolist()
        iv = engine.attach(model, config, trace=flags is not None) if config is not None else None
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
        if flags is not None:
            flags.update(decisions(iv.trace, [set(range(start - 1, n - 1))], sample=[b]))
        out.append(sum(float(torch.log_softmax(lg[0].double(), -1)[t]) for lg, t in zip(gen.logits, reply)))
    return torch.tensor(out, dtype=torch.float64)


_PLAIN = {}


def hand_loss(model, batches, beta, config, gamma=None, flags=None):
    """mean over pairs of -log sigmoid(r_D(chosen) - r_D(rejected)), chosen rows first in each batch. ``flags``, a
    dict, receives the step-by-step decisions keyed by (batch, row, column, layer, ...)."""
    losses = []
    for i, b in enumerate(batches):
        key = (id(model), id(b))
        if key not in _PLAIN:
            _PLAIN[key] = sequence_logps(model, b)
        seen = {} if flags is not None else None
        r = beta * (sequence_logps(model, b, config, gamma, seen) - _PLAIN[key])
        if flags is not None:
            flags.update({(i, *k): v for k, v in seen.items()})
        n = r.shape[0] // 2
        for c, j in zip(r[:n].tolist(), r[n:].tolist()):
            losses.append(math.log1p(math.exp(-(c - j))))
    return float(np.mean(losses))


def one_pass_decisions(base, batches, config, gamma=None):
    """The decisions (flags and head choices) that one-pass scoring (:func:`dpo_link.rewards.score`, as every
    function of dleaf_dpo scores) takes at the reply's positions, keyed by (batch, row, column, layer, ...);
    ``gamma`` replaces the configured strength (as a float64 tensor) when given."""
    flags = {}
    for i, b in enumerate(batches):
        ivs = []

        def traced(model, cfg, trace):
            ivs.append(engine.attach(model, cfg, trace=True))
            return ivs[-1]

        with torch.no_grad():
            score(base, b, config, intervention_factory=traced,
                  gamma=None if gamma is None else torch.tensor(gamma, dtype=torch.float64))
        flags.update({(i, *k): v for k, v in decisions(ivs[0].trace, decisive_columns(b)).items()})
    return flags


def check_decisions(runs: dict) -> float:
    """Every decision of every run (name -> :func:`one_pass_decisions` or step-by-step decisions) taken by at least
    FLAG_MARGIN, and the same way in all of them, some layers flagged and some not; the smallest margin."""
    margin = min(assert_margin(decided, FLAG_MARGIN, f"D-LEAF's decisions in {name}") for name, decided in runs.items())
    assert_same_decisions(runs)
    for name, decided in runs.items():
        flags = [f for _, _, f in flags_of(decided).values()]
        assert any(flags) and not all(flags), name
    return margin


@pytest.fixture()
def float64_logprobs(monkeypatch):
    """The engine's teacher-forced log-probabilities in float64 (they are float32: on a reply of a few dozen tokens
    their rounding moves the loss by up to 4e-7, which a finite difference over 2h = 0.02 turns into 2e-5 on a slope
    of 5e-4 to 2e-3, the size of the tolerance, with a sign and size that depend on the CPU's log-softmax kernel: 3%
    with AVX-512, 1% with ATEN_CPU_CAPABILITY=avx2 or default. In float64 the difference agrees with the independent
    one to 5e-4 on every kernel, and what is compared is the arithmetic of the functions under test.)"""
    monkeypatch.setattr(engine_scoring, "token_logprobs", lambda logits, tokens: torch.log_softmax(
        logits.double(), dim=-1).gather(-1, tokens[..., None])[..., 0])


@pytest.fixture(scope="module")
def setup(processor, rows, make_peft):
    model = make_peft(processor, peaky=True, double=True)
    with torch.no_grad():
        for name, p in model.get_base_model().named_parameters():
            if "language_model" in name and ("q_proj" in name or "k_proj" in name) and "lora_" not in name:
                p.mul_(SHARPEN)
    batches = [dict(b, pixel_values=b["pixel_values"].double()) for b, _ in pair_batches(rows[:4], processor, 2)]
    return model, batches


@pytest.mark.parametrize("kappa", [0.0, 1.0])
def test_autograd_slope_against_an_independent_finite_difference(setup, kappa, float64_logprobs):
    model, batches = setup
    cfg = DLeafConfig(kappa=kappa)
    slope = dleaf_dpo.loss_slope(model, batches, BETA, cfg)
    assert slope["loss_at_0"] == math.log(2) and slope["n"] == 4
    with model.disable_adapter():
        base = model.get_base_model()
        step = {g: {} for g in (H, -H)}
        independent = (hand_loss(base, batches, BETA, cfg, H, step[H])
                       - hand_loss(base, batches, BETA, cfg, -H, step[-H])) / (2 * H)
        # autograd differentiates with the flags of gamma 0 held fixed, the differences take each side's flags: they
        # compare only where those are the same flags, along both paths, and no rounding can flip one
        check_decisions({"one pass at 0": one_pass_decisions(base, batches, cfg, 0.0),
                     **{f"one pass at {g:+}": one_pass_decisions(base, batches, cfg, g) for g in (H, -H)},
                     **{f"step by step at {g:+}": step[g] for g in (H, -H)}})
    assert abs(independent) > 1e-4
    assert slope["slope"] == pytest.approx(independent, rel=0.02)
    fd = dleaf_dpo.finite_difference_slope(model, batches, BETA, cfg, h=H)
    assert fd["central"] == pytest.approx(independent, rel=0.02)
    assert fd["loss_at_0"] == math.log(2)


def test_loss_curve_against_an_independent_loss(setup, float64_logprobs):
    model, batches = setup
    cfg = DLeafConfig(kappa=0.0)
    curve = dleaf_dpo.loss_curve(model, batches, BETA, cfg, [-0.1, 0.0, 0.3, 1.0])
    assert [c["gamma"] for c in curve] == [-0.1, 0.0, 0.3, 1.0]
    assert curve[1]["loss"] == math.log(2) and curve[1]["ties"] == 1.0
    with model.disable_adapter():
        base = model.get_base_model()
        step = {g: {} for g in (0.3, 1.0, -0.1)}
        expected = {0.3: hand_loss(base, batches, BETA, DLeafConfig(kappa=0.0, gamma=0.3), flags=step[0.3]),
                    1.0: hand_loss(base, batches, BETA, DLeafConfig(kappa=0.0, gamma=1.0), flags=step[1.0]),
                    -0.1: hand_loss(base, batches, BETA, cfg, -0.1, step[-0.1])}
        for g in (0.3, 1.0, -0.1):  # the same flags along both paths, none of them on a tie
            one = one_pass_decisions(base, batches, DLeafConfig(kappa=0.0, gamma=g) if g >= 0 else cfg,
                                 None if g >= 0 else g)
            check_decisions({f"one pass at {g}": one, f"step by step at {g}": step[g]})
    for c in curve:
        if c["gamma"] != 0.0:
            # float64 throughout but for eager attention's float32 softmax, whose rounding differs between the two
            # paths by a few 1e-9 in the loss
            assert c["loss"] == pytest.approx(expected[c["gamma"]], abs=1e-7), c["gamma"]
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


def test_the_flag_check_fails_on_a_threshold_tie(setup):
    """The fixture moved onto a tie: kappa chosen so that one decisive flag's running threshold, mean + kappa sd of
    the earlier signals, equals its signal (at gamma 0 the signals do not depend on kappa). The flag check of the
    tests above must refuse it; at kappa 1 it accepts the fixture."""
    model, batches = setup
    with model.disable_adapter():
        base = model.get_base_model()
        flags = one_pass_decisions(base, batches[1:], DLeafConfig(kappa=1.0), 0.0)
        assert check_decisions({"kappa 1": flags}) >= FLAG_MARGIN
        ivs = []
        with torch.no_grad():
            score(base, batches[1], DLeafConfig(kappa=1.0), gamma=torch.zeros((), dtype=torch.float64),
                  intervention_factory=lambda m, c, t: ivs.append(engine.attach(m, c, trace=True)) or ivs[-1])
        row, column, layer = next((b, c, l) for (_, b, c, l), (_, _, f) in sorted(flags_of(flags).items()) if f)
        step, = ivs[0].trace.steps  # one pass: one record, every column; its signals in float64
        active = step["active"][row] & (step["columns"] < column)
        earlier = step["layers"][layer]["signal"][row][active].double()
        assert len(earlier) >= 2
        tie = float((flags[(0, row, column, layer)][0] - earlier.mean()) / earlier.std(unbiased=False))
        tied = one_pass_decisions(base, batches[1:], DLeafConfig(kappa=tie), 0.0)
    margin = abs(tied[(0, row, column, layer)][0] - tied[(0, row, column, layer)][1])
    assert margin < 1e-12  # on the tie, to float64 rounding
    with pytest.raises(MarginTooSmall, match="threshold tie"):
        check_decisions({"kappa on a tie": tied})
