"""D-LEAF (dleaf/methods/dleaf.py): every traced statistic against a brute-force loop, the fast one-row kernel against
dleaf.attention_stats, the head selection and fusion on hand-worked examples, the ablations."""

import math

import pytest
import torch

from dleaf import attention_stats, engine
from dleaf.config import DLeafConfig
from dleaf.methods import dleaf as dleaf_method
from margins import FLAG_MARGIN, GREEDY_GAP, assert_dleaf_margins, assert_greedy_gap

GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
STRONG = dict(gamma=1.0, warmup=1, kappa=0.0)  # flags often on an untrained model


@pytest.fixture()
def tiny(organism_batch):
    """The tiny organism (3 layers, 4 heads, eager) and a left-padded batch of three prompts."""
    return organism_batch


def _same_logits(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@torch.no_grad()
def test_gamma_zero_and_no_flags_equal_plain_eager_decoding(tiny):
    model, _, _, _, batch = tiny
    plain = model.generate(**batch, max_new_tokens=8, **GEN)
    with engine.attached(model, "dleaf", gamma=0.0, warmup=1, kappa=0.0, trace=True) as iv:
        zero = model.generate(**batch, max_new_tokens=8, **GEN)
    assert iv.flag_rate() > 0  # heads were selected and "corrected" with gamma 0
    with engine.attached(model, "dleaf", gamma=1.0, kappa=1e9, trace=True) as iv:
        none = model.generate(**batch, max_new_tokens=8, **GEN)
    assert iv.flag_rate() == 0
    with engine.attached(model, "dleaf", **STRONG) as iv:
        strong = model.generate(**batch, max_new_tokens=8, **GEN)
    for out in (zero, none):
        assert torch.equal(out.sequences, plain.sequences) and _same_logits(out.logits, plain.logits)
    assert not _same_logits(strong.logits, plain.logits)


VARIANTS = {  # every formula of the layer signal and of IAF, each checked by the brute-force loop below
    "mixed_focus": dict(liae_normalize=False, iaf_variant="focus"),
    "mean_head_normalized_mass": dict(liae_variant="mean_head", liae_normalize=True, iaf_variant="mass"),
    "mass_deficit": dict(layer_signal="mass_deficit", iaf_variant="mass"),
}


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("path", ["scoring", "generation"])
def test_trace_statistics_equal_brute_force_from_output_attentions(sharp_organism_batch, path, variant):
    """Every traced statistic against a loop over output_attentions, for the multi-row path (one-pass scoring) and
    the one-row path (each decoding step), for every signal and IAF formula. On the sharpened organism: the flags and
    corrected heads recomputed here (another formula for the running std, the heads' mean in float64) come out the
    same only where none is decided within rounding of its tie, which is checked."""
    model, _, _, _, batch = sharp_organism_batch
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    n = batch["input_ids"].shape[1]
    full = {**batch, "input_ids": out,
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(out[:, n:])], 1)}
    cfg = DLeafConfig(gamma=0.0, warmup=1, kappa=0.5, **VARIANTS[variant])
    with engine.attached(model, cfg, trace=True) as iv:
        if path == "scoring":
            engine.response_logprobs(model, full, [n] * out.shape[0], iv)
            last = out.shape[1]
        else:
            assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), out)  # gamma 0
            last = out.shape[1] - 1  # the last token is never fed back
    assert assert_dleaf_margins(iv.trace) >= FLAG_MARGIN
    attentions = model(**full, output_attentions=True).attentions
    image_id = model.config.image_token_id
    for b in range(out.shape[0]):
        tr = iv.trace.sample(b)
        assert tr["positions"].tolist() == list(range(n - 1, last))
        img = [k for k in range(out.shape[1]) if int(out[b, k]) == image_id]
        for j, t in enumerate(tr["positions"].tolist()):
            for layer, att in enumerate(attentions):
                row = att[b, :, t].double()
                heads = row.shape[0]
                masses = [sum(float(row[h, k]) for k in img) for h in range(heads)]
                entropies = []
                for h in range(heads):
                    prof = [float(row[h, k]) / masses[h] for k in img]
                    entropies.append(-sum(p * math.log(p) for p in prof if p > 0))
                    focus = masses[h] * (1 - entropies[h] / math.log(len(img)))
                    want = focus if cfg.iaf_variant == "focus" else masses[h]
                    assert float(tr["iaf"][j, layer, h]) == pytest.approx(want, rel=1e-4, abs=1e-6)
                if cfg.layer_signal == "mass_deficit":
                    signal = -sum(masses) / heads
                elif cfg.liae_variant == "mixed":
                    mixed = [sum(float(row[h, k]) / masses[h] for h in range(heads)) / heads for k in img]
                    signal = -sum(p * math.log(p) for p in mixed if p > 0)
                else:
                    signal = sum(entropies) / heads
                if cfg.layer_signal == "liae" and cfg.liae_normalize:
                    signal /= math.log(len(img))
                assert float(tr["signal"][j, layer]) == pytest.approx(signal, rel=1e-4, abs=1e-5)
        # the running threshold, recomputed with a loop over earlier positions of the same layer
        sig = tr["signal"].double().numpy()
        for layer in range(sig.shape[1]):
            for j in range(sig.shape[0]):
                earlier = sig[:j, layer]
                if len(earlier) < cfg.warmup:
                    assert math.isnan(float(tr["tau"][j, layer])) and not tr["flag"][j, layer]
                    continue
                tau = earlier.mean() + cfg.kappa * earlier.std()
                assert float(tr["tau"][j, layer]) == pytest.approx(tau, rel=1e-6, abs=1e-9)
                assert bool(tr["flag"][j, layer]) == (sig[j, layer] > tau)
                # corrected heads: below the layer mean IAF, only where the layer is flagged
                iaf = tr["iaf"][j, layer].double()
                want = (iaf < iaf.mean()) & bool(tr["flag"][j, layer])
                assert torch.equal(tr["corrected"][j, layer], want)


