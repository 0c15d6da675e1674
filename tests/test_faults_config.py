"""Faults (dleaf/faults.py) and the engine's pre-method hook: each kind against a hand computation on the model's own
attention rows, strength 0 bit for bit, the composition order (the fault first, then the method), the positions,
generate against teacher-forced scoring, and the configuration's errors."""

import math

import numpy as np
import pytest
import torch

from dleaf import engine
from dleaf.engine import kernels
from dleaf.faults import FaultConfig, fault_config, faulted_cells
from margins import FLAG_MARGIN, assert_margin, assert_same_decisions, decisions, head_cells

GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
STRONG = dict(gamma=1.0, warmup=1, kappa=0.0)  # flags often on an untrained model


@pytest.fixture()
def tiny(organism_batch):
    """The tiny organism (3 layers, 4 heads, eager) and a left-padded batch of three prompts."""
    return organism_batch


def _same(a, b):
    return torch.equal(a.sequences, b.sequences) and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


@torch.no_grad()
def _full(model, batch, steps=6):
    """Prompts and their greedy continuation as one teacher-forced input; the prompt width n."""
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False)
    n = batch["input_ids"].shape[1]
    full = {**batch, "input_ids": out,
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(out[:, n:])], 1)}
    return full, n


@torch.no_grad()
def _attentions(model, full, n, method=None, fault=None, trace=False, **knobs):
    """output_attentions of one teacher-forced pass in which every row from the last prompt token on is active."""
    with engine.attached(model, method, fault=fault, trace=trace, **knobs) as iv:
        if iv is None:
            return model(**full, output_attentions=True).attentions, None
        with iv.scoring(response_start=torch.full((full["input_ids"].shape[0],), n)):
            return model(**full, output_attentions=True).attentions, iv


def _hand_fault(row, img, heads, kind, s):
    """The fault of one attention row (H, K) by a plain loop (float64 numpy)."""
    row = np.asarray(row, dtype=np.float64)
    out = row.copy()
    K = row.shape[1]
    text = [j for j in range(K) if j not in img]
    for k, h in enumerate(heads):
        a = row[h]
        m = sum(a[i] for i in img)
        t = sum(a[j] for j in text)
        target = a.copy()
        if kind == "diffuse":
            for i in img:
                target[i] = m / len(img)
        elif kind == "drift":
            if t > 0:
                for i in img:
                    target[i] = 0.0
                for j in text:
                    target[j] = a[j] * (1 + m / t)
        else:
            nxt = row[heads[(k + 1) % len(heads)]]
            mn = sum(nxt[i] for i in img)
            for i in img:
                target[i] = m * nxt[i] / mn
        out[h] = a + s * (target - a)
    return out


def _entropy(p):
    p = np.asarray(p, float)
    p = p / p.sum()
    return -sum(x * math.log(x) for x in p if x > 0)


def _image(full, b, model):
    return [k for k in range(full["input_ids"].shape[1]) if int(full["input_ids"][b, k]) == model.config.image_token_id]


# ------------------------------------------------------------------------------------------------ strength 0
@torch.no_grad()
@pytest.mark.parametrize("kind", ["diffuse", "drift", "swap"])
@pytest.mark.parametrize("method,knobs", [(None, {}), ("dleaf", STRONG), ("pai", dict(layer_start=0)), ("spin", {}),
                                          ("random_layers", dict(random_rate=0.5, gamma=1.0)),
                                          ("random_target", STRONG), ("no_localization", dict(gamma=0.7))])
def test_strength_zero_is_bit_identical_to_no_fault(tiny, kind, method, knobs):
    model, _, _, _, batch = tiny
    fault0 = FaultConfig(kind, "all", heads=[0, 2, 3], strength=0.0)
    with engine.attached(model, method, **knobs):
        ref = model.generate(**batch, max_new_tokens=8, **GEN)
    with engine.attached(model, method, fault=fault0, **knobs):
        out = model.generate(**batch, max_new_tokens=8, **GEN)
    assert _same(out, ref)
    with engine.attached(model, method, fault=dict_to_fault(fault0, strength=1.0), **knobs):
        hit = model.generate(**batch, max_new_tokens=8, **GEN)
    assert not all(torch.equal(x, y) for x, y in zip(hit.logits, ref.logits))  # a real fault changes the logits


