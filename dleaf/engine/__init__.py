"""The attention-level engine shared by D-LEAF, PAI and SPIN (and the logits-level VCD), through transformers'
attention interface.

:func:`attach` switches a model's text attention (and only it) to an attention function registered with
``AttentionInterface`` under the name ``"dleaf"`` (its mask function registered with ``AttentionMaskInterface`` as
the eager mask), and registers a forward pre-hook and hook on the model that tell the method where each sample's
image tokens are and which query rows are generated positions. :meth:`Intervention.detach` (or leaving the ``with``
block) restores the previous attention implementation and removes the hooks: the model is left exactly as it was.
Nothing of transformers is patched or copied.

The package: :mod:`~dleaf.engine.interface` (the registered attention function, the registry of attached modules,
the model helpers), :mod:`~dleaf.engine.kernels` (eager attention with every argument transformers' eager attention
honours), :mod:`~dleaf.engine.intervention` (the intervention, its sequence and how its state follows the batch),
:mod:`~dleaf.engine.cache_events` (what ``generate`` does to the cache), :mod:`~dleaf.engine.trace` and
:mod:`~dleaf.engine.scoring` (teacher-forced scoring and :class:`PromptCache`). What each method does lives in
:mod:`dleaf.methods`, one file per method.
"""

from __future__ import annotations

import contextlib

from .interface import (ATTENTION_NAME, UNWATCHED, attached_interventions, cache_kwarg, image_token_id,
                        resolve_unwatched, text_attention_modules)
from .intervention import AttentionCall, Intervention
from .scoring import (PER_TOKEN_INPUTS, PromptCache, cached_response_logprobs, cached_stepwise_logprobs,
                      response_logprobs, token_logprobs)
from .trace import Trace

__all__ = ["ATTENTION_NAME", "UNWATCHED", "AttentionCall", "Intervention", "PER_TOKEN_INPUTS", "PromptCache", "Trace",
           "attach", "attached", "attached_interventions", "cache_kwarg", "cached_response_logprobs",
           "cached_stepwise_logprobs", "generation_kwargs", "image_token_id", "intervention_of", "resolve_unwatched",
           "response_logprobs", "text_attention_modules", "token_logprobs"]


def attach(model, method="dleaf", *, trace: bool = False, unwatched: str = "auto", compile: bool = False,
           fault=None, **knobs) -> Intervention:
    """Attach a method to ``model`` (a config object, or a method name from :func:`dleaf.config.method_names` with
    ``knobs``), and/or a fault.

    ``fault``: a :class:`dleaf.faults.FaultConfig` (or any object whose ``bind(num_layers, num_heads)`` returns a
    pre-method hook: an object with ``layers`` and ``hook(call, rows) -> rows``). In the hook's layers, the active
    attention rows are replaced by the hook's before the method sees them (:meth:`AttentionCall.weights`), so the
    method acts on the faulted attention exactly as it would on a natural one. ``method=None`` (or ``"greedy"``) with
    a fault attaches the fault alone.

    Returns the :class:`Intervention`; call its ``detach()`` or use it as a context manager. The model must be in
    eval mode for results that match plain decoding (dropout is honoured as the model's own attention does).

    ``unwatched`` chooses what runs the layers the method does not watch, and the rows it never changes (all but the
    last at prefill): ``"eager"`` (exact: zero strength reproduces plain eager decoding bit for bit), ``"sdpa"``
    (faster, equal to eager up to rounding), or ``"auto"`` (the default): eager for a model loaded with eager
    attention, sdpa for any other (:func:`resolve_unwatched`), so a model is never moved to a slower kernel on the
    layers the method leaves alone. ``compile=True`` runs the softmax and D-LEAF's per-token work of every watched layer
    (:func:`dleaf.methods.dleaf.one_row_attention`) as one compiled region per decoding step and layer: fewer operator
    dispatches, after a compilation of seconds to tens of seconds on first use; equal to the eager path up to rounding.
    """
    from ..config import method_config

    if method is None or method == "greedy":
        if knobs:
            raise ValueError(f"knobs {', '.join(sorted(knobs))} were given without a method")
        config = None
    else:
        config = method_config(method, **knobs) if isinstance(method, str) else method
    if knobs and not isinstance(method, str):
        raise ValueError("pass knobs with a method name, or a config object alone")
    return Intervention(model, config, trace=trace, unwatched=unwatched, compile=compile, fault=fault)._attach()


@contextlib.contextmanager
def attached(model, method="dleaf", **kwargs):
    """``with attached(model, "dleaf", gamma=0.5) as iv: model.generate(...)``; ``method=None`` or ``"greedy"``
    without a ``fault`` attaches nothing (plain decoding) and yields None."""
    if (method is None or method == "greedy") and kwargs.get("fault") is None:
        yield None
        return
    intervention = attach(model, method, **kwargs)
    try:
        yield intervention
    finally:
        intervention.detach()


def generation_kwargs(intervention: Intervention | None, inputs: dict) -> dict:
    """The extra keyword arguments ``model.generate(**inputs, **generation_kwargs(iv, inputs))`` needs for the method
    attached as ``intervention`` (``None``: nothing attached, plain decoding). Methods that act inside the attention
    (D-LEAF, PAI, SPIN) return ``{}``; a method that acts on the logits (VCD) returns a ``logits_processor`` (merge it
    with any list of your own). Every generation loop calls it, so any method runs through ``generate`` the same
    way."""
    if intervention is None:
        return {}
    return intervention.generation_kwargs(inputs)


def intervention_of(model) -> Intervention | None:
    """The intervention attached to ``model`` now, or None."""
    from .interface import attached_to

    return attached_to(text_attention_modules(model))


_DLEAF_FORMULAS = ("select_heads", "fuse_heads", "random_target", "causal_threshold", "flag_gate", "layer_flags",
                   "one_row_step", "one_row_attention")


def __getattr__(name: str):
    # D-LEAF's formulas, kept importable from the engine where they used to live (see dleaf.methods.dleaf)
    if name in _DLEAF_FORMULAS:
        from ..methods import dleaf as _dleaf

        return getattr(_dleaf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
