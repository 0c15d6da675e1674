"""Teacher-forced scoring: one pass equals step-by-step decoding; PromptCache equals one pass; what is refused."""

import pytest
import torch

from dleaf import engine

import model_families
from margins import (FLAG_MARGIN, assert_margin, assert_same_decisions, decisions, sharpen_attention,
                     spin_selection_gap)

GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
STRONG = dict(gamma=1.0, warmup=1, kappa=0.0)  # flags often on an untrained model


@pytest.fixture()
def tiny(organism_batch):
    """The tiny organism (3 layers, 4 heads, eager) and a left-padded batch of three prompts."""
    return organism_batch


@pytest.fixture()
def sharp(sharp_organism_batch):
    """The tiny organism with sharpened attention and the same batch: the tests that compare the methods' discrete
    decisions (D-LEAF's flags, SPIN's kept heads) along two paths need each decided by a clear margin, which the
    plain one's near-uniform attention does not give (tests/margins.py)."""
    return sharp_organism_batch


@torch.no_grad()
@pytest.mark.parametrize("method,knobs", [("dleaf", STRONG), ("dleaf", dict(STRONG, layer_signal="mass_deficit",
                                                                            threshold="best", iaf_variant="focus")),
                                          ("pai", {"alpha": 0.5, "layer_start": 0}), ("spin", {"keep_ratio": 0.5})])
def test_teacher_forced_scoring_equals_step_by_step_decoding(sharp, method, knobs):
    model, _, _, _, batch = sharp
    n = batch["input_ids"].shape[1]
    with engine.attached(model, method, trace=method == "dleaf", **knobs) as iv:
        out = model.generate(**batch, max_new_tokens=10, **GEN)
        steps = len(iv.trace.steps) if iv.trace is not None else 0
        full = {**batch, "input_ids": out.sequences,
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, n:])], 1)}
        scored, mask = engine.response_logprobs(model, full, [n] * out.sequences.shape[0], iv)
    plain_scored, _ = engine.response_logprobs(model, full, [n] * out.sequences.shape[0])
    stepwise = torch.stack([torch.log_softmax(l.float(), -1).gather(-1, out.sequences[:, n + i, None])[:, 0]
                            for i, l in enumerate(out.logits)], 1)
    if method == "dleaf":  # the same layers flagged and heads chosen along both paths, none by rounding
        decisive = [set(range(n - 1, n + 9))] * 3  # the rows that predict the ten decoded tokens
        flags = {"step by step": decisions(iv.trace.steps[:steps], decisive),
                 "one pass": decisions(iv.trace.steps[steps:], decisive)}
        assert_same_decisions(flags)
        assert min(assert_margin(f, FLAG_MARGIN) for f in flags.values()) >= FLAG_MARGIN
    if method == "spin":
        spin_selection_gap(model, full, knobs, n - 1)
    assert mask[:, n:].all() and not mask[:, :n].any()
    torch.testing.assert_close(scored[:, n:], stepwise, atol=1e-5, rtol=1e-5)
    assert (scored - plain_scored).abs().max() > 1e-4  # the method did act in scoring


@torch.no_grad()
def test_scoring_rejects_mismatched_or_out_of_range_response_starts(tiny):
    model, _, _, _, batch = tiny
    n = batch["input_ids"].shape[1]
    with engine.attached(model, "dleaf") as iv:
        with pytest.raises(ValueError, match="2 entries for a batch of 3"):
            engine.response_logprobs(model, batch, [n - 1, n - 1], iv)
        with pytest.raises(ValueError, match="must lie in"):
            engine.response_logprobs(model, batch, [0, n - 1, n - 1], iv)
    with pytest.raises(ValueError, match="detached"):
        engine.response_logprobs(model, batch, [n - 1] * 3, iv)


def _responses(model, batch, length=9):
    """Responses that D-LEAF itself decoded, one of them right-padded (the tests that compare flags along two paths
    check that each of them is decided by a clear margin)."""
    n = batch["input_ids"].shape[1]
    with engine.attached(model, "dleaf", **STRONG):
        response = model.generate(**batch, max_new_tokens=length, min_new_tokens=length, do_sample=False)[:, n:]
    mask = torch.ones_like(response)
    mask[1, length - 3:] = 0
    full = {**batch, "input_ids": torch.cat([batch["input_ids"], response], 1),
            "attention_mask": torch.cat([batch["attention_mask"], mask], 1)}
    return response, mask, full


@torch.no_grad()
@pytest.mark.parametrize("method,knobs", [("dleaf", STRONG), ("pai", {"alpha": 0.5, "layer_start": 0}),
                                          ("spin", {"keep_ratio": 0.5}), (None, {})])