def dict_to_fault(fault, **changes):
    return fault_config(fault, **changes)


@torch.no_grad()
def test_vcd_composes_with_a_fault(tiny):
    """VCD acts on the logits; the fault is in the model, so in both of its streams. Strength 0 changes nothing."""
    model, _, _, _, batch = tiny
    with engine.attached(model, "vcd") as iv:
        ref = model.generate(**batch, max_new_tokens=6, **GEN, **engine.generation_kwargs(iv, batch))
    for s, same in ((0.0, True), (1.0, False)):
        fault = FaultConfig("drift", "all", strength=s)
        with engine.attached(model, "vcd", fault=fault) as iv:
            out = model.generate(**batch, max_new_tokens=6, **GEN, **engine.generation_kwargs(iv, batch))
        assert _same(out, ref) == same


# ------------------------------------------------------------------------------------------------ the kinds
@pytest.mark.parametrize("kind,heads,s", [("diffuse", [0, 2], 0.6), ("drift", [1, 2, 3], 0.35),
                                          ("swap", [0, 1, 3], 1.0), ("swap", [1, 2], 0.5),
                                          ("diffuse", [0, 1, 2, 3], 1.0)])
def test_faulted_rows_equal_a_hand_computation(tiny, kind, heads, s):
    """The faulted layer's rows (output_attentions under the fault alone) against the fault computed by a loop on the
    plain model's rows; earlier rows, other heads and other layers unchanged bit for bit."""
    model, _, _, _, batch = tiny
    full, n = _full(model, batch)
    plain, _ = _attentions(model, full, n)
    fault = FaultConfig(kind, [1], heads=heads, strength=s)
    faulted, _ = _attentions(model, full, n, None, fault)
    assert torch.equal(faulted[0], plain[0])  # a layer before the fault
    for b in range(full["input_ids"].shape[0]):
        img = _image(full, b, model)
        assert torch.equal(faulted[1][b, :, :n - 1], plain[1][b, :, :n - 1])  # prompt rows are not generated positions
        for t in range(n - 1, full["input_ids"].shape[1]):
            want = _hand_fault(plain[1][b, :, t].double().numpy(), img, heads, kind, s)
            got = faulted[1][b, :, t].double().numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
            others = [h for h in range(got.shape[0]) if h not in heads]
            assert torch.equal(faulted[1][b, others, t], plain[1][b, others, t])
            np.testing.assert_allclose(got.sum(-1), plain[1][b, :, t].double().numpy().sum(-1), atol=1e-6)


