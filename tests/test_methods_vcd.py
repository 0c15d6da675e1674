"""VCD through model.generate (a logits processor from engine.generation_kwargs), against the benchmark's own
two-stream loop, and its combination against a hand-worked example."""

import math

import pytest
import torch
from transformers import GenerationConfig

from dleaf import bench, engine
from dleaf.methods import vcd
from margins import GREEDY_GAP, assert_greedy_gap


def _no_eos(model, n):
    g = model.generation_config
    return GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                            pad_token_id=g.pad_token_id, bos_token_id=g.bos_token_id)


def test_contrastive_logits_on_a_hand_worked_example():
    clean = torch.tensor([[2.0, 1.0, -3.0]])
    noised = torch.tensor([[1.0, 2.0, 0.0]])
    # (1 + 0.5) clean - 0.5 noised = [2.5, 0.5, -4.5]; p(clean) = softmax([2, 1, -3]) ~ [0.727, 0.268, 0.005]
    mixed = vcd.contrastive_logits(clean, noised, 0.5, 0.0)
    assert mixed[0].tolist() == pytest.approx([2.5, 0.5, -4.5])
    # beta 0.1 keeps tokens with p >= 0.1 * 0.727: the first two
    cut = vcd.contrastive_logits(clean, noised, 0.5, 0.1)
    assert cut[0, :2].tolist() == pytest.approx([2.5, 0.5]) and cut[0, 2] == -math.inf
    # beta 0.5: only the best token survives (0.268 < 0.364)
    assert torch.isinf(vcd.contrastive_logits(clean, noised, 0.5, 0.5)[0, 1:]).all()


def test_noised_pixels_follow_the_diffusion_schedule():
    x = torch.ones(2, 3, 4, 4)
    abar = float(torch.prod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)[:11]))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(vcd.noised_pixels(x, 10, seed=3), math.sqrt(abar) * x + math.sqrt(1 - abar) * eps)


@torch.no_grad()
def test_vcd_in_generate_equals_the_benchmark_loop_token_for_token(organism_batch):
    model, _, _, _, batch = organism_batch
    cfg = bench.BenchConfig(models=("organism",), batch_sizes=(3,), new_tokens=8, memory=False)
    bench.set_text_attention(model, "sdpa")
    try:
        # the reference: two explicit streams (image, noised image), one cached step of each per token, combined
        contrast, chosen_from = bench.contrastive_logits(cfg.vcd_alpha, cfg.vcd_beta), []
        expected, _ = bench.greedy_loop(model, [batch, bench.noised_inputs(batch, cfg)], 8,
                                        lambda logits: chosen_from.append(contrast(logits)) or chosen_from[-1])
        timed, _ = bench.run_config(model, batch, "vcd", cfg, new_tokens=8)  # the benchmark's loop, through the engine
        with engine.attached(model, "vcd", alpha=cfg.vcd_alpha, beta=cfg.vcd_beta, noise_step=cfg.vcd_noise_step,
                             seed=cfg.seed) as iv:
            out = model.generate(**batch, generation_config=_no_eos(model, 8), **engine.generation_kwargs(iv, batch))
        plain = model.generate(**batch, generation_config=_no_eos(model, 8))
    finally:
        model.set_attn_implementation("eager")
    n = batch["input_ids"].shape[1]
    # three computations of the contrast (two streams by hand, the benchmark's loop, the engine in generate): the
    # same tokens only where no greedy choice between contrasted logits is a near-tie
    assert_greedy_gap(chosen_from, GREEDY_GAP)
    assert torch.equal(out[:, n:], expected) and torch.equal(timed, expected)
    assert not torch.equal(out, plain)  # the contrast changed the greedy tokens


@torch.no_grad()
def test_vcd_at_zero_strength_is_plain_decoding_and_beam_search_follows_the_batch(organism_batch):
    model, _, _, _, batch = organism_batch
    plain = model.generate(**batch, generation_config=_no_eos(model, 6))
    with engine.attached(model, "vcd", alpha=0.0, beta=0.0) as iv:
        zero = model.generate(**batch, generation_config=_no_eos(model, 6), **engine.generation_kwargs(iv, batch))
    assert torch.equal(zero, plain)
    beams = {}
    for use_cache in (True, False):  # without a cache the noised stream is recomputed: no reordering to follow
        with engine.attached(model, "vcd") as iv:
            beams[use_cache] = model.generate(**batch, generation_config=_no_eos(model, 5), num_beams=3,
                                              use_cache=use_cache, **engine.generation_kwargs(iv, batch))
    assert torch.equal(beams[True], beams[False])


@torch.no_grad()
def test_vcd_refuses_what_it_cannot_do(organism_batch):
    model, _, _, _, batch = organism_batch
    with engine.attached(model, "vcd") as iv:
        with pytest.raises(ValueError, match="generation_kwargs"):
            model.generate(**batch, max_new_tokens=2)
        with pytest.raises(NotImplementedError, match="generate only"):
            engine.response_logprobs(model, batch, [batch["input_ids"].shape[1]] * 3, iv)
        kwargs = engine.generation_kwargs(iv, batch)
        other = {k: v[:2] for k, v in batch.items()}
        with pytest.raises(ValueError, match="not those engine.generation_kwargs was given"):
            model.generate(**other, max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match="beta"):
        vcd.VCDConfig(beta=1.0)