def test_select_heads_and_fusion_on_a_hand_worked_example():
    iaf = torch.tensor([0.1, 0.6, 0.2, 0.5]).reshape(1, 4, 1)  # mean 0.35: heads 0 and 2 below it, h* = 1
    best, sel = dleaf_method.select_heads(iaf, "below_mean")
    assert best.item() == 1 and sel.flatten().tolist() == [True, False, True, False]
    assert dleaf_method.select_heads(iaf, "all_but_best")[1].flatten().tolist() == [True, False, True, True]
    assert dleaf_method.select_heads(iaf, "bottom_k", 1)[1].flatten().tolist() == [True, False, False, False]
    assert dleaf_method.select_heads(iaf, "bottom_k", 3)[1].flatten().tolist() == [True, False, True, True]
    rows = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]]).reshape(1, 4, 1, 3)
    fused = dleaf_method.fuse_heads(rows, best, sel, 0.25)
    # head 0: 0.75 * [0.5, 0.5, 0] + 0.25 * [0, 0.2, 0.8] = [0.375, 0.425, 0.2]
    assert fused[0, 0, 0].tolist() == pytest.approx([0.375, 0.425, 0.2])
    # head 2: 0.75 * [1, 0, 0] + 0.25 * [0, 0.2, 0.8] = [0.75, 0.05, 0.2]
    assert fused[0, 2, 0].tolist() == pytest.approx([0.75, 0.05, 0.2])
    assert torch.equal(fused[0, 1], rows[0, 1]) and torch.equal(fused[0, 3], rows[0, 3])
    assert fused.sum(-1).flatten().tolist() == pytest.approx([1.0] * 4)
    torch.testing.assert_close(dleaf_method.fuse_heads(rows, best, sel, 1.0)[0, 0], rows[0, 1])
    # the random-target null: target (h* + shift) mod H, and the target itself is never corrected
    target, cor = dleaf_method.random_target(best, dleaf_method.select_heads(iaf, "all_but_best")[1], torch.tensor([[[2]]]))
    assert target.item() == 3 and cor.flatten().tolist() == [True, False, True, False]
    fused = dleaf_method.fuse_heads(rows, target, cor, 0.5)
    assert fused[0, 2, 0].tolist() == pytest.approx([0.65, 0.15, 0.2])  # 0.5 [1, 0, 0] + 0.5 [0.3, 0.3, 0.4]


