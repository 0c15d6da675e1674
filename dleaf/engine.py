"""The attention-level mechanism shared by D-LEAF, PAI and SPIN, through transformers' attention interface.

:func:`attach` switches a model's text attention (and only it) to an attention function registered with
``AttentionInterface`` under the name ``"dleaf"`` (its mask function registered with ``AttentionMaskInterface`` as
the eager mask), and registers a forward pre-hook and hook on the model that tell the mechanism where each sample's
image tokens are and which query rows are generated positions. :meth:`Intervention.detach` (or leaving the
``with`` block) restores the previous attention implementation and removes the hooks: the model is left exactly as
it was. Nothing of transformers is patched or copied.

Which rows are acted on ("active" rows): during ``generate``, the last prompt row at prefill and every generated
row after it; in :func:`score`, every row from the last prompt token on, in one forward pass. The statistics are
computed only on active rows of the layers a method watches; other layers run plain eager attention when the model
was loaded with it, else sdpa (``unwatched``, see :func:`attach`).

State across decoding steps (the running thresholds, the trace) is kept per batch row on the model's device. Under
beam search, transformers reorders the key/value cache between steps; the mechanism finds that reordering from the
cache itself (each row's last cached key in the last layer) and reorders its state the same way, so beam search
works with the default ``DynamicCache``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from . import attention_stats as stats
from .config import DLeafConfig, MethodConfig, PAIConfig, SPINConfig, method_config

ATTENTION_NAME = "dleaf"

# id(attention module) -> (Intervention, layer index); filled by attach, emptied by detach.
_MODULES: dict[int, tuple["Intervention", int]] = {}


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _eager_weights(module, query, key, attention_mask, scaling, pre_softmax=None):
    """Post-softmax attention weights exactly as transformers' eager attention computes them."""
    k = _repeat_kv(key, getattr(module, "num_key_value_groups", 1))
    return _softmax_scores(torch.matmul(query, k.transpose(2, 3)), attention_mask, scaling, pre_softmax)


def _softmax_scores(scores, attention_mask, scaling, pre_softmax=None):
    """Eager attention's step from ``query @ key^T`` to the weights: scale, add the mask (cut to the keys), softmax in
    float32, back to the dtype of ``query @ key^T`` (the query's)."""
    dtype = scores.dtype
    scores = scores * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : scores.shape[-1]]
    if pre_softmax is not None:
        scores = pre_softmax(scores)
    return torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


def _attached_to(modules) -> "Intervention | None":
    """The intervention attached to any of these attention modules, or None."""
    for module in modules:
        entry = _MODULES.get(id(module))
        if entry is not None:
            return entry[0]
    return None