def test_diffuse_raises_liae_by_the_hand_computed_amount(tiny):
    """A diffuse fault of strength s turns a faulted head's image profile p into (1 - s) p + s u: its entropy rises
    by H((1 - s) p + s u) - H(p), computed here from the plain rows; D-LEAF's traced LIAE (entropy of the head-mixed
    profile / log |I|) on the faulted rows equals the hand LIAE of the hand-faulted rows, and rises by the difference
    of the two."""
    model, _, _, _, batch = tiny
    full, n = _full(model, batch)
    s, heads, layer = 0.4, [1, 3], 2
    fault = FaultConfig("diffuse", [layer], heads=heads, strength=s)
    plain, iv_plain = _attentions(model, full, n, "dleaf", None, trace=True, gamma=0.0)
    faulted, iv_fault = _attentions(model, full, n, "dleaf", fault, trace=True, gamma=0.0)
    for b in range(full["input_ids"].shape[0]):
        img = _image(full, b, model)
        tr0, tr1 = iv_plain.trace.sample(b), iv_fault.trace.sample(b)
        for j, t in enumerate(tr1["positions"].tolist()):
            a = plain[layer][b, :, t].double().numpy()
            hand = _hand_fault(a, img, heads, "diffuse", s)
            for h in range(a.shape[0]):
                p = np.array([a[h, i] for i in img])
                u = np.full(len(img), 1 / len(img))
                mixed = (1 - s) * p / p.sum() + s * u if h in heads else p / p.sum()
                got = faulted[layer][b, h, t].double().numpy()[img]
                rise = _entropy(got) - _entropy(p)
                assert rise == pytest.approx(_entropy(mixed) - _entropy(p), abs=1e-6)
                if h in heads:
                    assert rise >= -1e-9  # mixing toward uniform never lowers the entropy
                else:
                    assert rise == 0
            def liae(rows):
                prof = np.mean([[rows[h, i] / sum(rows[h, k] for k in img) for i in img] for h in range(rows.shape[0])],
                               axis=0)
                return _entropy(prof) / math.log(len(img))
            assert float(tr1["signal"][j, layer]) == pytest.approx(liae(hand), abs=1e-5)
            assert float(tr1["signal"][j, layer] - tr0["signal"][j, layer]) == pytest.approx(liae(hand) - liae(a),
                                                                                               abs=1e-5)
            for other in (0, 1):  # layers before the fault see the same rows
                assert float(tr1["signal"][j, other]) == float(tr0["signal"][j, other])


def test_drift_moves_exactly_the_stated_mass(tiny):
    model, _, _, _, batch = tiny
    full, n = _full(model, batch)
    s = 0.3
    plain, _ = _attentions(model, full, n)
    faulted, _ = _attentions(model, full, n, None, FaultConfig("drift", [0], heads=[2], strength=s))
    for b in range(full["input_ids"].shape[0]):
        img = _image(full, b, model)
        text = [k for k in range(full["input_ids"].shape[1]) if k not in img]
        for t in range(n - 1, full["input_ids"].shape[1]):
            a, f = plain[0][b, 2, t].double(), faulted[0][b, 2, t].double()
            m, t_mass = float(a[img].sum()), float(a[text].sum())
            assert float(f[img].sum()) == pytest.approx((1 - s) * m, abs=1e-6)  # a share s of the image mass left
            assert float(f[text].sum()) == pytest.approx(t_mass + s * m, abs=1e-6)  # ... and went to the text keys
            torch.testing.assert_close(f[img], (1 - s) * a[img], atol=1e-7, rtol=1e-6)  # the profile is kept
            torch.testing.assert_close(f[text], a[text] * (1 + s * m / t_mass), atol=1e-7, rtol=1e-5)