@torch.no_grad()
def test_random_fusion_target_draws_a_head_other_than_the_best(tiny, monkeypatch):
    """fusion_target="random" on the one-row path: with gamma 1 and every head but h* corrected, each corrected
    head's row becomes exactly the row of head (h* + shift) mod H, a head other than h*, which itself is left alone;
    with gamma 0 the output equals plain decoding."""
    model, _, _, _, batch = tiny
    seen = []

    def spy(rows, *args, **kwargs):
        before = rows.clone()
        out = step(rows, *args, **kwargs)
        seen.append((before, out[0].clone(), out[3], out[4], kwargs["target_shift"]))
        return out

    step = dleaf_method.one_row_step
    monkeypatch.setattr(dleaf_method, "one_row_step", spy)
    with engine.attached(model, "dleaf", gamma=1.0, localization="everywhere", head_selection="all_but_best",
                         fusion_target="random", seed=3):
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert seen
    shifts = set()
    for before, after, iaf, corrected, shift in seen:
        H = before.shape[1]
        for b in range(before.shape[0]):
            best, s = int(iaf[b].argmax()), int(shift[b])
            target = (best + s) % H
            shifts.add(s)
            assert 1 <= s < H and target != best
            assert corrected[b, :, 0].tolist() == [h not in (best, target) for h in range(H)]
            for h in range(H):
                assert torch.equal(after[b, h], before[b, target if h not in (best, target) else h])
    assert len(shifts) > 1  # the draws vary
    plain = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    with engine.attached(model, "dleaf", gamma=0.0, localization="everywhere", fusion_target="random"):
        zero = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    assert _same_logits(zero.logits, plain.logits)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_step_gives_the_same_generation(sharp_organism_batch):
    """compile=True runs the per-token step through torch.compile (slow: it compiles): same tokens, same logits and
    the same flags as the plain step (on the sharpened organism: every flag, head choice and token decided by a clear
    margin, so that the compiled kernels' rounding cannot change one)."""
    model, _, _, _, batch = sharp_organism_batch
    outs, rates = [], []
    for comp in (False, True):
        with engine.attached(model, "dleaf", compile=comp, trace=True, **STRONG) as iv:
            outs.append(model.generate(**batch, max_new_tokens=8, **GEN))
        rates.append(iv.flag_rate())
        assert assert_dleaf_margins(iv.trace) >= FLAG_MARGIN
    assert_greedy_gap(outs[0].logits, GREEDY_GAP)
    assert torch.equal(outs[0].sequences, outs[1].sequences) and rates[0] == rates[1] > 0
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bottom_k_corrects_k_heads_when_the_best_head_ties_into_the_bottom():
    iaf = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.9]).reshape(1, 5, 1)  # h* = 4 (no tie)
    assert dleaf_method.select_heads(iaf, "bottom_k", 2)[1].flatten().tolist() == [True, True, False, False, False]
    iaf = torch.tensor([0.3, 0.3, 0.3, 0.3]).reshape(1, 4, 1)  # all tied: h* = 0 is among the lowest
    best, selected = dleaf_method.select_heads(iaf, "bottom_k", 2)
    assert best.item() == 0 and selected.flatten().tolist() == [False, True, True, False]
    assert dleaf_method.select_heads(iaf, "bottom_k", 9)[1].flatten().tolist() == [False, True, True, True]



@torch.no_grad()
def test_ablations_are_neutral_at_zero_strength_and_act_otherwise(tiny):
    model, _, _, _, batch = tiny
    plain = model(**batch).logits
    for name, strong in [("no_localization", {"gamma": 1.0}), ("random_layers", {"gamma": 1.0, "random_rate": 1.0}),
                         ("random_target", {"gamma": 1.0, "localization": "everywhere"})]:
        with engine.attached(model, name, gamma=0.0):
            assert torch.equal(model(**batch).logits, plain), name
        with engine.attached(model, name, **strong):
            assert not torch.equal(model(**batch).logits, plain), name


def _random_rows(b, h, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, 1, k, generator=g, dtype=torch.float64) * 3, dim=-1)


@pytest.mark.parametrize("variant", [dict(), dict(liae_variant="mean_head"), dict(liae_normalize=False),
                                     dict(iaf_variant="focus"), dict(layer_signal="mass_deficit"),
                                     dict(head_selection="bottom_k", bottom_k=2), dict(head_selection="all_but_best")])
def test_the_one_row_kernel_equals_attention_stats(variant):
    """one_row_step (the decoding step's few-operator kernel) against dleaf.attention_stats and the reference
    selection and fusion, on random rows with different image sets per sample (one of them a single image key)."""
    cfg = DLeafConfig(gamma=0.7, **variant)
    B, H, K = 3, 5, 9
    rows = _random_rows(B, H, K, seed=sum(map(ord, str(variant))))
    image = torch.zeros(B, K, dtype=torch.bool)
    image[0, 2:6] = True
    image[1, [0, 4, 8]] = True
    image[2, 3] = True
    n = image.sum(-1).double()
    neg_inv_log = torch.where(n > 1, -1 / torch.log(n.clamp(min=2)), torch.zeros_like(n))[:, None, None]
    gate = torch.tensor([True, True, False])[:, None, None]
    tau = torch.full((B, 1, 1), -1e9, dtype=torch.float64)  # every gated row is flagged
    new, signal, flag, iaf, corrected = dleaf_method.one_row_step(rows, image.double()[:, None, :], gate, tau,
                                                                  neg_inv_log, cfg.gamma, cfg)
    if cfg.layer_signal == "liae":
        want = attention_stats.layer_entropy(rows, image, cfg.liae_variant, cfg.liae_normalize)
    else:
        want = -attention_stats.image_mass(rows, image).mean(dim=1)
    torch.testing.assert_close(signal[:, 0], want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(iaf, attention_stats.head_focus(rows, image, cfg.iaf_variant), rtol=1e-9, atol=1e-12)
    assert flag.flatten().tolist() == [True, True, False]
    best, selected = dleaf_method.select_heads(iaf, cfg.head_selection, cfg.bottom_k)
    assert torch.equal(corrected, selected & flag)
    torch.testing.assert_close(new, dleaf_method.fuse_heads(rows, best, corrected, cfg.gamma), rtol=0, atol=0)
    assert torch.equal(new[2], rows[2])  # a row that is not flagged is returned bit for bit
