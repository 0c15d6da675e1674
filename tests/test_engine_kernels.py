"""The engine's eager attention against transformers' own eager functions (softcap, sinks), and what it refuses."""

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
