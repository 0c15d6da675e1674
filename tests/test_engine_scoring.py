"""Teacher-forced scoring: one pass equals step-by-step decoding; PromptCache equals one pass; what is refused."""

import pytest
import torch

from dleaf import engine

import model_families

GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
STRONG = dict(gamma=1.0, warmup=1, kappa=0.0)  # flags often on an untrained model


@pytest.fixture()
def tiny(organism_batch):
    """The tiny organism (3 layers, 4 heads, eager) and a left-padded batch of three prompts."""
    return organism_batch


@torch.no_grad()
@pytest.mark.parametrize("method,knobs", [("dleaf", STRONG), ("dleaf", dict(STRONG, layer_signal="mass_deficit",
                                                                            threshold="best", iaf_variant="focus")),
                                          ("pai", {"alpha": 0.5, "layer_start": 0}), ("spin", {"keep_ratio": 0.5})])
def test_teacher_forced_scoring_equals_step_by_step_decoding(tiny, method, knobs):
    model, _, _, _, batch = tiny
    n = batch["input_ids"].shape[1]
    with engine.attached(model, method, **knobs) as iv:
        out = model.generate(**batch, max_new_tokens=10, **GEN)
        full = {**batch, "input_ids": out.sequences,
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, n:])], 1)}
        scored, mask = engine.response_logprobs(model, full, [n] * out.sequences.shape[0], iv)
    plain_scored, _ = engine.response_logprobs(model, full, [n] * out.sequences.shape[0])
    stepwise = torch.stack([torch.log_softmax(l.float(), -1).gather(-1, out.sequences[:, n + i, None])[:, 0]
                            for i, l in enumerate(out.logits)], 1)
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
    """Responses that D-LEAF itself decoded (random tokens can put a layer's signal on its running threshold to the
    last float bit, where one-pass and step-by-step rounding may flag differently), one of them right-padded."""
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
def test_prompt_cache_scoring_equals_one_pass_and_step_by_step_scoring(tiny, method, knobs):
    model, _, _, _, batch = tiny
    n = batch["input_ids"].shape[1]
    response, mask, full = _responses(model, batch)
    plain, _ = engine.response_logprobs(model, full, [n] * 3)
    with engine.attached(model, method, trace=method == "dleaf", **knobs) as iv:
        prompt = engine.PromptCache(model, batch)  # made with the intervention attached: it is set aside meanwhile
        assert prompt.cache.get_seq_length() == n - 1
        ref, ref_mask = engine.response_logprobs(model, full, [n] * 3, iv)
        ref_trace = iv.trace.sample(0) if iv is not None and iv.trace is not None else None
    with engine.attached(model, method, trace=method == "dleaf", **knobs) as iv:  # a fresh trace
        once = engine.cached_response_logprobs(prompt, response, mask, iv)
        once_trace = iv.trace.sample(0) if ref_trace is not None else None
        again = engine.cached_response_logprobs(prompt, response, mask, iv)
        steps = engine.cached_stepwise_logprobs(prompt, response, mask, iv)
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
    model, inputs = model_families.llava_next()
    n = inputs["input_ids"].shape[1]
    response = torch.randint(5, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], response], 1),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(response)], 1)}
    prompt = engine.PromptCache(model, inputs)
    with engine.attached(model, "dleaf", **STRONG) as iv:
        ref, _ = engine.response_logprobs(model, full, [n, n], iv)
    with engine.attached(model, "dleaf", **STRONG) as iv:
        once = engine.cached_response_logprobs(prompt, response, intervention=iv)
        steps = engine.cached_stepwise_logprobs(prompt, response, intervention=iv)
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