def test_swap_exchanges_the_image_profiles(tiny):
    model, _, _, _, batch = tiny
    full, n = _full(model, batch)
    heads = [0, 1, 3]
    plain, _ = _attentions(model, full, n)
    faulted, _ = _attentions(model, full, n, None, FaultConfig("swap", [2], heads=heads))
    for b in range(full["input_ids"].shape[0]):
        img = _image(full, b, model)
        for t in range(n - 1, full["input_ids"].shape[1]):
            a, f = plain[2][b, :, t].double(), faulted[2][b, :, t].double()
            for k, h in enumerate(heads):
                nxt = heads[(k + 1) % len(heads)]
                assert float(f[h, img].sum()) == pytest.approx(float(a[h, img].sum()), abs=1e-7)  # own mass kept
                torch.testing.assert_close(f[h, img] / f[h, img].sum(), a[nxt, img] / a[nxt, img].sum(),
                                           atol=1e-7, rtol=1e-5)  # the next head's profile
            torch.testing.assert_close(f[2], a[2], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ composition order
def test_the_fault_comes_first_then_dleaf(tiny):
    """D-LEAF's fusion (everywhere, in the faulted layer only) acts on the faulted rows: the rows it attends with
    equal fuse(fault(a)) computed by hand, and differ from fault(fuse(a))."""
    model, _, _, _, batch = tiny
    full, n = _full(model, batch)
    layer, gamma, heads = 1, 0.5, [0, 2]
    fault = FaultConfig("drift", [layer], heads=heads, strength=0.8)
    plain, _ = _attentions(model, full, n)
    both, iv = _attentions(model, full, n, "no_localization", fault, gamma=gamma, layer_start=layer,
                           layer_end=layer + 1, trace=True)
    # the hand fusion below chooses h* and the heads below the mean mass in float64: none of the engine's choices may
    # be within rounding of a tie
    assert assert_margin(head_cells(iv.trace), FLAG_MARGIN, "head choices") >= FLAG_MARGIN

    def fuse(rows, img):
        mass = np.array([sum(rows[h, i] for i in img) for h in range(rows.shape[0])])
        best = int(np.argmax(mass))
        out = rows.copy()
        for h in range(rows.shape[0]):
            if mass[h] < mass.mean():
                out[h] = rows[h] + gamma * (rows[best] - rows[h])
        return out

    differs = False
    for b in range(full["input_ids"].shape[0]):
        img = _image(full, b, model)
        for t in range(n - 1, full["input_ids"].shape[1]):
            a = plain[layer][b, :, t].double().numpy()
            first_fault = fuse(_hand_fault(a, img, heads, "drift", 0.8), img)
            np.testing.assert_allclose(both[layer][b, :, t].double().numpy(), first_fault, rtol=1e-5, atol=1e-7)
            differs |= not np.allclose(first_fault, _hand_fault(fuse(a, img), img, heads, "drift", 0.8), atol=1e-5)
    assert differs  # the order matters, so the check above can fail


@torch.no_grad()
def test_the_fault_comes_first_then_pai(tiny):
    """PAI boosts the scores whose softmax is the faulted row (log of each changed weight plus the row's
    log-normaliser): checked by hand from the layer's query and key on the last prompt row."""
    model, _, _, _, batch = tiny
    layer_module = model.model.language_model.layers[1].self_attn
    calls = []
    original = kernels.eager_weights

    def spy(module, query, key, mask, scaling, pre_softmax=None, softcap=None, sinks=None):
        if module is layer_module:
            calls.append((query, key, mask, scaling))
        return original(module, query, key, mask, scaling, pre_softmax, softcap, sinks)

    seen = {}
    hook = layer_module.register_forward_hook(lambda m, a, k, out: seen.update(weights=out[1]), with_kwargs=True)
    heads, alpha = [0, 3], 0.5
    fault = FaultConfig("drift", [1], heads=heads, strength=0.6)
    kernels.eager_weights = spy
    try:
        with engine.attached(model, "pai", alpha=alpha, layer_start=1, layer_end=2, fault=fault):
            model(**batch)
    finally:
        kernels.eager_weights = original
        hook.remove()
    query, key, mask, scaling = calls[0]
    w = ((query @ kernels.repeat_kv(key, layer_module.num_key_value_groups).transpose(2, 3)) * scaling + mask)[:, :, -1]
    image = (batch["input_ids"] == model.config.image_token_id)
    for b in range(w.shape[0]):
        img = [k for k in range(w.shape[-1]) if image[b, k]]
        scores = w[b].double().numpy()
        a = np.exp(scores - scores.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        lse = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1, keepdims=True)) + scores.max(-1,
                                                                                                         keepdims=True)
        faulted = _hand_fault(a, img, heads, "drift", 0.6)
        with np.errstate(divide="ignore"):
            new = np.where(np.isclose(faulted, a, rtol=0, atol=0), scores, np.log(faulted) + lse)
        boosted = new.copy()
        boosted[:, img] = new[:, img] + alpha * np.abs(new[:, img])
        want = np.exp(boosted - boosted.max(-1, keepdims=True))
        want /= want.sum(-1, keepdims=True)
        np.testing.assert_allclose(seen["weights"][b, :, -1].double().numpy(), want, rtol=1e-5, atol=1e-7)
        # the reverse order (PAI, then the fault) gives other rows
        plain_boost = scores.copy()
        plain_boost[:, img] += alpha * np.abs(scores[:, img])
        pb = np.exp(plain_boost - plain_boost.max(-1, keepdims=True))
        pb /= pb.sum(-1, keepdims=True)
        assert not np.allclose(_hand_fault(pb, img, heads, "drift", 0.6), want, atol=1e-5)


