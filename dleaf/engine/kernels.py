"""Eager attention as transformers computes it, with every argument transformers' eager attention functions honour.

A method must see the post-softmax weights of the layers it watches, so those layers run eager attention here. The
arguments transformers' own eager functions (``eager_attention_forward`` in each model file) honour are honoured the
same way: ``scaling``, ``dropout``, ``softcap`` (Gemma-2 based models: ``tanh`` capping of the scaled scores before
the mask) and ``s_aux`` (attention sinks: one extra logit per head, in the softmax and dropped after it). Arguments
that eager attention ignores (the mask already carries a sliding window; ``position_ids`` and flash-attention's
packing arguments are read elsewhere) are ignored. Any other argument with a value is refused with an error that
names it (:func:`check_arguments`), and the first call of each attention class is checked against the model's own
eager function (:func:`verify_against_model`), so a model whose attention does something this module does not
reproduce is refused instead of decoded silently wrong.
"""

from __future__ import annotations

import sys

import torch

#: Keyword arguments of the attention interface that the engine reproduces.
HONOURED = ("softcap", "s_aux")

#: Keyword arguments that transformers' eager attention functions receive and ignore (the mask already encodes a
#: sliding window; the others are read by the model, by flash attention or by sdpa only), besides the ``output_*``
#: flags.
IGNORED = frozenset({
    "sliding_window", "position_ids", "output_attentions", "output_hidden_states", "use_cache", "cache_position",
    "is_causal", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "return_dict", "token_type_ids",
    "mm_token_type_ids", "layer_idx", "layer_type", "logits_to_keep", "block_sequence_ids", "target_dtype",
    "attention_type", "cache", "past_key_values", "s_aux_scaling", "kwargs",
})


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * groups, T, D), each key/value head repeated for its query heads."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def check_arguments(kwargs: dict, owner: str) -> None:
    """Refuse attention arguments the engine does not reproduce (any with a value that is neither honoured nor
    ignored by eager attention), with an error naming them and the model."""
    unknown = sorted(k for k, v in kwargs.items()
                     if v is not None and k not in HONOURED and k not in IGNORED and not k.startswith("output_"))
    if unknown:
        raise NotImplementedError(
            f"{owner}: its attention passes {', '.join(unknown)}, which the D-LEAF engine does not reproduce; this "
            "model is not supported (the engine honours scaling, dropout, softcap and attention sinks)")


def softmax_scores(scores: torch.Tensor, attention_mask, scaling: float, pre_softmax=None, softcap=None,
                   sinks=None) -> torch.Tensor:
    """Eager attention's step from ``query @ key^T`` (B, H, Q, K) to the weights: scale, cap (``softcap``: ``c
    tanh(s / c)``), add the mask (cut to the keys), the optional ``pre_softmax`` edit, softmax in float32 and back
    to the dtype of the scores. With attention ``sinks`` (H,), one logit per head joins the softmax (after
    subtracting the row maximum, in the scores' dtype, as transformers' eager attention with sinks does) and is
    dropped after it: the weights of a row then sum to less than one."""
    dtype = scores.dtype
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : scores.shape[-1]]
    if pre_softmax is not None:
        scores = pre_softmax(scores)
    if sinks is None:
        return torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    b, _, q, _ = scores.shape
    sink = sinks.reshape(1, -1, 1, 1).expand(b, -1, q, -1).to(scores.dtype)
    combined = torch.cat([scores, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return torch.nn.functional.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(dtype)


def eager_weights(module, query, key, attention_mask, scaling, pre_softmax=None, softcap=None, sinks=None):
    """Post-softmax attention weights (B, H, Q, K) exactly as transformers' eager attention computes them."""
    k = repeat_kv(key, getattr(module, "num_key_value_groups", 1))
    return softmax_scores(torch.matmul(query, k.transpose(2, 3)), attention_mask, scaling, pre_softmax, softcap,
                          sinks)


def plain_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, sinks=None):
    """Eager attention: ``(output (B, Q, H, D), weights (B, H, Q, K))``, as the model's own eager function."""
    weights = eager_weights(module, query, key, attention_mask, scaling, softcap=softcap, sinks=sinks)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    v = repeat_kv(value, getattr(module, "num_key_value_groups", 1))
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights


def plain_sdpa(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' sdpa attention (for the rows and layers a method leaves alone, when speed is preferred)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def model_eager_function(module):
    """The model's own eager attention function (``eager_attention_forward`` of the module's model file), or None."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def verify_against_model(module, query, key, value, attention_mask, scaling, kwargs: dict, owner: str) -> None:
    """Check, on a real call, that :func:`plain_eager` reproduces the model's own eager attention function (when the
    model file has one); refuse the model with an error naming the difference otherwise."""
    own = model_eager_function(module)
    if own is None:
        return
    with torch.no_grad():
        ours, _ = plain_eager(module, query, key, value, attention_mask, scaling, 0.0, kwargs.get("softcap"),
                              kwargs.get("s_aux"))
        extra = {k: v for k, v in kwargs.items() if k != "dropout"}
        try:
            theirs, _ = own(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **extra)
        except TypeError:  # a signature the engine does not know: the argument check already ran
            return
    tol = 1e-5 if ours.dtype in (torch.float32, torch.float64) else 2e-2
    if ours.shape != theirs.shape or not torch.allclose(ours.float(), theirs.float(), atol=tol, rtol=tol):
        diff = (ours.float() - theirs.float()).abs().max().item() if ours.shape == theirs.shape else float("nan")
        raise NotImplementedError(
            f"{owner}: the D-LEAF engine's eager attention does not reproduce {type(module).__name__}'s own "
            f"(largest difference {diff:.3g}); this model's attention does something the engine does not "
            "support, so it is refused")
