"""The intervention: attach and detach, the sequence and its state (left padding, the batch moving under beam search),
the kernels a method leaves alone, and the step never waiting for the device."""

import copy

import pytest
import torch

from dleaf import engine
from margins import FLAG_MARGIN, GREEDY_GAP, assert_greedy_gap, assert_margin, assert_same_decisions, decisions

GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
STRONG = dict(gamma=1.0, warmup=1, kappa=0.0)  # flags often on an untrained model


@pytest.fixture()
def tiny(organism_batch):
    """The tiny organism (3 layers, 4 heads, eager) and a left-padded batch of three prompts."""
    return organism_batch


@pytest.fixture()
def sharp(sharp_organism_batch):
    """The tiny organism with sharpened attention and the same batch: for the tests that compare D-LEAF's flags,
    head choices and greedy tokens along two numerically different paths, each decided by a clear margin (the plain
    organism's are decided by rounding; tests/margins.py)."""
    return sharp_organism_batch


def _same_logits(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@torch.no_grad()
def test_detach_leaves_the_model_exactly_as_it_was(tiny):
    model, _, _, _, batch = tiny
    before = model(**batch).logits
    impl = model.config.text_config._attn_implementation
    vision_impl = model.config.vision_config._attn_implementation
    iv = engine.attach(model, "dleaf", **STRONG)
    assert model.config.text_config._attn_implementation == engine.ATTENTION_NAME
    assert model.config.vision_config._attn_implementation == vision_impl  # the vision tower is never touched
    with pytest.raises(RuntimeError, match="already has"):
        engine.attach(model, "pai")
    iv.detach()
    assert model.config.text_config._attn_implementation == impl
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not engine.attached_interventions()
    assert torch.equal(model(**batch).logits, before)


@torch.no_grad()
def test_batch_with_padding_equals_each_sample_alone(sharp, make_batch):
    model, processor, scenes, prompts, batch = sharp
    n = batch["input_ids"].shape[1]
    with engine.attached(model, "dleaf", trace=True, **STRONG) as iv:
        together = model.generate(**batch, max_new_tokens=8, **GEN)
    assert_greedy_gap(together.logits, GREEDY_GAP)
    both = decisions(iv.trace)
    assert assert_margin(both, FLAG_MARGIN) >= FLAG_MARGIN
    for i in range(len(scenes)):
        one = make_batch(processor, scenes[i:i + 1], prompts[i:i + 1])
        with engine.attached(model, "dleaf", trace=True, **STRONG) as iv:
            alone = model.generate(**one, max_new_tokens=8, **GEN)
        m = one["input_ids"].shape[1]
        assert assert_margin(decisions(iv.trace), FLAG_MARGIN) >= FLAG_MARGIN
        assert_same_decisions({"together": {(0, k[1] - n, *k[2:]): v for k, v in both.items() if k[0] == i},
                               "alone": {(0, k[1] - m, *k[2:]): v for k, v in decisions(iv.trace).items()}})
        assert torch.equal(alone.sequences[0, m:], together.sequences[i, n:])
        for a, b in zip(alone.logits, together.logits):
            torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_state_follows_a_beam_style_cache_reordering(sharp, make_batch):
    """Start with the batch in one order, swap the two cache rows before the first decoding step (as beam search
    reorders them): every later step must equal decoding the batch in the other order from the start."""
    model, processor, scenes, prompts, _ = sharp

    def run(order, swap_after):
        batch = make_batch(processor, [scenes[i] for i in order], [prompts[i] for i in order])
        with engine.attached(model, "dleaf", trace=True, **STRONG) as iv:
            out = model(**batch, use_cache=True)
            cache, mask = out.cache, batch["attention_mask"]
            logits, chosen_from = [], []
            for step in range(6):
                chosen_from.append(out.logits[:, -1])
                nxt = out.logits[:, -1].argmax(-1)
                if step == swap_after:
                    cache.reorder_cache(torch.tensor([1, 0]))
                    nxt, mask = nxt.flip(0), mask.flip(0)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out = model(input_ids=nxt[:, None], attention_mask=mask, cache=cache, use_cache=True)
                logits.append(out.logits[:, -1])
        assert_greedy_gap(chosen_from, GREEDY_GAP)  # the tokens fed back are no near-tie
        assert assert_margin(decisions(iv.trace), FLAG_MARGIN) >= FLAG_MARGIN
        return torch.stack(logits, 1), iv

    straight, iv_straight = run([0, 2], swap_after=None)
    swapped, iv_swapped = run([2, 0], swap_after=0)
    torch.testing.assert_close(swapped, straight, atol=1e-5, rtol=1e-5)
    for i in range(2):
        assert torch.equal(iv_swapped.trace.sample(i)["flag"], iv_straight.trace.sample(i)["flag"])


@torch.no_grad()
def test_a_sample_without_image_tokens_is_an_error(tiny):
    model, processor, _, _, _ = tiny
    ids = processor.tokenizer(["describe the image ."], return_tensors="pt")
    with engine.attached(model, "dleaf"), pytest.raises(ValueError, match="no image token"):
        model(**ids)


def test_layer_range_must_fit_the_model(tiny):
    model = tiny[0]
    with pytest.raises(ValueError, match="does not fit"):
        engine.attach(model, "dleaf", layer_start=1, layer_end=9)
    assert not engine.attached_interventions()


SYNCING_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"}  # .item(), bool(), int(), ...


@torch.no_grad()
@pytest.mark.parametrize("method,knobs", [
    ("dleaf", {}), ("dleaf", STRONG), ("dleaf", dict(STRONG, unwatched="sdpa")),
    ("dleaf", dict(layer_signal="mass_deficit", threshold="best", iaf_variant="focus", head_selection="bottom_k")),
    ("dleaf", dict(localization="random", fusion_target="random")), ("pai", {}), ("spin", {})])
def test_a_decoding_step_never_waits_for_the_device(tiny, method, knobs):
    """No operator that copies a tensor value to the host (``.item()``, ``bool()``, ``nonzero``) in a cached
    decoding step of a left-padded batch, beam-style reordering check included: on a GPU the step stays
    asynchronous (a trace, a diagnostic, copies its records to the CPU and is left out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model, _, _, _, batch = tiny
    with engine.attached(model, method, **knobs):
        out = model(**batch, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        mask = batch["attention_mask"]
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(2):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            with Ops():
                out = model(input_ids=token, attention_mask=mask, use_cache=True,
                            **{engine.cache_kwarg(model): cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    assert "lerp_" in Ops.seen or method != "dleaf"  # the mode saw the engine's work
    assert not Ops.seen & SYNCING_OPS, sorted(Ops.seen & SYNCING_OPS)


@torch.no_grad()
def test_fast_unwatched_path_agrees_with_the_exact_one(sharp):
    model, _, _, _, batch = sharp
    with engine.attached(model, "dleaf", layer_start=1, layer_end=2, trace=True, **STRONG) as iv:
        exact = model.generate(**batch, max_new_tokens=8, **GEN)
        decided = {"exact": decisions(iv.trace)}
    with engine.attached(model, "dleaf", layer_start=1, layer_end=2, unwatched="sdpa", trace=True, **STRONG) as iv:
        fast = model.generate(**batch, max_new_tokens=8, **GEN)
        decided["fast"] = decisions(iv.trace)
    # the flags, head choices and tokens compared decided by a clear margin (for the tokens: five times the 1e-4 to
    # which the logits are required to agree)
    assert min(assert_margin(d, FLAG_MARGIN) for d in decided.values()) >= FLAG_MARGIN
    assert_same_decisions(decided)
    assert_greedy_gap(exact.logits, 5e-4)
    assert torch.equal(exact.sequences, fast.sequences)
    for a, b in zip(exact.logits, fast.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_unwatched_auto_follows_the_model_attention(tiny):
    model, _, _, _, batch = tiny
    assert [engine.resolve_unwatched("auto", i) for i in ("eager", None, "sdpa", "flash_attention_2")] == \
        ["eager", "eager", "sdpa", "sdpa"]
    assert engine.resolve_unwatched("eager", "sdpa") == "eager" and engine.resolve_unwatched("sdpa", "eager") == "sdpa"
    knobs = dict(layer_start=1, layer_end=2, **STRONG)
    with engine.attached(model, "dleaf", **knobs) as iv:
        assert iv.unwatched == "eager"  # the tiny organism is loaded with eager attention
    with engine.attached(model, "dleaf", unwatched="sdpa", **knobs):
        explicit = model.generate(**batch, max_new_tokens=6, **GEN)
    impl = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "sdpa"})
    try:
        with engine.attached(model, "dleaf", **knobs) as iv:
            assert iv.unwatched == "sdpa"
            auto = model.generate(**batch, max_new_tokens=6, **GEN)
        assert model.config.text_config._attn_implementation == "sdpa"  # restored on detach
    finally:
        model.set_attn_implementation({"text_config": impl})
    assert torch.equal(auto.sequences, explicit.sequences) and _same_logits(auto.logits, explicit.logits)
    with pytest.raises(ValueError, match="unwatched must be 'auto'"):
        engine.attach(model, "dleaf", unwatched="flash")


@torch.no_grad()
def test_generation_kwargs_of_attention_methods_and_of_nothing_attached(tiny):
    """Methods acting inside the attention need nothing extra in generate; None (plain decoding) neither; a detached
    intervention is an error, not a silent no-op."""
    model, _, _, _, batch = tiny
    assert engine.generation_kwargs(None, batch) == {}
    for name in ("dleaf", "pai", "spin"):
        with engine.attached(model, name) as iv:
            assert engine.generation_kwargs(iv, batch) == {}
    with pytest.raises(ValueError, match="detached"):
        engine.generation_kwargs(iv, batch)


@torch.no_grad()
def test_the_cache_tells_its_own_sequence_and_a_deep_copy_tells_nobody(tiny):
    """The engine follows the sequence's cache object (never its class): a crop back to before the first active
    position resets the running statistics exactly; a deep copy crops itself and tells nobody."""
    model, _, _, _, batch = tiny
    n = batch["input_ids"].shape[1]
    with engine.attached(model, "dleaf", **STRONG) as iv:
        cache = model(**batch, use_cache=True).cache
        assert iv.running_statistics()["count"].sum() == 3 * 3  # one active row per sample and layer
        assert "crop" in vars(cache)  # the one object is followed
        other = copy.deepcopy(cache)
        other.crop(-2)
        assert other.get_seq_length() == n - 2 and cache.get_seq_length() == n
        assert iv.running_statistics()["count"].sum() == 9  # the copy told nobody
        cache.crop(-1)  # the prompt's last row, the only active one, is gone: the statistics start over
        assert iv.running_statistics()["count"].sum() == 0
        fresh = type(cache)(config=model.config.text_config)
        assert "crop" not in vars(fresh)  # the class is untouched