def test_a_faulted_layer_the_method_does_not_watch_is_faulted_all_the_same(tiny):
    model, _, _, _, batch = tiny
    full, n = _full(model, batch)
    fault = FaultConfig("diffuse", [0], strength=1.0)
    alone, _ = _attentions(model, full, n, None, fault)
    with_pai, _ = _attentions(model, full, n, "pai", fault, layer_start=2)
    assert torch.equal(with_pai[0], alone[0]) and torch.equal(with_pai[1], alone[1])
    plain, _ = _attentions(model, full, n)
    assert not torch.equal(alone[0], plain[0])


# ------------------------------------------------------------------------------------------------ positions, modes
@pytest.mark.parametrize("spec", [dict(positions="from", start=3), dict(positions="random", fraction=0.4, seed=5),
                                  dict(positions="all")])
def test_the_faulted_positions_are_the_stated_ones(tiny, spec):
    model, _, _, _, batch = tiny
    full, n = _full(model, batch, steps=8)
    fault = FaultConfig("diffuse", [1], **spec)
    plain, _ = _attentions(model, full, n)
    faulted, _ = _attentions(model, full, n, None, fault)
    T = full["input_ids"].shape[1]
    want = fault.position_faulted(np.arange(T - n + 1))
    if spec["positions"] == "random":
        draws = np.random.default_rng(5).random(T - n + 1)
        assert np.array_equal(want, draws < 0.4) and want.any() and not want.all()
    changed = [not torch.equal(faulted[1][0, :, t], plain[1][0, :, t]) for t in range(n - 1, T)]
    assert changed == want.tolist()
    assert faulted_cells(fault, T - n + 1, 3).tolist() == [[False, bool(w), False] for w in want]


@torch.no_grad()
@pytest.mark.parametrize("method,knobs", [("dleaf", STRONG), ("pai", dict(layer_start=0)), (None, {})])
def test_generate_and_teacher_forced_scoring_agree_with_a_fault(sharp_organism_batch, method, knobs):
    # the sharpened organism: D-LEAF's flags and head choices, compared along the two paths, are no near-ties there
    model, _, _, _, batch = sharp_organism_batch
    fault = FaultConfig("drift", [0, 2], heads=0.5, strength=0.7, positions="random", fraction=0.5)
    with engine.attached(model, method, fault=fault, trace=method == "dleaf", **knobs) as iv:
        out = model.generate(**batch, max_new_tokens=7, **GEN)
    n = batch["input_ids"].shape[1]
    steps = torch.stack([torch.log_softmax(x.float(), -1) for x in out.logits], 1)  # (B, T, V)
    stepwise = steps.gather(-1, out.sequences[:, n:, None])[..., 0]
    full = {**batch, "input_ids": out.sequences,
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, n:])], 1)}
    decided = {"generate": decisions(iv.trace)} if method == "dleaf" else None
    with engine.attached(model, method, fault=fault, trace=decided is not None, **knobs) as iv:
        logp, mask = engine.response_logprobs(model, full, [n] * out.sequences.shape[0], iv)
        torch.testing.assert_close(logp[:, n:], stepwise, atol=1e-5, rtol=1e-5)
        prompt = engine.PromptCache(model, batch)
        cached = engine.cached_response_logprobs(prompt, out.sequences[:, n:], intervention=iv)
        torch.testing.assert_close(cached, stepwise, atol=1e-5, rtol=1e-5)
    if decided is not None:  # the same flags and head choices in the three computations, none by rounding
        one, two = iv.trace.steps[0], iv.trace.steps[1]  # one pass, then the cached pass
        decisive = [set(range(n - 1, n + 6))] * 3  # the rows that predict the seven decoded tokens
        decided.update({"one pass": decisions([one], decisive), "cached": decisions([two], decisive)})
        assert min(assert_margin(d, FLAG_MARGIN) for d in decided.values()) >= FLAG_MARGIN
        assert_same_decisions(decided)
    with engine.attached(model, method, **knobs) as iv:
        unfaulted, _ = engine.response_logprobs(model, full, [n] * out.sequences.shape[0], iv)
    assert not torch.allclose(unfaulted[:, n:], stepwise, atol=1e-4)  # the fault is in the scoring too