def _dispatch(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    entry = _MODULES.get(id(module))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if entry is None:  # a module of a model that is not attached (or a vision tower): plain eager attention
        return _plain_eager(module, query, key, value, attention_mask, scaling, dropout)
    intervention, layer = entry
    return intervention._attend(layer, module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _plain_eager(module, query, key, value, attention_mask, scaling, dropout):
    weights = _eager_weights(module, query, key, attention_mask, scaling)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    v = _repeat_kv(value, getattr(module, "num_key_value_groups", 1))
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTENTION_NAME, _dispatch)
AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def _text_config(model):
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
    n = _text_config(model).num_hidden_layers
    if sorted(found) != list(range(n)):
        raise ValueError(f"{type(model).__name__}: expected attention modules for layers 0..{n - 1}, found {sorted(found)}")
    return [found[i] for i in range(n)]


#: What runs the layers a method does not watch and the rows it never changes: see :func:`attach`.
UNWATCHED = ("auto", "eager", "sdpa")


def resolve_unwatched(choice: str, implementation: str | None) -> str:
    """``unwatched="auto"`` keeps a model loaded with eager attention on eager (exact: a method at zero strength
    reproduces plain decoding bit for bit) and puts any other model (sdpa, flash attention, ...) on sdpa, the fastest
    kernel that takes the eager-style mask the engine's attention receives. ``"eager"`` and ``"sdpa"`` are kept."""
    if choice != "auto":
        return choice
    return "eager" if implementation in (None, "eager") else "sdpa"


def _layers(start: int, end: int | None, n: int) -> range:
    end = n if end is None else end
    if start >= n or end > n:
        raise ValueError(f"layer range [{start}, {end}) does not fit a decoder of {n} layers")
    return range(start, end)


def select_heads(iaf: torch.Tensor, rule: str = "below_mean", k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The best head and the heads to correct, per query row.

    ``iaf``: (B, H, Q) image attention focus. Returns ``best`` (B, 1, Q), ``h* = argmax_h IAF`` (the first on ties),
    and ``selected`` (B, H, Q) bool: ``"below_mean"``: IAF[h] < mean_h IAF; ``"bottom_k"``: the ``k`` heads of lowest
    IAF other than h*; ``"all_but_best"``: every h != h*.
    """
    best = iaf.argmax(dim=1, keepdim=True)
    if rule == "below_mean":
        return best, iaf < iaf.mean(dim=1, keepdim=True)
    heads = torch.arange(iaf.shape[1], device=iaf.device)[None, :, None]
    if rule == "all_but_best":
        selected = heads != best
    elif rule == "bottom_k":
        rank = iaf.argsort(dim=1, stable=True).argsort(dim=1)  # 0 = lowest IAF
        selected = (rank < k) & (heads != best)
    else:
        raise ValueError(f"unknown head selection rule {rule!r}; valid: below_mean, bottom_k, all_but_best")
    return best, selected


def fuse_heads(rows: torch.Tensor, best: torch.Tensor, corrected: torch.Tensor, gamma) -> torch.Tensor:
    """Eq. 4: ``a~[h] = (1 - gamma) a[h] + gamma a[h*]`` where ``corrected[h]``, else ``a[h]`` unchanged.

    ``rows`` (B, H, Q, K) post-softmax attention, ``best`` (B, 1, Q) the index h*, ``corrected`` (B, H, Q) bool,
    ``gamma`` a float or a 0-d tensor. Written as ``a + gamma * c * (a[h*] - a)`` so that uncorrected rows (and
    gamma = 0) are returned bit for bit.
    """
    B, H, Q, K = rows.shape
    target = torch.gather(rows, 1, best[..., None].expand(B, 1, Q, K))
    # lerp computes a + w (b - a) for |w| < 0.5 (so w = 0 returns a bit for bit) in one pass over the rows
    weight = gamma * corrected[..., None].to(rows.dtype)
    if not torch.is_tensor(weight) or weight.dtype != rows.dtype:
        weight = torch.as_tensor(weight, dtype=rows.dtype, device=rows.device)
    return torch.lerp(rows, target.expand(B, H, Q, K), weight)


def random_target(best: torch.Tensor, corrected: torch.Tensor, shift: torch.Tensor):
    """``fusion_target="random"``: the target head ``(h* + shift) mod H`` (``shift`` uniform in [1, H), so uniform
    among the heads other than h*) and the corrected heads without the target itself. ``best`` (B, 1, Q),
    ``corrected`` (B, H, Q), ``shift`` (B, 1, Q)."""
    H = corrected.shape[1]
    target = (best + shift) % H
    heads = torch.arange(H, device=corrected.device)[None, :, None]
    return target, corrected & (heads != target)


def causal_threshold(count, total, squares, best, cfg: DLeafConfig):
    """The causal threshold ``tau`` of a layer from the running statistics of earlier active positions (``count``,
    ``total``, ``squares``, ``best``, any matching shapes: one layer, or every watched layer at once) and ``ready``
    (at least ``warmup`` earlier positions). Shared by the one-row and the multi-row paths."""
    if cfg.threshold == "running":
        n = count.clamp(min=1)
        mean = total / n
        tau = mean + cfg.kappa * (squares / n - mean * mean).clamp(min=0).sqrt()
    else:
        tau = best + cfg.margin
    return tau, count >= cfg.warmup


def flag_gate(active, ready, draw, cfg: DLeafConfig):
    """Where a layer may be flagged, before its signal is known: by ``cfg.localization``, ``active & ready``
    (``"threshold"``: flagged where the signal also exceeds ``tau``), ``active`` (``"everywhere"``) or
    ``active & (draw < random_rate)`` (``"random"``, ``draw`` uniform)."""
    if cfg.localization == "threshold":
        return active & ready
    if cfg.localization == "everywhere":
        return active
    return active & (draw < cfg.random_rate)


def layer_flags(signal, gate, tau, cfg: DLeafConfig):
    """The flags of a layer: ``gate & (signal > tau)`` for ``localization="threshold"``, else ``gate``."""
    return gate & (signal > tau) if cfg.localization == "threshold" else gate


def one_row_step(rows, image_row, gate, tau, neg_inv_log, gamma, cfg: DLeafConfig, inplace: bool = False,
                 target_shift=None):
    """D-LEAF on one query row of one layer: the layer signal, the flag, IAF, the selected heads and the fused rows.

    ``rows`` (B, H, 1, K) post-softmax attention; ``image_row`` (B, 1, K) the image-key mask as numbers of ``rows``'
    dtype; ``gate`` (B, 1, 1) bool and ``tau`` (B, 1, 1) float64, the flag gate and the causal threshold of this layer
    (:func:`flag_gate`, :func:`causal_threshold`: they depend only on earlier positions, so the caller computes them
    for every layer at once); ``neg_inv_log`` (B, 1, 1) ``-1 / log |I|``; ``gamma`` a float or a 0-d tensor.
    ``inplace`` writes the fused rows into ``rows`` (no autograd). ``target_shift`` (B, 1, 1) integers in [1, H) for
    ``fusion_target="random"``: the target head is ``(h* + shift) mod H`` (:func:`random_target`). The same formulas
    as the multi-row path, written for one row with few operators: the image mass as one masked dot product (shared by the signal and
    IAF), the head-mixed profile as one batched product, the fusion as one ``lerp``. No host synchronisation and no
    branching on tensor values, so it can be compiled or captured.
    Returns ``(new_rows, signal, flag, iaf, corrected)``: ``signal`` (B, 1, 1) in ``rows``' dtype, ``flag``
    (B, 1, 1), ``iaf`` and ``corrected`` (B, H, 1).
    """
    B, H, _, K = rows.shape
    r = rows.view(B, H, K) if rows.is_contiguous() else rows.reshape(B, H, K)
    mass = (r * image_row).sum(dim=-1, keepdim=True)  # (B, H, 1): the masked sum, as the multi-row path has it
    safe = mass + (mass == 0)  # 1 where a head has no image mass (its masked row is all zeros)
    p = None
    if cfg.layer_signal == "liae":
        if cfg.liae_variant == "mixed":
            # the head-mixed profile mean_h (a_h restricted to I) / mass_h as one product (B, 1, H) @ (B, H, K)
            q = torch.bmm(torch.reciprocal(H * safe).transpose(1, 2), r) * image_row  # (B, 1, K)
            neg_entropy = torch.special.xlogy(q, q).sum(dim=-1, keepdim=True)  # (B, 1, 1)
        else:
            p = r * image_row / safe
            neg_entropy = torch.special.xlogy(p, p).sum(dim=-1, keepdim=True).mean(dim=1, keepdim=True)
        signal = neg_entropy * neg_inv_log if cfg.liae_normalize else -neg_entropy
    else:
        signal = -mass.mean(dim=1, keepdim=True)
    if cfg.iaf_variant == "mass":
        iaf = mass
    else:
        p = r * image_row / safe if p is None else p
        iaf = mass * (1.0 - torch.special.xlogy(p, p).sum(dim=-1, keepdim=True) * neg_inv_log)
    flag = layer_flags(signal, gate, tau, cfg)  # (B, 1, 1); a float32 signal compares with a float64 tau exactly

    best_head, selected = select_heads(iaf, cfg.head_selection, cfg.bottom_k)
    corrected = selected & flag  # (B, H, 1)
    if target_shift is not None:
        best_head, corrected = random_target(best_head, corrected, target_shift)
    target = torch.gather(r, 1, best_head.expand(B, 1, K))  # (B, 1, K), a copy
    weight = corrected * gamma
    if weight.dtype != rows.dtype:
        weight = weight.to(rows.dtype)
    # lerp computes a + w (b - a) for |w| < 0.5, so w = 0 (uncorrected heads, gamma 0) returns a bit for bit
    if inplace:
        r.lerp_(target, weight)  # r shares rows' memory
        new_rows = rows
    else:
        new_rows = torch.lerp(r, target.expand(B, H, K), weight).view(B, H, 1, K)
    return new_rows, signal, flag, iaf, corrected


def one_row_attention(scores, mask, scaling: float, image_row, gate, tau, neg_inv_log, gamma,
                      cfg: DLeafConfig, target_shift=None):
    """The watched layer's work on one query row between the two attention products: scale, mask and softmax the
    row's scores ``query @ key^T`` (B, H, 1, K) exactly as eager attention does (:func:`_softmax_scores`), then
    :func:`one_row_step`. This is the region ``attach(..., compile=True)`` compiles: one call in place of the
    operators of both."""
    rows = _softmax_scores(scores, mask, scaling)
    return one_row_step(rows, image_row, gate, tau, neg_inv_log, gamma, cfg, target_shift=target_shift)


@functools.cache
def _compiled_one_row_attention():
    """:func:`one_row_attention` compiled once per process (``torch.compile``, dynamic shapes: the key length grows
    every step). The first call of each configuration compiles (seconds to tens of seconds on a CPU)."""
    return torch.compile(one_row_attention, dynamic=True)


class Trace:
    """What D-LEAF saw and did at every active position, per sample: each layer's signal and threshold, the flagged
    layers, each head's IAF, and the corrected heads. Filled while attached with ``trace=True``.

    ``steps`` holds one record per forward call: ``columns`` (absolute positions), ``active`` (B, Q) and, per
    watched layer, ``signal``/``tau``/``flag`` (B, Q) and ``iaf``/``corrected`` (B, H, Q), all on the CPU.
    """

    def __init__(self, num_layers: int, num_heads: int):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.steps: list[dict] = []

    def _reorder(self, index: torch.Tensor) -> None:
        index = index.cpu()
        for step in self.steps:
            for key, value in step.items():
                if key == "columns":
                    continue
                if key == "layers":
                    for rec in value.values():
                        for k in rec:
                            rec[k] = rec[k].index_select(0, index)
                else:
                    step[key] = value.index_select(0, index)

    def sample(self, i: int) -> dict:
        """Sample ``i``'s trace as arrays over its active positions: ``positions`` (T,), ``signal``, ``tau``,
        ``flag`` (T, L) and ``iaf``, ``corrected`` (T, L, H); unwatched layers hold NaN / False."""
        L, H = self.num_layers, self.num_heads
        pos, sig, tau, flag, iaf, cor = [], [], [], [], [], []
        for step in self.steps:
            act = step["active"][i]
            cols = step["columns"][act]
            q = int(act.sum())
            if q == 0:
                continue
            s = torch.full((q, L), math.nan)
            t = torch.full((q, L), math.nan)
            f = torch.zeros((q, L), dtype=torch.bool)
            a = torch.full((q, L, H), math.nan)
            c = torch.zeros((q, L, H), dtype=torch.bool)
            for layer, rec in step["layers"].items():
                s[:, layer] = rec["signal"][i][act].float()
                t[:, layer] = rec["tau"][i][act].float()
                f[:, layer] = rec["flag"][i][act]
                a[:, layer] = rec["iaf"][i][:, act].T.float()
                c[:, layer] = rec["corrected"][i][:, act].T
            pos.append(cols), sig.append(s), tau.append(t), flag.append(f), iaf.append(a), cor.append(c)
        if not pos:
            empty = torch.zeros(0)
            return {"positions": empty.long(), "signal": empty.reshape(0, L), "tau": empty.reshape(0, L),
                    "flag": empty.reshape(0, L).bool(), "iaf": empty.reshape(0, L, H),
                    "corrected": empty.reshape(0, L, H).bool()}
        return {"positions": torch.cat(pos), "signal": torch.cat(sig), "tau": torch.cat(tau), "flag": torch.cat(flag),
                "iaf": torch.cat(iaf), "corrected": torch.cat(cor)}

    @property
    def batch_size(self) -> int:
        return int(self.steps[0]["active"].shape[0]) if self.steps else 0


class Intervention:
    """A method attached to a model. Use :func:`attach` (or :func:`attached` as a context manager)."""

    def __init__(self, model, config: MethodConfig, trace: bool = False, unwatched: str = "auto",
                 compile: bool = False):
        if unwatched not in UNWATCHED:
            raise ValueError(f"unwatched must be 'auto' (the model's own kind), 'eager' (exact) or 'sdpa' (faster), "
                             f"got {unwatched!r}")
        self.model, self.config, self.compile = model, config, bool(compile)
        self.unwatched_choice = unwatched
        self.unwatched = unwatched  # resolved when attached ("auto": from the model's attention implementation)
        self.image_token_id = image_token_id(model)
        self.modules = text_attention_modules(model)
        text_config = _text_config(model)
        self.num_layers = len(self.modules)
        self.num_heads = int(text_config.num_attention_heads)
        self.watched = set(_layers(config.layer_start, config.layer_end, self.num_layers))
        self.trace = Trace(self.num_layers, self.num_heads) if trace else None
        self._attached = False
        self._state: dict[str, Any] = {}
        self._score_from: torch.Tensor | None = None
        self._resume_ids: torch.Tensor | None = None  # set by the prompt-cache scorers: the tokens so far
        self._generator: torch.Generator | None = None
        self._target_generator: torch.Generator | None = None
        if isinstance(config, DLeafConfig) and config.fusion_target == "random":
            self._target_generator = torch.Generator().manual_seed(config.seed)  # on the CPU: the same draws anywhere
        self.gamma_override: torch.Tensor | None = None

    # ------------------------------------------------------------------ attach / detach
    def _attach(self) -> "Intervention":
        if _attached_to(self.modules) is not None:
            raise RuntimeError("this model already has a D-LEAF intervention attached; detach it first")
        text_config = _text_config(self.model)
        self._previous = text_config._attn_implementation
        self.unwatched = resolve_unwatched(self.unwatched_choice, self._previous)
        for layer, module in enumerate(self.modules):
            _MODULES[id(module)] = (self, layer)
        self._set_implementation(ATTENTION_NAME)
        self._hooks = [
            self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            self.model.register_forward_hook(self._post_forward, with_kwargs=True),
        ]
        self._attached = True
        return self

    def _set_implementation(self, name: str) -> None:
        if getattr(self.model.config, "text_config", None) is not None:
            self.model.set_attn_implementation({"text_config": name})
        else:
            self.model.set_attn_implementation(name)

    def detach(self) -> None:
        """Remove the intervention: the previous attention implementation comes back and the hooks go."""
        if not self._attached:
            return
        for hook in self._hooks:
            hook.remove()
        for module in self.modules:
            _MODULES.pop(id(module), None)
        self._set_implementation(self._previous)
        self._attached = False

    def __enter__(self) -> "Intervention":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ hooks
    def _pre_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        resume, self._resume_ids = self._resume_ids, None
        if resume is not None:
            # a call that continues a cached prompt (PromptCache): a new sequence whose tokens so far are `resume`
            n_call = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            if resume.shape[1] != past + n_call:
                raise RuntimeError(f"the resumed sequence holds {resume.shape[1]} tokens, but the cache holds {past} "
                                   f"and the call brings {n_call}")
            self._new_sequence(resume)
        elif past == 0:
            if input_ids is None:
                raise ValueError("D-LEAF needs input_ids on the first forward call of a sequence, to find the image "
                                 "tokens (config image_token_id); got inputs_embeds only")
            self._new_sequence(input_ids)
        else:
            if not self._state:
                raise RuntimeError("a cached forward call reached D-LEAF before any prefill; attach before generating")
            self._maybe_reorder(cache)
        n = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
        device = self._state["image"].device
        self._state["columns"] = torch.arange(past, past + n, device=device)
        self._state["first_column"] = past
        self._state["image_keys"] = {}  # key length -> image mask over the keys, built once per forward call
        self._state["active_rows"] = {}  # first active row -> (B, Qa) active mask, built once per forward call
        self._state.pop("row_context", None)
        if self.trace is not None:
            self._state["record"] = {"columns": self._state["columns"].cpu(), "layers": {}}
        return None

    def _post_forward(self, module, args, kwargs, output):
        self._flush_row_signals()
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        # a reordering needs two rows or more: with one, no fingerprint (and nothing to compare at the next step)
        self._state["fingerprint"] = self._fingerprint(cache) if self._state["image"].shape[0] > 1 else None
        if self.trace is not None and "record" in self._state:
            record = self._state.pop("record")
            record["active"] = self._active(record["columns"].to(self._state["image"].device)).cpu()
            self.trace.steps.append(record)
        return None

    @staticmethod
    def _fingerprint(cache):
        layers = getattr(cache, "layers", None)
        if not layers:
            return None
        keys = getattr(layers[-1], "keys", None)
        if keys is None or keys.dim() != 4 or keys.shape[2] == 0:
            return None
        return keys[:, :, -1, :].reshape(keys.shape[0], -1).clone()

    def _maybe_reorder(self, cache) -> None:
        old = self._state.get("fingerprint")
        new = self._fingerprint(cache)
        if old is None or new is None:
            return
        if old.shape != new.shape:
            raise RuntimeError("the batch changed size between decoding steps; D-LEAF cannot follow it")
        # Beam search reorders the cache rows with index_select: row i now holds old row index[i], bit for bit.
        same = (new[:, None, :] == old[None, :, :]).all(dim=-1)
        index = same.to(torch.int8).argmax(dim=1)
        for key in ("image", "active_from"):
            self._state[key] = self._state[key].index_select(0, index)
        stats = self._state["stats"]
        stats.copy_(stats.index_select(2, index))  # in place: the per-layer views stay valid
        if self.trace is not None:
            self.trace._reorder(index)

    def _new_sequence(self, input_ids: torch.Tensor) -> None:
        image = input_ids == self.image_token_id
        if not bool(image.any(dim=1).all()):
            missing = (~image.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"samples {missing} of the batch have no image token (id {self.image_token_id}); "
                             "D-LEAF acts on attention to the image and needs one in every sample")
        b, n, L = input_ids.shape[0], input_ids.shape[1], self.num_layers
        dev = input_ids.device
        if self._score_from is not None:
            if self._score_from.shape != (b,):
                raise ValueError(f"response_start has shape {tuple(self._score_from.shape)}, expected ({b},)")
            active_from = self._score_from.to(dev) - 1
            first_active = self._score_min - 1
            self._score_from = None
        else:
            active_from = torch.full((b,), n - 1, device=dev)
            first_active = n - 1
        self._state = {
            "first_active": first_active,
            "image": image,
            "active_from": active_from,
            # the running statistics per layer and sample: count, total, sum of squares, best (minimum) signal
            "stats": torch.stack([torch.zeros(L, b, 1, dtype=torch.float64, device=dev)] * 3
                                 + [torch.full((L, b, 1), math.inf, dtype=torch.float64, device=dev)]),
        }
        # per layer, (count, total, squares, best) as (B, 1) views, made once per sequence (no indexing per step)
        self._state["layer_stats"] = [tuple(t.unbind(0)) for t in self._state["stats"].unbind(1)]
        if isinstance(self.config, DLeafConfig) and self.config.localization == "random" and self._generator is None:
            self._generator = torch.Generator(device=dev).manual_seed(self.config.seed)

    def _active(self, columns: torch.Tensor) -> torch.Tensor:
        return columns[None, :] >= self._state["active_from"][:, None]

    # ------------------------------------------------------------------ attention
    def _attend(self, layer, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        if layer not in self.watched:
            if self.unwatched == "sdpa":
                from transformers.integrations.sdpa_attention import sdpa_attention_forward

                return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, **kwargs)
            return _plain_eager(module, query, key, value, attention_mask, scaling, dropout)
        columns = self._state["columns"]
        q_len, k_len = query.shape[2], key.shape[2]
        if columns.shape[0] != q_len:
            raise RuntimeError(f"D-LEAF expected {columns.shape[0]} query rows, the attention got {q_len}")
        # The suffix of rows that any sample treats as active (all rows in scoring, the last one at prefill).
        first = max(0, min(self._state["first_active"] - self._state["first_column"], q_len - 1))
        active = self._state["active_rows"].get(first)
        if active is None:
            active = self._state["active_rows"][first] = self._active(columns[first:])  # (B, Qa)
        pad_rows, prefix = first, None
        if first > 0 and self.unwatched == "sdpa" and attention_mask is not None and not torch.is_grad_enabled():
            # The rows before the active suffix are never changed: with unwatched="sdpa" (speed over bit-exactness)
            # they take the fast kernel, and only the active rows are computed eagerly (prefill: one row, not Q x K).
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            prefix, _ = sdpa_attention_forward(module, query[:, :, :first], key, value, attention_mask[:, :, :first],
                                               dropout=dropout, scaling=scaling, **kwargs)
            query, attention_mask, first = query[:, :, first:], attention_mask[:, :, first:], 0

        def finish(out, weights):
            out = out.transpose(1, 2).contiguous()
            if prefix is None:
                return out, weights
            return torch.cat([prefix, out], dim=1), None

        image = self._image_keys(k_len)
        v = _repeat_kv(value, getattr(module, "num_key_value_groups", 1))
        cfg = self.config

        if isinstance(cfg, PAIConfig):
            def boost(scores):
                rows = scores[:, :, first:]
                sel = (active[:, None, :, None] & image[:, None, None, :]).to(rows.dtype)
                rows = rows + cfg.alpha * rows.abs() * sel
                return torch.cat([scores[:, :, :first], rows], dim=2)

            weights = _eager_weights(module, query, key, attention_mask, scaling, pre_softmax=boost)
            weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
            return finish(torch.matmul(weights, v), weights)

        if self.compile and isinstance(cfg, DLeafConfig) and query.shape[2] == 1 and not (module.training and dropout):
            # decoding step (or the prefill's last row with unwatched="sdpa"): the products stay eager, the softmax
            # and D-LEAF between them run as one compiled region
            scores = torch.matmul(query, _repeat_kv(key, getattr(module, "num_key_value_groups", 1)).transpose(2, 3))
            weights, record = self._dleaf_one_row_compiled(layer, scores, attention_mask, scaling, active)
            self._keep_record(layer, record, pad_rows)
            return finish(torch.matmul(weights, v), weights)

        weights = _eager_weights(module, query, key, attention_mask, scaling)
        weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
        rows = weights if first == 0 else weights[:, :, first:]  # (B, H, Qa, K)

        if isinstance(cfg, SPINConfig):
            mass = stats.image_mass(rows, image, check=False)  # (B, H, Qa)
            keep = max(1, int(math.floor(cfg.keep_ratio * self.num_heads)))
            order = mass.argsort(dim=1, descending=True).argsort(dim=1)  # rank of each head, 0 = most mass
            damp = (order >= keep) & active[:, None, :]
            out = torch.matmul(weights, v)
            scale = torch.where(damp, torch.full_like(mass, cfg.scale), torch.ones_like(mass)).to(out.dtype)
            out = torch.cat([out[:, :, :first], out[:, :, first:] * scale[..., None]], dim=2)
            return finish(out, weights)

        if rows.shape[2] == 1:
            new_rows, record = self._dleaf_one_row(layer, rows, image, active)
        else:
            new_rows, record = self._dleaf_rows(layer, rows, image, active)
        self._keep_record(layer, record, pad_rows)
        if first == 0:
            weights = new_rows
        elif torch.is_grad_enabled():
            weights = torch.cat([weights[:, :, :first], new_rows], dim=2)
        else:  # no autograd: write the corrected rows in place instead of copying the whole (B, H, Q, K) matrix
            weights[:, :, first:] = new_rows
        return finish(torch.matmul(weights, v), weights)

    def _keep_record(self, layer: int, record: dict | None, pad: int) -> None:
        """Store a layer's trace record for this forward call, padded to every query row, on the CPU."""
        if self.trace is None or "record" not in self._state:
            return
        record = {k: torch.nn.functional.pad(t, (pad, 0), value=(math.nan if t.is_floating_point() else 0)).to("cpu")
                  for k, t in record.items()}
        for k in ("flag", "corrected"):
            record[k] = record[k].bool()
        self._state["record"]["layers"][layer] = record

    def _image_keys(self, k_len: int) -> torch.Tensor:
        """The image mask over ``k_len`` keys, padded or cut once per forward call and shared by every layer."""
        cache = self._state["image_keys"]
        if k_len not in cache:
            image = self._state["image"]
            if image.shape[1] < k_len:
                image = torch.nn.functional.pad(image, (0, k_len - image.shape[1]))
            cache[k_len] = image[:, :k_len]
        return cache[k_len]

    def _image_row(self, k_len: int, dtype) -> torch.Tensor:
        """The image mask over ``k_len`` keys as numbers of ``dtype``, shaped (B, 1, K); once per forward call."""
        cache = self._state["image_keys"]
        key = (k_len, dtype)
        if key not in cache:
            cache[key] = self._image_keys(k_len).to(dtype)[:, None, :]
        return cache[key]

    def _inv_log_image(self, dtype) -> torch.Tensor:
        """1 / log |I| per sample (0 where |I| <= 1), shape (B, 1), cached per dtype for the sequence."""
        key = ("inv_log_image", dtype)
        if key not in self._state:
            n = self._state["image"].sum(dim=-1).to(dtype)
            big = n > 1
            safe = torch.where(big, n, torch.full_like(n, 2.0))
            self._state[key] = torch.where(big, 1.0 / torch.log(safe), torch.zeros_like(n))[:, None]
        return self._state[key]

    def _neg_inv_log_image(self, dtype) -> torch.Tensor:
        """``-1 / log |I|`` (see :meth:`_inv_log_image`) shaped (B, 1, 1), cached per dtype for the sequence."""
        key = ("neg_inv_log_image", dtype)
        if key not in self._state:
            self._state[key] = -self._inv_log_image(dtype)[:, :, None]
        return self._state[key]

    def _dleaf_one_row(self, layer, rows, image, active):
        """:meth:`_dleaf_rows` for a single active query row (every decoding step, and the prefill's last row); see
        :func:`one_row_step`. The thresholds of every watched layer come from :meth:`_row_context`, made once per
        forward call, and the running statistics are updated for every layer at once after the forward call
        (:meth:`_flush_row_signals`)."""
        *args, shift = self._one_row_inputs(layer, active, rows.shape[-1], rows.dtype)
        out = one_row_step(rows, *args, self.config, inplace=not torch.is_grad_enabled(), target_shift=shift)
        return out[0], self._one_row_done(layer, *out[1:])

    def _dleaf_one_row_compiled(self, layer, scores, mask, scaling, active):
        """``compile=True``: the softmax of one query row's scores and :func:`one_row_step` as one compiled region
        (:func:`one_row_attention`)."""
        *args, shift = self._one_row_inputs(layer, active, scores.shape[-1], scores.dtype)
        out = _compiled_one_row_attention()(scores, mask, scaling, *args, self.config, shift)
        return out[0], self._one_row_done(layer, *out[1:])

    def _one_row_inputs(self, layer, active, k_len, dtype):
        """What :func:`one_row_step` needs besides the rows: image mask, gate, threshold, -1/log|I|, gamma and the
        random target's draw (None unless ``fusion_target="random"``)."""
        cfg: DLeafConfig = self.config
        ctx = self._row_context(active)
        i = layer - ctx["first_layer"]
        gate = ctx["gate"][i]
        if cfg.localization == "random":
            draw = torch.rand(active.shape, generator=self._generator, device=active.device)
            gate = flag_gate(active, None, draw, cfg)[:, :, None]
        return (self._image_row(k_len, dtype), gate, ctx["tau"][i], self._neg_inv_log_image(dtype), self._gamma(None),
                self._target_shift(active.shape[0], 1, active.device))

    def _one_row_done(self, layer, signal, flag, iaf, corrected):
        """Keep the layer's signal for the running statistics; the trace record (None without a trace)."""
        ctx = self._state["row_context"]
        ctx["signals"][layer] = signal
        if self.trace is None:
            return None
        i = layer - ctx["first_layer"]
        tau = torch.where(ctx["ready"][i], ctx["tau"][i], math.nan).view(-1, 1)
        return {"signal": signal.to(torch.float64).view(-1, 1), "tau": tau, "flag": flag.view(-1, 1), "iaf": iaf,
                "corrected": corrected}

    def _row_context(self, active: torch.Tensor) -> dict:
        """Per forward call of the one-row path: every watched layer's causal threshold and flag gate, computed at
        once from the running statistics (they depend only on earlier positions), as per-layer views."""
        ctx = self._state.get("row_context")
        if ctx is None:
            cfg: DLeafConfig = self.config
            lo, hi = min(self.watched), max(self.watched) + 1
            count, total, squares, best = self._state["stats"][:, lo:hi, :, :, None].unbind(0)  # each (Lw, B, 1, 1)
            tau, ready = causal_threshold(count, total, squares, best, cfg)
            active = active[:, :, None]  # (B, 1, 1)
            gate = flag_gate(active, ready, None, cfg) if cfg.localization != "random" else ready
            gate = gate.expand(ready.shape)  # "everywhere": the active rows, the same for every layer
            ctx = {"first_layer": lo, "last_layer": hi, "active": active, "tau": tau.unbind(0),
                   "ready": ready.unbind(0), "gate": gate.unbind(0), "signals": {}}
            self._state["row_context"] = ctx
        return ctx

    def _flush_row_signals(self) -> None:
        """After a forward call of the one-row path: fold every watched layer's signal into its running statistics
        (count, total, sum of squares, best), all layers in one set of operations."""
        ctx = self._state.pop("row_context", None)
        if ctx is None or not ctx["signals"]:
            return
        lo, hi, active = ctx["first_layer"], ctx["last_layer"], ctx["active"]
        if sorted(ctx["signals"]) != list(range(lo, hi)):
            raise RuntimeError(f"D-LEAF saw layers {sorted(ctx['signals'])} of the watched [{lo}, {hi}) in one forward "
                               "call; every watched layer must run once per call")
        signal = torch.stack([ctx["signals"][layer] for layer in range(lo, hi)]).to(torch.float64)[..., 0]
        active = active[:, :, 0]  # (B, 1), against the (Lw, B, 1) signals and statistics
        count, total, squares, best = self._state["stats"][:, lo:hi].unbind(0)
        with torch.no_grad():  # the state only feeds comparisons: no gradient
            s_act = torch.where(active, signal.detach(), 0.0)
            count.add_(active)
            total.add_(s_act)
            squares.addcmul_(s_act, s_act)
            torch.minimum(best, torch.where(active, signal.detach(), math.inf), out=best)

    def _dleaf_rows(self, layer, rows, image, active):
        """Flag, rank and fuse the active rows of one layer; update the running state. Returns the new rows and the
        trace record of this layer."""
        cfg: DLeafConfig = self.config
        B, H, Qa, K = rows.shape
        if cfg.layer_signal == "liae":
            signal = stats.layer_entropy(rows, image, cfg.liae_variant, cfg.liae_normalize, check=False)
        else:
            signal = -stats.image_mass(rows, image, check=False).mean(dim=1)
        iaf = stats.head_focus(rows, image, cfg.iaf_variant, check=False)  # (B, H, Qa)
        signal = signal.to(torch.float64)  # (B, Qa)

        act = active.to(torch.float64)
        s_act = torch.where(active, signal, torch.zeros_like(signal))
        count0, total0, squares0, best0 = self._state["layer_stats"][layer]  # (B, 1) views of the running state
        count = count0 + torch.cumsum(act, 1) - act
        total = total0 + torch.cumsum(s_act, 1) - s_act
        squares = squares0 + torch.cumsum(s_act * s_act, 1) - s_act * s_act
        s_inf = torch.where(active, signal, torch.full_like(signal, math.inf))
        prev_best = torch.cat([torch.full_like(s_inf[:, :1], math.inf), torch.cummin(s_inf, 1).values[:, :-1]], 1)
        best = torch.minimum(best0, prev_best)
        draw = None
        if cfg.localization == "random":
            draw = torch.rand(active.shape, generator=self._generator, device=active.device)
        tau, ready = causal_threshold(count, total, squares, best, cfg)
        flag = layer_flags(signal, flag_gate(active, ready, draw, cfg), tau, cfg)
        tau = torch.where(ready, tau, torch.full_like(tau, math.nan))

        with torch.no_grad():  # the state only feeds comparisons: no gradient
            count0 += act.sum(1, keepdim=True)
            total0 += s_act.sum(1, keepdim=True)
            squares0 += (s_act * s_act).sum(1, keepdim=True)
            torch.minimum(best0, s_inf.min(1, keepdim=True).values, out=best0)

        best_head, selected = select_heads(iaf, cfg.head_selection, cfg.bottom_k)
        corrected = selected & flag[:, None, :]
        shift = self._target_shift(B, Qa, rows.device)
        if shift is not None:  # fusion_target="random"
            best_head, corrected = random_target(best_head, corrected, shift)
        new_rows = fuse_heads(rows, best_head, corrected, self._gamma(rows))
        record = {"signal": signal, "tau": tau, "flag": flag, "iaf": iaf, "corrected": corrected}
        return new_rows, record

    def _target_shift(self, b: int, q: int, device) -> torch.Tensor | None:
        """``fusion_target="random"``: a (B, 1, Q) draw uniform in [1, H) per sample, row and layer; else None."""
        if self._target_generator is None or self.num_heads < 2:
            return None
        shift = torch.randint(1, self.num_heads, (b, 1, q), generator=self._target_generator)
        return shift.to(device)

    def _gamma(self, rows):
        # ``gamma_override`` (a tensor, possibly requiring grad) replaces the configured gamma: the autograd slope of
        # a loss at gamma = 0 uses it with the flags fixed by the uncorrected model.
        return self.gamma_override if self.gamma_override is not None else self.config.gamma

    # ------------------------------------------------------------------ generate
    def generation_kwargs(self, inputs: dict) -> dict:
        """Extra keyword arguments the attached method needs in ``model.generate(**inputs, ...)``; see
        :func:`generation_kwargs`. Attention-level methods (D-LEAF, PAI, SPIN) act inside the forward pass and need
        none."""
        if not self._attached:
            raise ValueError("the intervention passed to generation_kwargs is detached")
        return {}

    # ------------------------------------------------------------------ summaries
    def flag_rate(self) -> float:
        """Fraction of (active position, watched layer) pairs flagged so far (needs ``trace=True``)."""
        if self.trace is None:
            raise RuntimeError("flag_rate needs the intervention attached with trace=True")
        flagged = total = 0
        for step in self.trace.steps:
            for rec in step["layers"].values():
                flagged += int((rec["flag"] & step["active"]).sum())
                total += int(step["active"].sum())
        return flagged / total if total else float("nan")


def attach(model, method: str | MethodConfig = "dleaf", *, trace: bool = False, unwatched: str = "auto",
           compile: bool = False, **knobs) -> Intervention:
    """Attach a method to ``model`` (a config object, or a name from :data:`dleaf.config.METHODS` with ``knobs``).

    Returns the :class:`Intervention`; call its ``detach()`` or use it as a context manager. The model must be in
    eval mode for results that match plain decoding (dropout is honoured as the model's own attention does).

    ``unwatched`` chooses what runs the layers the method does not watch, and the rows it never changes (all but the
    last at prefill): ``"eager"`` (exact: zero strength reproduces plain eager decoding bit for bit), ``"sdpa"``
    (faster, equal to eager up to rounding), or ``"auto"`` (the default): eager for a model loaded with eager
    attention, sdpa for any other (:func:`resolve_unwatched`), so a model is never moved to a slower kernel on the
    layers the method leaves alone. ``compile=True`` runs the softmax and D-LEAF's per-token work of every watched layer
    (:func:`one_row_attention`) as one compiled region per decoding step and layer: fewer operator dispatches,
    after a compilation of seconds to tens of seconds on first use; equal to the eager path up to rounding.
    """
    config = method_config(method, **knobs) if isinstance(method, str) else method
    if knobs and not isinstance(method, str):
        raise ValueError("pass knobs with a method name, or a config object alone")
    return Intervention(model, config, trace=trace, unwatched=unwatched, compile=compile)._attach()


@contextlib.contextmanager
def attached(model, method: str | MethodConfig | None = "dleaf", **kwargs):
    """``with attached(model, "dleaf", gamma=0.5) as iv: model.generate(...)``; ``method=None`` or ``"greedy"``
    attaches nothing (plain decoding) and yields None."""
    if method is None or method == "greedy":
        yield None
        return
    intervention = attach(model, method, **kwargs)
    try:
        yield intervention
    finally:
        intervention.detach()


def generation_kwargs(intervention: "Intervention | None", inputs: dict) -> dict:
    """The extra keyword arguments ``model.generate(**inputs, **generation_kwargs(iv, inputs))`` needs for the method
    attached as ``intervention`` (``None``: nothing attached, plain decoding). Methods that act inside the attention
    (D-LEAF, PAI, SPIN) return ``{}``; a method that acts on the logits returns, for example, a ``logits_processor``.
    Every generation loop calls it, so any method runs through ``generate`` the same way."""
    if intervention is None:
        return {}
    return intervention.generation_kwargs(inputs)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., tokens]`` in float32: (..., V) logits and (...) token ids give (...)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]


