"""Localization and correction as two parts of a method (dleaf/methods/localizers/): the oracle localizer with no
flag equals plain decoding bit for bit; one flagged row changes that row's attention only, as an independent
computation from the model's own eager attention says; a flag at the first generated token (the prefill's last row)
changes a yes/no answer's logits; every correction runs with every localizer."""

import pytest
import torch

from dleaf import engine
from dleaf.methods.localizers import localizer_names
from dleaf.methods.localizers.oracle import FlagSet
from dleaf.organism import world
from margins import FLAG_MARGIN, assert_margin

GREEDY = dict(max_new_tokens=6, do_sample=False, num_beams=1)
#: one strong setting per correction, so that a flagged row surely changes
STRONG = {"dleaf": dict(gamma=1.0, head_selection="all_but_best"), "pai": dict(alpha=0.9, layer_start=0),
          "spin": dict(keep_ratio=0.5, scale=0.0)}


@pytest.fixture()
def tiny(organism_batch):
    model, processor, scenes, prompts, batch = organism_batch
    return model, processor, scenes, prompts, batch


def _generate(model, batch, method=None, **knobs):
    with torch.no_grad(), engine.attached(model, method, **knobs) as iv:
        return model.generate(**batch, **GREEDY, output_scores=True, return_dict_in_generate=True,
                              **engine.generation_kwargs(iv, batch))


@pytest.mark.parametrize("method", ["dleaf", "pai", "spin"])
def test_oracle_with_no_flag_is_plain_decoding_bit_for_bit(tiny, method):
    model, _, _, _, batch = tiny
    plain = _generate(model, batch)
    for flags in ({}, {"0": {}, "1": {"rows": {}, "tokens": [5, 6]}}, FlagSet({"7": {0: "all"}})):
        out = _generate(model, batch, method, localization="oracle", flags=flags, **STRONG[method])
        assert torch.equal(out.sequences, plain.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.scores, plain.scores))


@pytest.mark.parametrize("method, native", [("dleaf", "no_localization"), ("pai", "pai"), ("spin", "spin")])
def test_oracle_flags_everywhere_equal_the_method_everywhere(tiny, method, native):
    """Flags at every position and every watched layer reproduce the unlocalized correction bit for bit."""
    model, _, _, _, batch = tiny
    knobs = dict(STRONG[method])
    ref = _generate(model, batch, native, **knobs)
    flags = {str(b): {p: "all" for p in range(GREEDY["max_new_tokens"])} for b in range(batch["input_ids"].shape[0])}
    out = _generate(model, batch, method, localization="oracle", flags=flags, **knobs)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))


@pytest.mark.parametrize("method", ["dleaf", "pai", "spin"])
@pytest.mark.parametrize("localization", ["everywhere", "random", "threshold", "oracle"])
def test_every_correction_runs_with_every_localizer(tiny, method, localization):
    model, _, _, _, batch = tiny
    assert localization in localizer_names()
    knobs = dict(STRONG[method], localization=localization)
    if localization == "oracle":
        knobs["flags"] = {"0": {1: "all"}}
    if localization == "random":
        knobs["random_rate"] = 0.5
    if method == "dleaf" and localization == "threshold":
        knobs.update(warmup=1, kappa=0.0)
    out = _generate(model, batch, method, **knobs)
    assert out.sequences.shape[0] == batch["input_ids"].shape[0]


@torch.no_grad()
def test_oracle_generation_follows_greedy_until_the_flagged_row(tiny):
    model, _, _, _, batch = tiny
    n = batch["input_ids"].shape[1]
    plain = _generate(model, batch)
    out = _generate(model, batch, "dleaf", localization="oracle", flags={"1": {3: "all"}}, **STRONG["dleaf"])
    for step in range(3):  # rows 0..2 of every sample, and every row of the unflagged samples
        assert torch.equal(out.scores[step], plain.scores[step])
    assert torch.equal(out.scores[3][[0, 2]], plain.scores[3][[0, 2]])
    assert not torch.equal(out.scores[3][1], plain.scores[3][1])
    assert torch.equal(out.sequences[:, :n + 3], plain.sequences[:, :n + 3])


