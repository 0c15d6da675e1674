"""The engine's eager attention against transformers' own eager functions (softcap, sinks), and what it refuses."""

import math

import pytest
import torch

from dleaf.engine import kernels


def test_softcap_and_sinks_in_the_kernel_equal_transformers_eager():
    """The engine's eager weights against transformers' Gemma-2 (softcap) and GPT-OSS (sinks) eager functions."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) * 3 for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))

    class Module(torch.nn.Module):
        num_key_value_groups, head_dim = 1, 8

    module = Module().eval()
    module.sinks = torch.randn(4, generator=g)
    for theirs, kwargs in [(gemma2_eager(module, q, k, v, mask, scaling=0.3, softcap=2.0), {"softcap": 2.0}),
                           (gpt_oss_eager(module, q, k, v, mask, scaling=0.3), {"sinks": module.sinks})]:
        ours = kernels.plain_eager(module, q, k, v, mask, 0.3, **kwargs)
        torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours[1], theirs[1], atol=1e-6, rtol=1e-6)
    plain = kernels.plain_eager(module, q, k, v, mask, 0.3)[0]
    assert (plain - gemma2_eager(module, q, k, v, mask, scaling=0.3, softcap=2.0)[0]).abs().max() > 1e-3


def test_unknown_attention_arguments_are_refused():
    with pytest.raises(NotImplementedError, match="position_bias"):
        kernels.check_arguments({"position_bias": torch.zeros(1), "sliding_window": 4, "softcap": None}, "T5ish")
    kernels.check_arguments({"sliding_window": 4, "position_ids": torch.zeros(1), "softcap": 1.0, "s_aux": None}, "x")


def test_a_model_whose_attention_differs_from_the_engine_kernel_is_refused():
    """The first call of an attention class is checked against the model file's own eager function."""

    class Odd(torch.nn.Module):
        num_key_value_groups = 1

    module = Odd().eval()
    Odd.__module__ = __name__
    q = k = v = torch.randn(1, 2, 3, 4)
    globals()["eager_attention_forward"] = lambda m, q, k, v, mask, scaling, dropout=0.0, **kw: (
        kernels.plain_eager(m, q, k, v, mask, scaling * 2)[0], None)
    try:
        with pytest.raises(NotImplementedError, match="does not reproduce"):
            kernels.verify_against_model(module, q, k, v, None, 0.5, {}, "OddModel")
    finally:
        del globals()["eager_attention_forward"]
    kernels.verify_against_model(module, q, k, v, None, 0.5, {}, "OddModel")  # no model function: nothing to check


def _brute_force_attention(q, k, v, mask, scaling, groups):
    """Eager attention by loops: query head h reads key/value head h // groups; the mask's first K columns apply."""
    B, H, Q, D = q.shape
    K = k.shape[2]
    out = torch.zeros(B, Q, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                s = [float(q[b, h, i] @ k[b, h // groups, j]) * scaling + float(mask[b, 0, i, j]) for j in range(K)]
                top = max(s)
                e = [math.exp(x - top) for x in s]
                out[b, i, h] = sum(e[j] / sum(e) * v[b, h // groups, j].double() for j in range(K))
    return out


def test_grouped_query_attention_and_a_mask_wider_than_the_keys_against_loops():
    """Two query heads per key/value head, fewer query rows than keys, and a mask wider than the keys (a static cache
    gives a mask over every preallocated slot); a module without ``num_key_value_groups`` has one query head per
    key/value head. The output is checked against :func:`_brute_force_attention`; the sdpa path agrees."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 3, 8, generator=g)
    k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.zeros(2, 1, 3, 7)
    mask[0, :, :, 0] = float("-inf")  # a left-padded key
    mask[:, :, 0, 4] = float("-inf")  # a causal cut on the first row
    mask[:, :, :, 5:] = float("-inf")  # slots beyond the keys

    class Grouped(torch.nn.Module):
        num_key_value_groups = 2

    module = Grouped().eval()
    out, weights = kernels.plain_eager(module, q, k, v, mask, 0.4)
    torch.testing.assert_close(out.double(), _brute_force_attention(q, k, v, mask, 0.4, 2), atol=1e-5, rtol=1e-5)
    assert weights.shape == (2, 4, 3, 5) and float(weights[0, :, :, 0].abs().max()) == 0.0
    sdpa, _ = kernels.plain_sdpa(module, q, k, v, mask[..., :5], 0.4)  # no dropout unless asked
    torch.testing.assert_close(sdpa, out, atol=1e-5, rtol=1e-5)
    module.train()  # dropout applies only when asked for, and only in training
    torch.testing.assert_close(kernels.plain_eager(module, q, k, v, mask, 0.4)[0], out, atol=0, rtol=0)
    assert float(kernels.plain_eager(module, q, k, v, mask, 0.4, dropout=1.0)[0].abs().max()) == 0.0
    kv = torch.randn(2, 4, 5, 8, generator=g)
    torch.testing.assert_close(kernels.plain_eager(torch.nn.Module().eval(), q, kv, kv, mask, 0.4)[0].double(),
                               _brute_force_attention(q, kv, kv, mask, 0.4, 1), atol=1e-5, rtol=1e-5)


def test_verification_uses_each_dtype_tolerance_and_names_the_difference():
    """A model function 0.001 off is refused in float32 (tolerance 1e-5), with the difference in the message; in
    bfloat16 (tolerance 2e-2) it passes, and 0.2 off is refused."""

    class Shifted(torch.nn.Module):
        num_key_value_groups = 1

    Shifted.__module__ = __name__
    module = Shifted().eval()
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g) for _ in range(3))
    shift = {"value": 1e-3}
    globals()["eager_attention_forward"] = lambda m, q, k, v, mask, scaling, dropout=0.0, **kw: (
        kernels.plain_eager(m, q, k, v, mask, scaling)[0] + shift["value"], None)
    try:
        with pytest.raises(NotImplementedError, match=r"largest difference 0\.001\b"):
            kernels.verify_against_model(module, q, k, v, None, 0.5, {}, "ShiftedModel")
        low = [t.to(torch.bfloat16) for t in (q, k, v)]
        kernels.verify_against_model(module, *low, None, 0.5, {}, "ShiftedModel")
        shift["value"] = 0.2
        with pytest.raises(NotImplementedError, match="ShiftedModel"):
            kernels.verify_against_model(module, *low, None, 0.5, {}, "ShiftedModel")
    finally:
        del globals()["eager_attention_forward"]


def test_verification_passes_the_models_own_arguments_to_its_function():
    """A real Gemma-2 attention module checked with its softcap, and a GPT-OSS one with its sinks: the engine's kernel
    reproduces each model function when that function gets the same arguments (softcap must reach it)."""
    from transformers import Gemma2Config, GptOssConfig
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention

    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 8, generator=g) * 4
    k, v = torch.randn(2, 2, 5, 8, generator=g) * 4, torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.zeros(2, 1, 5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    gemma = Gemma2Attention(Gemma2Config(**shape, attn_logit_softcapping=2.0, query_pre_attn_scalar=8), 0).eval()
    kernels.verify_against_model(gemma, q, k, v, mask, 0.35, {"softcap": 2.0, "sliding_window": None}, "Gemma2")
    oss = GptOssAttention(GptOssConfig(**shape, num_local_experts=2, num_experts_per_tok=1), 0).eval()
    with torch.no_grad():
        oss.sinks.normal_(0, 2.0)
    kernels.verify_against_model(oss, q, k, v, mask, 0.35, {"s_aux": oss.sinks}, "GptOss")