# ------------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="blur"), "kind must be one of"),
    (dict(layers=[]), "non-empty list of layer"),
    (dict(layers=[1, 1]), "repeats an index"),
    (dict(layers=[-1]), "non-negative integer layer"),
    (dict(layers="1,x"), "list of layer indices"),
    (dict(heads=0.0), r"fraction must lie in \(0, 1\]"),
    (dict(heads=1.5), r"fraction must lie in \(0, 1\]"),
    (dict(heads=[True]), "non-negative integer head"),
    (dict(kind="swap", heads=[2]), "at least two faulted heads"),
    (dict(strength=1.2), r"strength must be a number in \[0, 1\]"),
    (dict(strength="high"), "strength must be a number"),
    (dict(positions="late"), "positions must be one of"),
    (dict(positions="from"), "needs start"),
    (dict(positions="from", start=-2), "needs start"),
    (dict(start=3), "applies to positions='from' only"),
    (dict(positions="random"), "needs fraction"),
    (dict(positions="random", fraction=0.0), "needs fraction"),
    (dict(fraction=0.5), "applies to positions='random' only"),
    (dict(seed=-1), "seed must be a non-negative integer"),
])
def test_bad_configurations_fail_with_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FaultConfig(**kwargs)


def test_a_fault_that_does_not_fit_the_model_fails_on_attach(tiny):
    model = tiny[0]
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\] do not exist in a decoder of 3 layers"):
        engine.attach(model, "dleaf", fault=FaultConfig(layers=[1, 5]))
    with pytest.raises(ValueError, match=r"head\(s\) \[4\] do not exist in a layer of 4 heads"):
        engine.attach(model, None, fault=FaultConfig(heads=[0, 4]))
    with pytest.raises(ValueError, match="a swap needs at least two faulted heads"):
        engine.attach(model, None, fault=FaultConfig("swap", heads=0.25))  # one head of four
    with pytest.raises(ValueError, match="compile=True"):
        engine.attach(model, "dleaf", fault=FaultConfig(), compile=True)
    with pytest.raises(ValueError, match="nothing to attach"):
        engine.Intervention(model, None)
    assert not engine.attached_interventions()
    with engine.attached(model, "greedy") as iv:
        assert iv is None  # no fault: nothing attached


def test_fields_round_trip_and_the_head_draw():
    f = FaultConfig("drift", "2,3", heads=0.5, strength=0.25, positions="random", fraction=0.3, seed=7)
    assert f.layers == (2, 3) and f.heads == 0.5
    assert fault_config(f.record()) == f and fault_config(f) == f
    assert f.label() == "drift L2,3 h0.5 s0.25 p~0.3"
    with pytest.raises(ValueError, match="no field"):
        fault_config(kind="diffuse", level=3)
    for H, frac, n in ((6, 0.5, 3), (4, 0.5, 2), (6, 0.25, 2), (4, 0.1, 1), (6, 1.0, 6)):
        g = FaultConfig(heads=frac, seed=3)
        heads = g.head_indices(1, H)
        assert len(heads) == n == max(1, math.floor(frac * H + 0.5))
        assert list(heads) == sorted(np.random.default_rng([3, 1]).choice(H, n, replace=False).tolist())
        assert g.head_indices(1, H) == heads  # the same draw every time
    assert FaultConfig(layers=4).layers == (4,)
    assert FaultConfig().layer_indices(3) == (0, 1, 2)
