"""How the engine plugs into transformers: one attention function registered by name, and a registry of the attention
modules that are attached.

``AttentionInterface.register("dleaf", dispatch)`` (with the eager mask registered under the same name in
``AttentionMaskInterface``): a model whose text decoder is switched to ``"dleaf"`` calls :func:`dispatch` from every
attention module. The registry maps an attached module to its intervention and layer; it holds the modules and the
interventions by weak reference, so a model dropped without ``detach`` leaves nothing behind. A module that is not
attached (a copy of an attached model, say) runs plain eager attention.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from . import kernels

ATTENTION_NAME = "dleaf"

# attention module -> (weak reference to its Intervention, layer index); filled by attach, emptied by detach, and
# emptied by the garbage collector for a model dropped while attached.
_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[weakref.ref, int]]" = weakref.WeakKeyDictionary()


def register_modules(intervention, modules) -> None:
    ref = weakref.ref(intervention)
    for layer, module in enumerate(modules):
        _MODULES[module] = (ref, layer)


def unregister_modules(modules) -> None:
    for module in modules:
        _MODULES.pop(module, None)


def attached_to(modules):
    """The intervention attached to any of these attention modules, or None."""
    for module in modules:
        entry = _MODULES.get(module)
        if entry is not None and entry[0]() is not None:
            return entry[0]()
    return None


def attached_interventions() -> list:
    """Every intervention attached now (to a model still alive), once each."""
    seen = []
    for ref, _ in list(_MODULES.values()):
        iv = ref()
        if iv is not None and all(iv is not s for s in seen):
            seen.append(iv)
    return seen


def dispatch(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as ``"dleaf"``: the attached module's intervention decides; any other
    module runs plain eager attention (honouring what transformers' eager attention honours)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    entry = _MODULES.get(module)
    intervention = entry[0]() if entry is not None else None
    if intervention is None:
        kernels.check_arguments(kwargs, type(module).__name__)
        return kernels.plain_eager(module, query, key, value, attention_mask, scaling, dropout,
                                   kwargs.get("softcap"), kwargs.get("s_aux"))
    return intervention.attend(entry[1], module, query, key, value, attention_mask, scaling, dropout, kwargs)


AttentionInterface.register(ATTENTION_NAME, dispatch)
AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


# ---------------------------------------------------------------------------------------------------- the model
def text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def image_token_id(model) -> int:
    """The image placeholder token id from the model's config (``image_token_id``, or ``image_token_index``)."""
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"{type(model).__name__} has no image token id in its config (looked for config.image_token_id and "
        "config.image_token_index); D-LEAF needs it to find each sample's image-token positions"
    )


def text_attention_modules(model) -> list[torch.nn.Module]:
    """The decoder's self-attention modules, in layer order, found by their ``layer_idx``."""
    root = model.get_decoder() if hasattr(model, "get_decoder") else model
    found = {}
    for name, module in root.named_modules():
        if "vision" in name or "visual" in name:
            continue
        idx = getattr(module, "layer_idx", None)
        if idx is not None and type(module).__name__.endswith("Attention") and hasattr(module, "config"):
            found.setdefault(int(idx), module)
    if not found:
        raise ValueError(
            f"{type(model).__name__}: found no text attention modules with a layer_idx; D-LEAF supports decoders "
            "whose attention layers go through transformers' attention interface (Llama, Mistral, Qwen2, ...)"
        )
    name = type(model).__name__
    cross = sorted({type(m).__name__ for m in found.values() if "Cross" in type(m).__name__})
    if cross or getattr(text_config(model), "cross_attention_layers", None):
        raise NotImplementedError(
            f"{name}: the image reaches this decoder through cross-attention layers ({', '.join(cross) or 'config'}), "
            "not as image tokens its self-attention attends to; D-LEAF's image attention is not defined for it")
    n = text_config(model).num_hidden_layers
    if sorted(found) != list(range(n)):
        missing = sorted(set(range(n)) - set(found))
        raise NotImplementedError(
            f"{name}: decoder layers {missing} have no attention module (a hybrid decoder, with recurrent or "
            f"convolution layers between attention layers; found attention in layers {sorted(found)}); the engine "
            "supports decoders with attention in every layer")
    return [found[i] for i in range(n)]


#: What runs the layers a method does not watch and the rows it never changes: see :func:`dleaf.engine.attach`.
UNWATCHED = ("auto", "eager", "sdpa")


def resolve_unwatched(choice: str, implementation: str | None) -> str:
    """``unwatched="auto"`` keeps a model loaded with eager attention on eager (exact: a method at zero strength
    reproduces plain decoding bit for bit) and puts any other model (sdpa, flash attention, ...) on sdpa, the fastest
    kernel that takes the eager-style mask the engine's attention receives. ``"eager"`` and ``"sdpa"`` are kept."""
    if choice != "auto":
        return choice
    return "eager" if implementation in (None, "eager") else "sdpa"


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwarg(model) -> str:
    """The name under which ``model``'s forward takes the key/value cache (``cache`` in recent transformers, else
    ``past_key_values``)."""
    return _cache_kwarg_of(type(model).forward)