def test_prompt_cache_scoring_equals_one_pass_and_step_by_step_scoring(sharp, method, knobs):
    model, _, _, _, batch = sharp
    n = batch["input_ids"].shape[1]
    response, mask, full = _responses(model, batch)
    decisive = [{n - 1 + j for j in range(mask.shape[1]) if mask[b, j]} for b in range(3)]  # rows predicting replies
    plain, _ = engine.response_logprobs(model, full, [n] * 3)
    with engine.attached(model, method, trace=method == "dleaf", **knobs) as iv:
        prompt = engine.PromptCache(model, batch)  # made with the intervention attached: it is set aside meanwhile
        assert prompt.cache.get_seq_length() == n - 1
        ref, ref_mask = engine.response_logprobs(model, full, [n] * 3, iv)
        ref_trace = iv.trace.sample(0) if iv is not None and iv.trace is not None else None
        ref_flags = decisions(iv.trace, decisive) if ref_trace is not None else None
    with engine.attached(model, method, trace=method == "dleaf", **knobs) as iv:  # a fresh trace
        once = engine.cached_response_logprobs(prompt, response, mask, iv)
        once_trace = iv.trace.sample(0) if ref_trace is not None else None
        once_steps = len(iv.trace.steps) if ref_trace is not None else 0
        again = engine.cached_response_logprobs(prompt, response, mask, iv)
        steps_from = len(iv.trace.steps) if ref_trace is not None else 0
        steps = engine.cached_stepwise_logprobs(prompt, response, mask, iv)
    if ref_flags is not None:  # every flag and head choice of the three scorers the same, none by rounding
        flags = {"one pass": ref_flags, "cached": decisions(iv.trace.steps[:once_steps], decisive),
                 "cached step by step": decisions(iv.trace.steps[steps_from:], decisive)}
        assert_same_decisions(flags)
        assert min(assert_margin(f, FLAG_MARGIN) for f in flags.values()) >= FLAG_MARGIN
    if method == "spin":
        spin_selection_gap(model, full, knobs, n - 1)
    assert prompt.cache.get_seq_length() == n - 1  # cropped back after every call
    assert torch.equal(ref_mask[:, n:], mask.bool())
    torch.testing.assert_close(once, ref[:, n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps, ref[:, n:], atol=1e-5, rtol=1e-5)
    assert torch.equal(again, once) and (once[mask == 0] == 0).all()
    if method is not None:
        assert (ref - plain).abs().max() > 1e-4  # the method acted, and the cached scorers reproduce it
    if ref_trace is not None:  # the same rows flagged and heads corrected
        assert torch.equal(once_trace["positions"], ref_trace["positions"])
        assert torch.equal(once_trace["flag"], ref_trace["flag"]) and ref_trace["flag"].any()
        assert torch.equal(once_trace["corrected"], ref_trace["corrected"])


@torch.no_grad()
def test_prompt_cache_on_llava_next_with_ragged_image_tokens():
    # sharpened: the random model's flags lie within one float32 rounding step of their thresholds
    model, inputs = model_families.llava_next()
    sharpen_attention(model, 8.0)
    n = inputs["input_ids"].shape[1]
    response = torch.randint(5, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], response], 1),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(response)], 1)}
    decisive = [set(range(n - 1, n + 5))] * 2
    prompt = engine.PromptCache(model, inputs)
    with engine.attached(model, "dleaf", trace=True, **STRONG) as iv:
        ref, _ = engine.response_logprobs(model, full, [n, n], iv)
    decided = {"one pass": decisions(iv.trace, decisive)}
    with engine.attached(model, "dleaf", trace=True, **STRONG) as iv:
        once = engine.cached_response_logprobs(prompt, response, intervention=iv)
        first = len(iv.trace.steps)
        steps = engine.cached_stepwise_logprobs(prompt, response, intervention=iv)
    decided.update({"cached": decisions(iv.trace.steps[:first], decisive),
                    "cached step by step": decisions(iv.trace.steps[first:], decisive)})
    assert_same_decisions(decided)  # every flag and head choice the same, none decided by rounding
    assert min(assert_margin(d, FLAG_MARGIN) for d in decided.values()) >= FLAG_MARGIN
    plain, _ = engine.response_logprobs(model, full, [n, n])
    torch.testing.assert_close(once, ref[:, n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps, ref[:, n:], atol=1e-5, rtol=1e-5)
    assert (plain - ref).abs().max() > 1e-5  # D-LEAF acted


@torch.no_grad()
def test_prompt_cache_refuses_what_it_cannot_score_right(tiny):
    model, _, _, _, batch = tiny
    response, mask, _ = _responses(model, batch)
    prompt = engine.PromptCache(model, batch)
    with pytest.raises(ValueError, match=r"response must have shape \(3, length >= 1\)"):
        engine.cached_response_logprobs(prompt, response[:2])
    with pytest.raises(ValueError, match="response_mask has shape"):
        engine.cached_response_logprobs(prompt, response, mask[:, :2])
    with engine.attached(model, "dleaf") as iv:
        with pytest.raises(ValueError, match="pass it to the cached scorer"):
            engine.cached_response_logprobs(prompt, response)
    with pytest.raises(ValueError, match="not the one attached"):
        engine.cached_stepwise_logprobs(prompt, response, intervention=iv)
    assert prompt.cache.get_seq_length() == batch["input_ids"].shape[1] - 1
    image = engine.image_token_id(model)
    ends_in_image = {**batch, "input_ids": torch.cat([batch["input_ids"][:, :-1],
                                                      torch.full_like(batch["input_ids"][:, :1], image)], 1)}
    with pytest.raises(ValueError, match="ends with an image token"):
        engine.PromptCache(model, ends_in_image)
    with pytest.raises(ValueError, match="length >= 2"):
        engine.PromptCache(model, {"input_ids": batch["input_ids"][:, :1]})
    qwen, inputs = model_families.qwen2_vl()
    with pytest.raises(ValueError, match="M-RoPE"):
        engine.PromptCache(qwen, inputs)


def _text_model():
    """A tiny Llama whose token 7 stands for image tokens (built in a fraction of a second)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.image_token_id = 7
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    return model


@torch.no_grad()
def test_scoring_edges_against_the_plain_model_by_hand():
    """Against log_softmax of the plain model's own logits: a response starting right after a one-token prompt
    (response_start 1), an empty response (response_start = length), a two-token PromptCache without an attention
    mask and a one-token response; a response_start past the end is refused."""
    model = _text_model()
    ids = torch.tensor([[7, 9, 12, 30, 5], [7, 10, 11, 4, 20]])
    by_hand = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    logp, mask = engine.response_logprobs(model, {"input_ids": ids}, [1, 5])
    assert mask.tolist() == [[False] + [True] * 4, [False] * 5]
    torch.testing.assert_close(logp[0, 1:], by_hand[0], atol=1e-6, rtol=1e-6)
    assert (logp[1] == 0).all() and (logp[0, 0] == 0)
    with pytest.raises(ValueError, match=r"must lie in \[1, 5\]"):
        engine.response_logprobs(model, {"input_ids": ids}, [1, 6])
    prompt = engine.PromptCache(model, {"input_ids": ids[:, :2]})
    assert prompt.batch_size == 2 and prompt.cache.get_seq_length() == 1
    for scorer in (engine.cached_response_logprobs, engine.cached_stepwise_logprobs):
        one = scorer(prompt, ids[:, 2:3])
        torch.testing.assert_close(one, by_hand[:, 1:2], atol=1e-5, rtol=1e-5)
        assert prompt.cache.get_seq_length() == 1  # cropped back to the prompt
        rest = scorer(prompt, ids[:, 2:])
        torch.testing.assert_close(rest, by_hand[:, 1:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_what_the_scorers_ask_of_the_model():
    """response_logprobs runs without a cache; the prompt pass of a PromptCache asks for the last position's logits
    only (a real prompt holds hundreds of image tokens), and the cached scorers ask for the cache; a scoring call
    that is refused leaves the cache as it was."""
    model = _text_model()
    seen = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs.get("use_cache"),
                                                                                  out.logits.shape[1])),
                                       with_kwargs=True)
    ids = torch.tensor([[7, 9, 12, 30, 5]])
    try:
        engine.response_logprobs(model, {"input_ids": ids}, [3])
        with engine.attached(model, "dleaf") as iv:
            engine.response_logprobs(model, {"input_ids": ids}, [3], iv)
        assert seen == [(False, 5), (False, 5)]
        prompt = engine.PromptCache(model, {"input_ids": ids[:, :3]})
        assert seen[-1] == (True, 1)
        # the cached scorers extend the prompt's cache: every call they make asks for it
        n_before = len(seen)
        engine.cached_response_logprobs(prompt, ids[:, 3:])
        engine.cached_stepwise_logprobs(prompt, ids[:, 3:])
        assert len(seen) > n_before and all(use for use, _ in seen[n_before:])
    finally:
        hook.remove()
    with engine.attached(model, "vcd") as iv:
        with pytest.raises(NotImplementedError, match="acts in generate only"):
            engine.cached_response_logprobs(prompt, ids[:, 3:], intervention=iv)
    assert prompt.cache.get_seq_length() == 2
    torch.testing.assert_close(engine.cached_response_logprobs(prompt, ids[:, 3:]),
                               engine.response_logprobs(model, {"input_ids": ids}, [3])[0][:, 3:])


def test_prompt_cache_rewind_leaves_a_cache_at_the_prompt_alone():
    """Rewinding a cache that holds exactly the prompt leaves it as it is, and scoring after it still equals one
    pass."""
    model = _text_model()
    ids = torch.tensor([[7, 9, 12, 30, 5]])
    prompt = engine.PromptCache(model, {"input_ids": ids[:, :3]})
    prompt._rewind()
    assert prompt.cache.get_seq_length() == 2
    torch.testing.assert_close(engine.cached_response_logprobs(prompt, ids[:, 3:]),
                               engine.response_logprobs(model, {"input_ids": ids}, [3])[0][:, 3:])


def test_prompt_cache_refuses_a_model_that_returns_no_croppable_cache():
    model = _text_model()
    ids = torch.tensor([[7, 9, 12]])

    class NoCache(type(model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.past_key_values = None
            return out

    class Uncroppable(type(model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.past_key_values = object()
            return out

    for cls in (NoCache, Uncroppable):
        model.__class__ = cls
        with pytest.raises(RuntimeError, match=f"{cls.__name__} returned no croppable key/value cache"):
            engine.PromptCache(model, {"input_ids": ids})