def _teacher_forced(model, batch, n_new=5):
    """A one-sample sequence (prompt + its greedy reply), the column of its first reply token."""
    one = {k: v[:1] for k, v in batch.items()}
    keep = one["attention_mask"][0].bool()
    one = {k: (v[:, keep] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}
    with torch.no_grad():
        seq = model.generate(**one, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)
    start = one["input_ids"].shape[1]
    full = dict(one, input_ids=seq, attention_mask=torch.ones_like(seq))
    return full, start


@torch.no_grad()
def test_one_flagged_row_changes_that_rows_attention_only(tiny):
    """Oracle flag at generated position 2, layer 1, D-LEAF fusion (gamma 0.5, below_mean, IAF = image mass) in a
    teacher-forced pass: every layer output of every other row is plain's bit for bit; at the flagged row, the
    attention weights equal the fusion computed by hand from the model's own eager attention, and the attention
    output equals o_proj of those weights times the layer's values."""
    model, _, _, _, batch = tiny
    full, start = _teacher_forced(model, batch)
    layer, pos, gamma = 1, 2, 0.5
    row = start - 1 + pos
    lm = model.model.language_model
    attn = lm.layers[layer].self_attn
    seen = {}

    def grab(module, args, kwargs, out):
        seen["out"] = out[0]
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)

    plain = model(**full, output_attentions=True, output_hidden_states=True)
    hook = attn.register_forward_hook(grab, with_kwargs=True)
    try:
        with engine.attached(model, "dleaf", gamma=gamma, localization="oracle",
                             flags={"0": {pos: [layer]}}) as iv:
            with iv.scoring(response_start=torch.tensor([start])):
                out = model(**full, output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    T = full["input_ids"].shape[1]
    other = torch.ones(T, dtype=torch.bool)
    other[row] = False
    # rows before the flagged one: unchanged everywhere; every other row of the flagged layer's output: unchanged
    for h_plain, h_out in zip(plain.hidden_states, out.hidden_states):
        assert torch.equal(h_plain[:, :row], h_out[:, :row])
    assert torch.equal(plain.hidden_states[layer + 1][:, other], out.hidden_states[layer + 1][:, other])
    assert torch.equal(plain.hidden_states[layer], out.hidden_states[layer])
    for lay in range(len(plain.attentions)):
        if lay != layer:
            continue
        assert torch.equal(plain.attentions[lay][:, :, other], out.attentions[lay][:, :, other])
    # the flagged row, by hand: IAF = image mass, h* = argmax, heads below the mean fused toward h*
    a = plain.attentions[layer][0, :, row]  # (H, K), the model's own eager attention
    image = (full["input_ids"][0] == model.config.image_token_id).to(a.dtype)
    mass = (a * image).sum(-1)
    best = int(mass.argmax())
    # the engine sums the image mass its own way: h* and the heads below the mean come out the same as here only
    # where none of those choices is within rounding of a tie
    top = mass.double().topk(2).values
    assert_margin([("h*", float(top[0]), float(top[1]))]
                  + [(f"head {h}", float(m), float(mass.double().mean())) for h, m in enumerate(mass.tolist())],
                  FLAG_MARGIN, "head choices")
    fused = a.clone()
    for h in range(a.shape[0]):
        if mass[h] < mass.mean():
            fused[h] = (1 - gamma) * a[h] + gamma * a[best]
    assert not torch.allclose(fused, a)
    torch.testing.assert_close(out.attentions[layer][0, :, row], fused, rtol=1e-6, atol=1e-7)
    # the layer's attention output at the flagged row: o_proj(concat_h fused[h] @ V_h)
    H, D = a.shape[0], attn.head_dim
    v = attn.v_proj(seen["hidden"][0]).view(T, -1, D).transpose(0, 1)  # (Hkv, T, D)
    v = v.repeat_interleave(H // v.shape[0], dim=0)
    by_hand = attn.o_proj(torch.einsum("hk,hkd->hd", fused, v).reshape(1, H * D))[0]
    torch.testing.assert_close(seen["out"][0, row], by_hand, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_pai_and_spin_act_only_at_the_flagged_row(tiny):
    model, _, _, _, batch = tiny
    full, start = _teacher_forced(model, batch)
    layer, pos = 2, 1
    row = start - 1 + pos
    plain = model(**full, output_hidden_states=True).hidden_states
    for method in ("pai", "spin"):
        with engine.attached(model, method, localization="oracle", flags={"0": {pos: [layer]}},
                             **STRONG[method]) as iv:
            with iv.scoring(response_start=torch.tensor([start])):
                out = model(**full, output_hidden_states=True).hidden_states
        assert torch.equal(out[layer], plain[layer])
        keep = torch.ones(full["input_ids"].shape[1], dtype=torch.bool)
        keep[row] = False
        assert torch.equal(out[layer + 1][:, keep], plain[layer + 1][:, keep])
        assert not torch.equal(out[layer + 1][:, row], plain[layer + 1][:, row])


@torch.no_grad()
def test_a_first_token_flag_changes_a_yes_no_answers_logits(tiny, make_batch):
    """Position 0 is the prefill's last row, whose logits give the answer; D-LEAF's running threshold cannot flag it
    (no earlier value), the oracle can."""
    model, processor, scenes, _, _ = tiny
    batch = make_batch(processor, scenes[:1], [world.QUESTION_TEMPLATE.format(obj="fork")])
    plain = model(**batch).logits[:, -1]
    with engine.attached(model, "dleaf", gamma=1.0, warmup=1, kappa=0.0, trace=True) as iv:
        assert torch.equal(model(**batch).logits[:, -1], plain)
        assert iv.flag_rate() == 0.0
    for method in ("dleaf", "pai", "spin"):
        with engine.attached(model, method, localization="oracle", flags={"0": {0: "all"}}, **STRONG[method]):
            assert not torch.equal(model(**batch).logits[:, -1], plain)


@torch.no_grad()
def test_flags_of_a_reply_are_dropped_once_decoding_leaves_it(tiny):
    """With the reply's tokens, a flag after the first changed token is not applied: a wrong reply token at
    position 1 drops the flag at position 3, so decoding is plain (flags at 3 only)."""
    model, _, _, _, batch = tiny
    n = batch["input_ids"].shape[1]
    plain = _generate(model, batch)
    reply = plain.sequences[0, n:].tolist()
    wrong = list(reply)
    wrong[0] = (wrong[0] + 1) % model.config.text_config.vocab_size
    on = _generate(model, batch, "dleaf", localization="oracle", flags={"0": {"rows": {3: "all"}, "tokens": reply}},
                   **STRONG["dleaf"])
    assert not torch.equal(on.scores[3][0], plain.scores[3][0])
    off = _generate(model, batch, "dleaf", localization="oracle", flags={"0": {"rows": {3: "all"}, "tokens": wrong}},
                    **STRONG["dleaf"])
    assert all(torch.equal(a, b) for a, b in zip(off.scores, plain.scores))


def test_name_samples_keys_rows_and_flag_files_round_trip(tiny, tmp_path):
    model, _, _, _, batch = tiny
    plain = _generate(model, batch)
    path = FlagSet({"scene-b": {1: [0, 2]}}, meta={"what": "test"}).save(tmp_path / "flags.json")
    assert FlagSet.load(path).lookup("scene-b")["rows"] == {1: (0, 2)}
    with torch.no_grad(), engine.attached(model, "dleaf", localization="oracle", flags=str(path),
                                          **STRONG["dleaf"]) as iv:
        iv.name_samples(["scene-a", "scene-b", "scene-c"])
        out = model.generate(**batch, **GREEDY, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.scores[1][[0, 2]], plain.scores[1][[0, 2]])
    assert not torch.equal(out.scores[1][1], plain.scores[1][1])


def test_oracle_knobs_are_checked():
    from dleaf.config import method_config

    with pytest.raises(ValueError, match="needs flags"):
        method_config("pai", localization="oracle")
    with pytest.raises(ValueError, match="only read with localization='oracle'"):
        method_config("dleaf", flags={})
    with pytest.raises(ValueError, match="localization must be one of"):
        method_config("spin", localization="nowhere")


class _WordTokenizer:
    """One token per word, ids = indices into ``words``."""

    def __init__(self, words):
        self.words = list(words)

    def convert_ids_to_tokens(self, ids):
        return [self.words[i] for i in ids]


def test_the_organism_flag_builder_on_a_hand_made_case():
    from dleaf.localization import organism_flags, word_changes

    words = ["<eos>", "there", "is", "a", "fork", "knife", "cup", "."]
    tok = _WordTokenizer(words)
    ids = lambda text: [words.index(w) for w in text.split()]  # noqa: E731
    # scene: fork and cup; greedy names fork, then knife (absent), then cup; a second caption has no object word
    greedy = [{"token_ids": ids("there is a fork . there is a knife . a cup . <eos>")},
              {"token_ids": ids("there is a . <eos>")}]
    truths = [{"fork", "cup"}, {"cup"}]
    objects = ("fork", "knife", "cup", "plate")
    hall = organism_flags(greedy, truths, tok, objects, "hallucinated")
    assert hall.lookup("0")["rows"] == {8: "all"}  # the row whose logits give "knife" is position 8
    assert hall.lookup("0")["tokens"] == greedy[0]["token_ids"]
    assert hall.lookup("1")["rows"] == {}
    grounded = organism_flags(greedy, truths, tok, objects, "grounded", layers=[1, 2])
    assert grounded.lookup("0")["rows"] == {3: (1, 2), 11: (1, 2)}
    rand = organism_flags(greedy, truths, tok, objects, "random", seed=3)
    assert len(rand.lookup("0")["rows"]) == 1 and not set(rand.lookup("0")["rows"]) & {3, 8, 11}
    assert rand.lookup("1")["rows"] == {}  # no hallucinated word, no random row
    assert organism_flags(greedy, truths, tok, objects, "random", seed=3).to_json() == rand.to_json()
    # corrected: "knife" became "cup" at position 8 (a grounded object not yet named); the second caption unchanged
    corrected = [{"token_ids": ids("there is a fork . there is a cup . <eos>")}, greedy[1]]
    out = word_changes(greedy, corrected, hall, truths, tok, objects, {0})
    assert out["outcomes"]["grounded object, new"] == 1 and out["n_flagged_words"] == 1
    assert out["still_named"] == 0 and out["same_before_first_flag"] == out["flagged_captions"] == 1
    # grounded control: the caption changes at position 3 ("fork" -> "knife"), so the flag at 11 is not reached
    changed = [{"token_ids": ids("there is a knife . <eos>")}, greedy[1]]
    out = word_changes(greedy, changed, grounded, truths, tok, objects, {0})
    assert out["outcomes"]["other absent object"] == 1 and out["outcomes"]["not reached"] == 1
# PAI's alpha stays below 1 here: its boost w + alpha |w| * [image key] overflows to inf at the masked keys of a
# left-padded batch for alpha > 1 (inf * 0 = nan), a behaviour of PAI itself that these tests leave as it is.


@torch.no_grad()
def test_the_threshold_localizer_flags_where_dleaf_flags(tiny):
    """PAI and SPIN with localization="threshold" flag exactly the cells D-LEAF's own trace flags (all at zero
    strength, so every decoding is plain greedy), at D-LEAF's default threshold knobs (PAI and SPIN have none)."""
    model, _, _, _, batch = tiny
    with engine.attached(model, "dleaf", gamma=0.0, trace=True) as iv:
        model.generate(**batch, **GREEDY)
    ref = torch.stack([iv.trace.sample(b)["flag"] for b in range(batch["input_ids"].shape[0])])  # (B, T, L)
    assert ref.any() and not ref.all()
    for method, zero in (("pai", dict(alpha=0.0, layer_start=0)), ("spin", dict(scale=1.0))):
        with engine.attached(model, method, localization="threshold", **zero) as iv:
            seen = {}
            flags = iv.method.localizer.flags

            def spy(call, rows=None, flags=flags):
                out = flags(call, rows)
                pos = call.positions()
                for b in range(out.shape[0]):
                    for q in range(out.shape[1]):
                        if pos[b, q] >= 0:
                            seen[(b, int(pos[b, q]), call.layer)] = bool(out[b, q])
                return out

            iv.method.localizer.flags = spy
            model.generate(**batch, **GREEDY)
        got = torch.zeros_like(ref)
        for (b, p, layer), v in seen.items():
            got[b, p, layer] = v
        assert torch.equal(got, ref), method


@torch.no_grad()
def test_the_threshold_localizer_flags_where_dleaf_flags_in_teacher_forced_scoring(tiny):
    model, _, _, _, batch = tiny
    full, start = _teacher_forced(model, batch, n_new=6)
    with engine.attached(model, "dleaf", gamma=0.0, trace=True) as iv:
        with iv.scoring(response_start=torch.tensor([start])):
            model(**full)
    ref = iv.trace.sample(0)["flag"]  # (T, L) over the active rows
    assert ref.any()
    with engine.attached(model, "spin", scale=1.0, localization="threshold") as iv:
        got = {}
        flags = iv.method.localizer.flags

        def spy(call, rows=None):
            out = flags(call, rows)
            got[call.layer] = out[0][call.positions()[0] >= 0]
            return out

        iv.method.localizer.flags = spy
        with iv.scoring(response_start=torch.tensor([start])):
            model(**full)
    assert torch.equal(torch.stack([got[layer] for layer in sorted(got)], 1), ref)


def test_a_localizer_is_added_by_one_new_file(tmp_path):
    """Copy the package, add one localizer file and nothing else: every correction runs with it by name."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "dleaf", tmp_path / "dleaf", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "dleaf" / "methods" / "localizers" / "last_layer.py").write_text('''
from . import Localizer, register_localizer


@register_localizer("last_layer")
class LastLayer(Localizer):
    """Every active row of the last watched layer only."""

    def flags(self, call, rows=None):
        return call.active & (call.layer == max(self.host.watched))
''')
    script = '''
import torch
from dleaf import engine
from dleaf.methods.localizers import localizer_names
from dleaf.organism import build
assert "last_layer" in localizer_names()
shape = build.OrganismShape(text_hidden=32, text_layers=2, text_heads=4, text_intermediate=64)
model = build.build_model(build.build_processor(shape).tokenizer, shape, seed=0).eval()
model.set_attn_implementation("eager")
ids = torch.tensor([[1, model.config.image_token_id, model.config.image_token_id, 5, 6]])
with torch.no_grad():
    plain = model(input_ids=ids, output_hidden_states=True).hidden_states
    for method, knobs in (("dleaf", dict(gamma=1.0, head_selection="all_but_best")), ("pai", dict(alpha=0.9, layer_start=0)),
                          ("spin", dict(keep_ratio=0.5, scale=0.0))):
        with engine.attached(model, method, localization="last_layer", **knobs):
            out = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert torch.equal(out[1], plain[1]), method  # the first layer is left alone
        assert not torch.equal(out[2], plain[2]), method  # the last layer acts at the prompt's last row
print("ok")
'''
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@torch.no_grad()
def test_oracle_follows_beam_search_and_teacher_forced_scoring(tiny):
    """Beam search: the flag table moves with the beams (flags at every row of every beam reproduce
    no_localization's beam search bit for bit; flags at one sample's rows only leave the other samples' beams
    plain). Teacher-forced scoring of a reply equals its step-by-step decoding under the same oracle flags."""
    model, _, _, _, batch = tiny
    b = batch["input_ids"].shape[0]
    beam = dict(max_new_tokens=5, do_sample=False, num_beams=2, output_scores=True, return_dict_in_generate=True)
    knobs = STRONG["dleaf"]
    with engine.attached(model, "no_localization", **knobs):
        ref = model.generate(**batch, **beam)
    every = {str(k): {p: "all" for p in range(5)} for k in range(2 * b)}  # rows are the 2 b beams
    with engine.attached(model, "dleaf", localization="oracle", flags=every, **knobs):
        out = model.generate(**batch, **beam)
    assert torch.equal(out.sequences, ref.sequences)
    plain = model.generate(**batch, **beam)
    with engine.attached(model, "dleaf", localization="oracle", flags={"2": every["2"], "3": every["3"]},
                         **knobs):  # sample 1's two beams
        one = model.generate(**batch, **beam)
    assert torch.equal(one.sequences[[0, 2]], plain.sequences[[0, 2]])  # one reply per sample is returned
    # teacher-forced scoring against step-by-step decoding, with a flag at position 0 and one later
    full, start = _teacher_forced(model, batch)
    flags = {"0": {0: "all", 2: [1]}}
    with engine.attached(model, "dleaf", localization="oracle", flags=flags, **knobs) as iv:
        scored, mask = engine.response_logprobs(model, full, torch.tensor([start]), iv)
    reply = full["input_ids"][0, start:]
    with engine.attached(model, "dleaf", localization="oracle", flags=flags, **knobs):  # raw logits, not scores
        one_in = {k: v for k, v in full.items() if k not in ("input_ids", "attention_mask")}
        gen = model.generate(input_ids=full["input_ids"][:, :start], attention_mask=full["attention_mask"][:, :start],
                             **one_in, max_new_tokens=reply.shape[0], do_sample=False, output_logits=True,
                             return_dict_in_generate=True, min_new_tokens=reply.shape[0])
    if torch.equal(gen.sequences[0, start:], reply):
        steps = torch.stack([torch.log_softmax(s[0], -1)[t] for s, t in zip(gen.logits, reply)])
        torch.testing.assert_close(scored[0, start:], steps, rtol=1e-4, atol=1e-5)
    else:  # the flags changed the reply: compare up to the first changed token
        n = int((gen.sequences[0, start:] != reply).int().argmax())
        steps = torch.stack([torch.log_softmax(s[0], -1)[t] for s, t in zip(gen.logits[:n], reply[:n])])
        torch.testing.assert_close(scored[0, start:start + n], steps, rtol=1e-4, atol=1e-5)
    assert mask[0, start:].all()