def response_logprobs(model, inputs: dict, response_start: torch.Tensor | list[int],
                      intervention: Intervention | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced per-token log-probabilities of each sample's response, in one forward pass.

    ``inputs`` are model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...) holding prompt and
    response, left-padded; ``response_start[b]`` is the column of sample b's first response token. With an attached
    ``intervention``, every position from the last prompt token on is corrected exactly as step-by-step decoding
    would correct it. Returns ``(logprobs, mask)``, both (B, T): ``logprobs[b, t]`` is log p(input_ids[b, t] |
    input_ids[b, :t]) where ``mask[b, t]`` (a response column), else 0.
    """
    input_ids = inputs["input_ids"]
    b, t = input_ids.shape
    start = torch.as_tensor(response_start, device=input_ids.device).long().reshape(-1)
    if start.shape[0] != b:
        raise ValueError(f"response_start has {start.shape[0]} entries for a batch of {b}")
    if bool((start < 1).any()) or bool((start > t).any()):
        raise ValueError(f"response_start must lie in [1, {t}] (a response needs a prompt before it); got "
                         f"{start.tolist()}")
    if intervention is not None:
        if not intervention._attached:
            raise ValueError("the intervention passed to response_logprobs is detached")
        intervention._score_from = start
        intervention._score_min = int(start.min())
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        if intervention is not None:
            intervention._score_from = None
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    logp = torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)
    columns = torch.arange(t, device=input_ids.device)[None, :]
    mask = columns >= start[:, None]
    if "attention_mask" in inputs:
        mask = mask & inputs["attention_mask"].bool()
    return torch.where(mask, logp, torch.zeros_like(logp)), mask


# ---------------------------------------------------------------------------------------------------- prompt cache
PER_TOKEN_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwarg(model) -> str:
    """The name under which ``model``'s forward takes the key/value cache (``cache`` in recent transformers, else
    ``past_key_values``)."""
    return _cache_kwarg_of(type(model).forward)


class PromptCache:
    """A batch of prompts run once, up to but not including each prompt's last token, to score many responses
    after it (:func:`cached_response_logprobs`, :func:`cached_stepwise_logprobs`).

    D-LEAF, PAI and SPIN act only from a prompt's last token on, so the keys and values of the rows before it are the
    same under every method and knob (gamma included): they are computed once, by the plain model (an attached
    intervention is set aside while they are), and every scoring call after that pays only for its own tokens. A
    scoring call appends to the cache and crops it back to the prompt when it ends.

    ``inputs``: the prompts' model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...), left-padded to a
    common length of at least 2. Positions are those :func:`response_logprobs` uses (the model's default
    ``arange``). Models with multimodal rotary positions (Qwen2-VL's M-RoPE) are refused: their text positions after
    the image depend on the whole prompt, which a cached call does not see; score them with
    :func:`response_logprobs`.
    """

    def __init__(self, model, inputs: dict):
        if "input_ids" not in inputs:
            raise ValueError("PromptCache needs the prompts' input_ids (to find the image tokens)")
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"PromptCache needs input_ids of shape (batch, length >= 2), got {tuple(ids.shape)}")
        if "position_ids" in inputs:
            raise ValueError("PromptCache takes no position_ids: it uses the model's default positions, as "
                             "response_logprobs does")
        inner = getattr(model, "model", model)
        if hasattr(inner, "get_rope_index") or hasattr(model, "get_rope_index"):
            raise ValueError(f"{type(model).__name__} has multimodal rotary positions (M-RoPE), which a cached prompt "
                             "cannot carry; score it with response_logprobs (one pass over prompt and response)")
        image_id = image_token_id(model)
        if bool((ids[:, -1] == image_id).any()):
            raise ValueError("a prompt ends with an image token; the last prompt token must be text (it is scored "
                             "with the responses, without the image inputs)")
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        self.input_ids, self.attention_mask = ids, mask
        self.length = ids.shape[1] - 1  # rows held in the cache
        head = {k: (v[:, :-1] if k in PER_TOKEN_INPUTS else v) for k, v in inputs.items()}
        head["attention_mask"] = mask[:, :-1]
        self.model = model
        attached = self._attached()
        if attached is not None:
            attached.detach()
        if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
            head["logits_to_keep"] = 1  # the prompt's logits are not needed
        try:
            with torch.no_grad():
                out = model(**head, use_cache=True)
        finally:
            if attached is not None:
                attached._attach()
        self.cache = getattr(out, "cache", None)
        if self.cache is None:
            self.cache = out.past_key_values
        if self.cache is None or not hasattr(self.cache, "crop"):
            raise RuntimeError(f"{type(model).__name__} returned no croppable key/value cache for the prompt")

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def _check(self, response: torch.Tensor, response_mask: torch.Tensor | None) -> torch.Tensor:
        if response.dim() != 2 or response.shape[0] != self.batch_size or response.shape[1] < 1:
            raise ValueError(f"response must have shape ({self.batch_size}, length >= 1) for this prompt cache, got "
                             f"{tuple(response.shape)}")
        if int(self.cache.get_seq_length()) != self.length:
            raise RuntimeError(f"the prompt cache holds {int(self.cache.get_seq_length())} rows, expected "
                               f"{self.length}; was it used outside the cached scorers?")
        if response_mask is None:
            return torch.ones_like(response)
        if response_mask.shape != response.shape:
            raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}, response "
                             f"{tuple(response.shape)}")
        return response_mask

    def _attached(self) -> "Intervention | None":
        return _attached_to(text_attention_modules(self.model))

    def _check_intervention(self, intervention) -> None:
        attached = self._attached()
        if intervention is None and attached is not None:
            raise ValueError("an intervention is attached to the prompt cache's model: pass it to the cached scorer "
                             "(or detach it to score the plain model)")
        if intervention is not None and intervention is not attached:
            raise ValueError("the intervention passed to the cached scorer is not the one attached to the prompt "
                             "cache's model (detached, or attached to another model)")

    def _rewind(self) -> None:
        """Crop the cache back to the prompt (``crop`` takes the negative count of tokens to remove)."""
        extra = int(self.cache.get_seq_length()) - self.length
        if extra > 0:
            self.cache.crop(-extra)

    def _call(self, ids: torch.Tensor, mask: torch.Tensor, intervention, resume: torch.Tensor, score_from=None):
        if intervention is not None:
            intervention._resume_ids = resume
            if score_from is not None:
                intervention._score_from = score_from
                intervention._score_min = int(score_from.min())
        try:
            return self.model(input_ids=ids, attention_mask=mask, use_cache=True,
                              **{cache_kwarg(self.model): self.cache}).logits
        finally:
            if intervention is not None:
                intervention._resume_ids = None
                intervention._score_from = None


def _response_logp(logits: torch.Tensor, response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = token_logprobs(logits, response)
    return torch.where(mask.bool(), logp, torch.zeros_like(logp))


def cached_response_logprobs(prompt: PromptCache, response: torch.Tensor, response_mask: torch.Tensor | None = None,
                             intervention: Intervention | None = None) -> torch.Tensor:
    """Teacher-forced log-probabilities of ``response`` (B, R) after the cached prompts, in one forward pass over the
    prompts' last token and the response: (B, R), ``[b, t] = log p(response[b, t] | prompt[b], response[b, :t])``
    where ``response_mask`` (right padding; default all ones) is set, else 0.

    Equal, up to rounding, to the response columns of :func:`response_logprobs` over prompt and response, with the
    same ``intervention`` (attached to the prompt cache's model) correcting every row from the last prompt token on.
    """
    mask = prompt._check(response, response_mask)
    prompt._check_intervention(intervention)
    ids = torch.cat([prompt.input_ids[:, -1:], response], dim=1)
    full_mask = torch.cat([prompt.attention_mask, mask.to(prompt.attention_mask.dtype)], dim=1)
    resume = torch.cat([prompt.input_ids, response], dim=1)
    start = torch.full((prompt.batch_size,), prompt.input_ids.shape[1], device=response.device)
    try:
        logits = prompt._call(ids, full_mask, intervention, resume, start)
    finally:
        prompt._rewind()
    return _response_logp(logits[:, :-1], response, mask)


def cached_stepwise_logprobs(prompt: PromptCache, response: torch.Tensor, response_mask: torch.Tensor | None = None,
                             intervention: Intervention | None = None) -> torch.Tensor:
    """:func:`cached_response_logprobs` computed step by step, as decoding would: the prompts' last token, then one
    cached forward call per response token (R calls in all). The reference the one-pass scorer is checked and
    benchmarked against."""
    mask = prompt._check(response, response_mask)
    prompt._check_intervention(intervention)
    full_mask = torch.cat([prompt.attention_mask, mask.to(prompt.attention_mask.dtype)], dim=1)
    n = prompt.input_ids.shape[1]
    logits = []
    try:
        ids = prompt.input_ids[:, -1:]
        logits.append(prompt._call(ids, full_mask[:, :n], intervention, prompt.input_ids)[:, -1])
        for t in range(response.shape[1] - 1):
            logits.append(prompt._call(response[:, t:t + 1], full_mask[:, :n + t + 1], None, None)[:, -1])
    finally:
        prompt._rewind()
    return _response_logp(torch.stack(logits, dim=1), response, mask)
