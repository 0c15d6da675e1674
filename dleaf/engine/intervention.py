"""A method attached to a model: which rows it acts on, its per-sequence state, and how that state follows the batch.

Which rows are acted on ("active" rows): during ``generate``, the last prompt row at prefill and every generated
row after it; in teacher-forced scoring (:func:`dleaf.engine.response_logprobs`), every row from the last prompt
token on, in one forward pass. The method sees the active rows of the layers it watches; other layers run plain
eager attention when the model was loaded with it, else sdpa (``unwatched``, see :func:`dleaf.engine.attach`).

A sequence starts with a forward call on an empty cache (the prompt's ``input_ids`` give each sample's image
positions). Its state lives per batch row, and follows what ``generate`` does to the batch through the cache object
itself (:mod:`dleaf.engine.cache_events`): beam search's ``reorder_cache`` reorders it the same way, and a ``crop``
rolls it back where that is exact (to before the first active position, or for methods without running state);
anything else is refused when the sequence is continued. ``generate(use_cache=False)`` calls the model on the whole
sequence at every step: such a call that extends the previous one's tokens is the next step of the same sequence,
computed in one teacher-forced pass over every row from the prompt's last token on, which equals the cached run.
Calls that decode several new tokens at once with a cache (assisted and prompt-lookup decoding verify candidates
that way, and their first call holds prompt and candidates together, so the prompt's end is unknown) are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any

import torch

from . import cache_events, kernels
from .interface import (ATTENTION_NAME, attached_to, image_token_id, register_modules, resolve_unwatched,
                        text_attention_modules, text_config, unregister_modules, UNWATCHED)
from .trace import Trace


@dataclasses.dataclass
class AttentionCall:
    """One watched layer's attention call, as a method sees it. Rows ``[first:]`` of ``query`` (and of the attention
    weights) are the active suffix: ``active`` (B, Qa) says which of them are active for each sample; ``image`` (B, K)
    marks the image keys. ``softcap`` and ``sinks`` are the model's attention arguments (honoured by
    :meth:`weights`)."""

    host: "Intervention"
    layer: int
    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float
    dropout: float
    softcap: float | None
    sinks: torch.Tensor | None
    first: int
    active: torch.Tensor
    image: torch.Tensor
    pad: int = 0
    prefix: torch.Tensor | None = None

    def scores(self) -> torch.Tensor:
        """``query @ key^T`` (B, H, Q, K), before scaling."""
        k = kernels.repeat_kv(self.key, getattr(self.module, "num_key_value_groups", 1))
        return torch.matmul(self.query, k.transpose(2, 3))

    def weights(self, pre_softmax=None) -> torch.Tensor:
        """The eager post-softmax weights (B, H, Q, K), dropout applied as the model's attention applies it.

        In a layer of the intervention's pre-method hook (a fault, :mod:`dleaf.faults`), the active rows are the
        hook's rows, before the method sees them. A method that edits the pre-softmax scores (``pre_softmax``, as
        PAI does) gets the scores whose softmax is the hook's rows: the log of each changed weight plus the row's
        log-normaliser, every unchanged weight keeping its score bit for bit; a weight made zero gets the lowest finite
        score, as a masked key has."""
        hook = self.host.pre_method
        if hook is not None and self.layer in hook.layers:
            if pre_softmax is None:
                weights = kernels.eager_weights(self.module, self.query, self.key, self.attention_mask,
                                                self.scaling, None, self.softcap, self.sinks)
                weights = self._suffix(weights, hook(self, weights[:, :, self.first:]))
            else:
                if self.sinks is not None:
                    raise NotImplementedError("a fault under a method that edits pre-softmax scores, with attention "
                                              "sinks, is not supported")
                weights = kernels.eager_weights(self.module, self.query, self.key, self.attention_mask,
                                                self.scaling, self._hooked_scores(hook, pre_softmax), self.softcap)
        else:
            weights = kernels.eager_weights(self.module, self.query, self.key, self.attention_mask, self.scaling,
                                            pre_softmax, self.softcap, self.sinks)
        return torch.nn.functional.dropout(weights, p=self.dropout, training=self.module.training)

    def positions(self) -> torch.Tensor:
        """(B, Qa): each active-suffix row's index among its sample's active rows (0: the last prompt token, whose
        row predicts the first generated token; then one per generated token); negative where not active."""
        return self.host.row_positions(self.pad)

    def _suffix(self, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.first == 0 else torch.cat([weights[:, :, :self.first], rows], dim=2)

    def _hooked_scores(self, hook, pre_softmax):
        def edit(scores):
            rows = scores[:, :, self.first:]
            plain = torch.nn.functional.softmax(rows, dim=-1, dtype=torch.float32)
            new = hook(self, plain)
            norm = torch.logsumexp(rows.float(), dim=-1, keepdim=True)
            low = torch.finfo(scores.dtype).min  # a weight made zero gets the mask's score, not -inf
            rows = torch.where(new != plain, (torch.log(new) + norm).clamp(min=low), rows.float()).to(scores.dtype)
            return pre_softmax(self._suffix(scores, rows))

        return edit

    def values(self) -> torch.Tensor:
        return kernels.repeat_kv(self.value, getattr(self.module, "num_key_value_groups", 1))

    def finish(self, out: torch.Tensor, weights: torch.Tensor | None):
        """The attention function's return value from the (B, H, Q, D) output of the computed rows."""
        out = out.transpose(1, 2).contiguous()
        if self.prefix is None:
            return out, weights
        return torch.cat([self.prefix, out], dim=1), None

    def record(self, record: dict | None) -> None:
        """Keep this layer's trace record (per-row tensors over the computed rows; ignored without a trace)."""
        if record is not None:
            self.host.keep_record(self.layer, record, self.pad)


@dataclasses.dataclass
class _Sequence:
    image: torch.Tensor  # (B, T0) image positions of the prompt
    active_from: torch.Tensor  # (B,) first active column per row
    first_active: int  # the smallest of them
    length: int  # columns processed so far (the cache length after the last call)
    trace_start: int  # index of the sequence's first trace record
    prompt: torch.Tensor | None = None  # the first call's input_ids, kept for generate(use_cache=False)
    cache: Any = None  # weak reference to the cache object followed
    stale: int | None = None  # the length a crop rolled back to, where the state could not follow


class Intervention:
    """A method attached to a model. Use :func:`dleaf.engine.attach` (or :func:`dleaf.engine.attached`)."""

    def __init__(self, model, config, trace: bool = False, unwatched: str = "auto", compile: bool = False,
                 fault=None):
        from ..methods import Method, method_for

        if unwatched not in UNWATCHED:
            raise ValueError(f"unwatched must be 'auto' (the model's own kind), 'eager' (exact) or 'sdpa' (faster), "
                             f"got {unwatched!r}")
        self.model, self.config, self.compile = model, config, bool(compile)
        self.unwatched_choice = unwatched
        self.unwatched = unwatched  # resolved when attached ("auto": from the model's attention implementation)
        self.image_token_id = image_token_id(model)
        self.modules = text_attention_modules(model)
        self.num_layers = len(self.modules)
        self.num_heads = int(text_config(model).num_attention_heads)
        if config is None:
            if fault is None:
                raise ValueError("nothing to attach: give a method, a fault, or both")
            self.method = Method(None, self)  # the fault alone, on plain decoding
            self.watched = set()
        else:
            self.method = method_for(config)(config, self)
            self.watched = set(self.method.watched_layers(self.num_layers)) if self.method.acts_on_attention else set()
        # the pre-method hook (a fault): fault.bind(layers, heads) -> hook with .layers and hook(call, rows) -> rows
        self.fault = fault
        self.pre_method = fault.bind(self.num_layers, self.num_heads) if fault is not None else None
        if self.pre_method is not None and self.compile:
            raise ValueError("compile=True runs the softmax inside a compiled region that a fault cannot reach; "
                             "attach a fault without compile")
        self.trace = Trace(self.num_layers, self.num_heads) if trace else None
        self._attached = False
        self._seq: _Sequence | None = None
        self._call: dict = {}
        self._plan: dict | None = None  # what the next forward call is (see scoring())
        self._checked: set[type] = set()
        self._aside = False

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        return self._attached

    def _attach(self) -> "Intervention":
        if attached_to(self.modules) is not None:
            raise RuntimeError("this model already has a D-LEAF intervention attached; detach it first")
        self._previous = text_config(self.model)._attn_implementation
        self.unwatched = resolve_unwatched(self.unwatched_choice, self._previous)
        register_modules(self, self.modules)
        if self._switches_attention:
            self._set_implementation(ATTENTION_NAME)
        self._hooks = [
            self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            self.model.register_forward_hook(self._post_forward, with_kwargs=True),
        ]
        self._attached = True
        return self

    @property
    def _switches_attention(self) -> bool:
        return self.method.acts_on_attention or self.pre_method is not None

    def reattach(self) -> "Intervention":
        """Attach again after :meth:`detach`, keeping the current sequence's state (to take turns with other
        decodings of the same model, one step at a time)."""
        if self._attached:
            raise RuntimeError("the intervention is attached already")
        return self._attach()

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
        unregister_modules(self.modules)
        if self._switches_attention:
            self._set_implementation(self._previous)
        self._attached = False

    def __enter__(self) -> "Intervention":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ public controls
    @contextlib.contextmanager
    def scoring(self, response_start: torch.Tensor | None = None, tokens_so_far: torch.Tensor | None = None):
        """Declare what the next forward call inside the block is: a teacher-forced scoring pass in which every row
        from ``response_start[b] - 1`` (the last prompt token) on is active (``response_start`` (B,)), and/or the
        continuation of a cached prompt whose tokens so far, prompt included, are ``tokens_so_far`` (B, T): a new
        sequence whose image positions come from them. Used by :func:`dleaf.engine.response_logprobs` and the
        :class:`dleaf.engine.PromptCache` scorers."""
        if not self._attached:
            raise ValueError("the intervention is detached")
        plan = {}
        if response_start is not None:
            start = torch.as_tensor(response_start).long().reshape(-1)
            plan["response_start"], plan["first"] = start, int(start.min())
        if tokens_so_far is not None:
            plan["tokens_so_far"] = tokens_so_far
        self._plan = plan
        try:
            yield self
        finally:
            self._plan = None

    @contextlib.contextmanager
    def aside(self):
        """Forward calls of the model inside the block are not part of the sequence: the hooks let them through
        untouched (a method's own extra passes, such as VCD's noised stream)."""
        before, self._aside = self._aside, True
        try:
            yield self
        finally:
            self._aside = before

    @property
    def gamma_override(self):
        raise AttributeError("Intervention.gamma_override is gone: use Intervention.set_gamma(gamma)")

    @gamma_override.setter
    def gamma_override(self, value):
        # a caller of the former private attribute would otherwise set a value nothing reads
        raise AttributeError("Intervention.gamma_override is gone: use Intervention.set_gamma(gamma)")

    def set_gamma(self, gamma) -> None:
        """Replace the configured strength of a method that has one (D-LEAF's ``gamma``) by ``gamma``: a number or a
        0-d tensor, possibly requiring grad and outside [0, 1] (the fusion extrapolated), so that the derivative of a
        loss with respect to gamma at 0 can be taken by autograd with the flags fixed. ``None`` restores the
        configured value."""
        self.method.set_gamma(gamma)

    def generation_kwargs(self, inputs: dict) -> dict:
        """Extra keyword arguments the attached method needs in ``model.generate(**inputs, ...)``; see
        :func:`dleaf.engine.generation_kwargs`."""
        if not self._attached:
            raise ValueError("the intervention passed to generation_kwargs is detached")
        return self.method.generation_kwargs(inputs)

    def name_samples(self, keys) -> None:
        """Name the rows of the next sequence (one key per batch row, in order) for a localizer that reads flags per
        sample (``localization="oracle"``, :mod:`dleaf.methods.localizers.oracle`); without it the rows are
        numbered in order from 0 since the method was attached."""
        self.method.name_samples(keys)

    def flag_rate(self) -> float:
        """Fraction of (active position, watched layer) pairs flagged so far (needs ``trace=True``)."""
        if self.trace is None:
            raise RuntimeError("flag_rate needs the intervention attached with trace=True")
        return self.trace.flag_rate()

    def running_statistics(self) -> dict[str, torch.Tensor] | None:
        """The method's running per-row state of the current sequence (D-LEAF: ``count``, ``total``, ``squares``
        and ``best`` per layer and row, (L, B)), or None for a method without one."""
        return self.method.running_statistics()

    # ------------------------------------------------------------------ hooks
    def _pre_forward(self, module, args, kwargs):
        if self._aside:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        n = tokens.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        plan, self._plan = self._plan, None
        plan = plan or {}
        start = plan.get("response_start")
        new = True
        if "tokens_so_far" in plan:
            resume = plan["tokens_so_far"]
            if resume.shape[1] != past + n:
                raise RuntimeError(f"the resumed sequence holds {resume.shape[1]} tokens, but the cache holds {past} "
                                   f"and the call brings {n}")
            self._new_sequence(resume, start, plan.get("first"))
        elif past == 0:
            if start is None and self._continues_without_cache(input_ids, kwargs):
                self._replay()
                new = False
            else:
                if input_ids is None:
                    raise ValueError("D-LEAF needs input_ids on the first forward call of a sequence, to find the "
                                     "image tokens (config image_token_id); got inputs_embeds only")
                keep = kwargs.get("logits_to_keep")
                if start is None and isinstance(keep, int) and keep > 1:
                    raise NotImplementedError(
                        f"a first forward call asking for the logits of its last {keep} positions: this is how "
                        "assisted and prompt-lookup decoding verify candidate tokens, with the candidates in the same "
                        "call as the prompt, so the prompt's end is unknown; the engine does not support them "
                        "(decode without assistant_model / prompt_lookup_num_tokens)")
                self._new_sequence(input_ids, start, plan.get("first"), keep_prompt=kwargs.get("use_cache") is False)
        else:
            seq = self._seq
            if seq is None:
                raise RuntimeError("a cached forward call reached D-LEAF before any prefill; attach before generating")
            if seq.stale is not None:
                raise RuntimeError(
                    f"the cache of this sequence was cropped back to {seq.stale} tokens, inside the positions "
                    f"{type(self.method).__name__} has already folded into its running state, which it cannot roll "
                    "back; start a new sequence")
            if n > 1:
                raise NotImplementedError(
                    f"a cached forward call bringing {n} new tokens: the engine acts one decoding step at a time "
                    "(chunked prefill, and assisted and prompt-lookup decoding, which verify several candidate tokens "
                    "per call, are not supported); score a given continuation with response_logprobs or a "
                    "PromptCache")
            new = False
        seq = self._seq
        if cache is not None:
            self._follow(cache)
        device = seq.image.device
        columns = torch.arange(past, past + n, device=device)
        self._call = {"columns": columns, "first_column": past, "image_keys": {}, "active_rows": {}}
        if self.trace is not None:
            self._call["record"] = {"columns": columns.cpu(), "layers": {}}
        self.method.before_forward(kwargs, new)
        return None

    def _post_forward(self, module, args, kwargs, output):
        if self._aside:
            return None
        self.method.end_forward()
        seq = self._seq
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if cache is not None:
            self._follow(cache)
        columns = self._call.get("columns")
        if columns is not None and columns.numel():
            seq.length = self._call["first_column"] + int(columns.numel())
        record = self._call.pop("record", None)
        if self.trace is not None and record is not None:
            record["active"] = self._active(record["columns"].to(seq.image.device)).cpu()
            self.trace.steps.append(record)
        return None

    # ------------------------------------------------------------------ the sequence
    def _new_sequence(self, input_ids: torch.Tensor, response_start=None, first=None, keep_prompt=False) -> None:
        image = input_ids == self.image_token_id
        if not bool(image.any(dim=1).all()):
            missing = (~image.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"samples {missing} of the batch have no image token (id {self.image_token_id}); "
                             "D-LEAF acts on attention to the image and needs one in every sample (and the image in "
                             "the first forward call: chunked prefill, generate(prefill_chunk_size=...), is not "
                             "supported)")
        b, n = input_ids.shape
        dev = input_ids.device
        if response_start is not None:
            if response_start.shape != (b,):
                raise ValueError(f"response_start has shape {tuple(response_start.shape)}, expected ({b},)")
            active_from, first_active = response_start.to(dev) - 1, first - 1
        else:
            active_from, first_active = torch.full((b,), n - 1, device=dev), n - 1
        self._seq = _Sequence(image=image, active_from=active_from, first_active=first_active, length=0,
                              trace_start=len(self.trace.steps) if self.trace is not None else 0,
                              prompt=input_ids if keep_prompt else None)
        self.method.begin(b, dev)

    def _continues_without_cache(self, input_ids, kwargs) -> bool:
        """Whether a call without a cache is the next step of ``generate(use_cache=False)`` on the current
        sequence: ``use_cache=False``, the same rows, more tokens, the same prompt."""
        seq = self._seq
        if seq is None or seq.prompt is None or input_ids is None or kwargs.get("use_cache") is not False:
            return False
        prompt = seq.prompt
        return (input_ids.shape[0] == prompt.shape[0] and input_ids.shape[1] > seq.length
                and bool(torch.equal(input_ids[:, :prompt.shape[1]], prompt)))

    def _replay(self) -> None:
        """The next step of ``generate(use_cache=False)``: the method's state starts over and every row from the
        prompt's last token on is computed again in this one pass (the teacher-forced equal of the cached steps)."""
        self.method.check_replay()
        seq = self._seq
        if self.trace is not None:
            del self.trace.steps[seq.trace_start:]
        self.method.begin(seq.image.shape[0], seq.image.device)

    def _active(self, columns: torch.Tensor) -> torch.Tensor:
        return columns[None, :] >= self._seq.active_from[:, None]

    def _follow(self, cache) -> None:
        seq = self._seq
        if seq is None or (seq.cache is not None and seq.cache() is cache) or not cache_events.can_follow(cache):
            return
        cache_events.follow(cache, self)
        seq.cache = weakref.ref(cache)

    def cache_event(self, cache, name: str, args: tuple, kwargs: dict) -> None:
        """Called by a followed cache after ``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``
        or ``crop`` (see :mod:`dleaf.engine.cache_events`): the state does the same."""
        seq = self._seq
        if seq is None or seq.cache is None or seq.cache() is not cache:
            return
        value = args[0] if args else next(iter(kwargs.values()))
        device = seq.image.device
        if name == "crop":
            self._rollback(int(cache.get_seq_length()))
            return
        if name == "batch_repeat_interleave":
            index = torch.arange(seq.image.shape[0], device=device).repeat_interleave(int(value))
        else:
            index = torch.as_tensor(value, device=device)
            index = index.nonzero().flatten() if index.dtype == torch.bool else index.long()
        self._reorder(index)

    def _reorder(self, index: torch.Tensor) -> None:
        """Row i of the batch becomes old row ``index[i]`` (beam search): the state moves with it."""
        seq = self._seq
        seq.image = seq.image.index_select(0, index)
        seq.active_from = seq.active_from.index_select(0, index)
        if seq.prompt is not None:
            seq.prompt = seq.prompt.index_select(0, index)
        self.method.reorder(index)
        if self.trace is not None:
            self.trace.reorder(index)

    def _rollback(self, length: int) -> None:
        """The cache was cropped to ``length`` tokens: roll the state back with it, or mark it stale."""
        seq = self._seq
        if length >= seq.length:
            return
        if self.trace is not None:
            self.trace.truncate(length, seq.trace_start)
        if length <= int(seq.active_from.min()):  # no active row is left: the state is the sequence's start
            self.method.begin(seq.image.shape[0], seq.image.device)
        elif not self.method.rollback(length):
            seq.stale = length
        seq.length = length

    # ------------------------------------------------------------------ attention
    def attend(self, layer, module, query, key, value, attention_mask, scaling, dropout, kwargs):
        """The attention of an attached module (called by :func:`dleaf.engine.interface.dispatch`)."""
        if type(module) not in self._checked:
            owner = type(self.model).__name__
            kernels.check_arguments(kwargs, owner)
            if not module.training:
                kernels.verify_against_model(module, query, key, value, attention_mask, scaling, kwargs, owner)
            self._checked.add(type(module))
        softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
        sdpa_ok = softcap is None and sinks is None  # sdpa honours neither
        hooked = self.pre_method is not None and layer in self.pre_method.layers
        if layer not in self.watched and not hooked:
            if self.unwatched == "sdpa" and sdpa_ok:
                return kernels.plain_sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
            return kernels.plain_eager(module, query, key, value, attention_mask, scaling, dropout, softcap, sinks)
        columns = self._call["columns"]
        q_len, k_len = query.shape[2], key.shape[2]
        if columns.shape[0] != q_len:
            raise RuntimeError(f"D-LEAF expected {columns.shape[0]} query rows, the attention got {q_len}")
        # The suffix of rows that any sample treats as active (all rows in scoring, the last one at prefill).
        first = max(0, min(self._seq.first_active - self._call["first_column"], q_len - 1))
        active = self._call["active_rows"].get(first)
        if active is None:
            active = self._call["active_rows"][first] = self._active(columns[first:])  # (B, Qa)
        pad, prefix = first, None
        if (first > 0 and self.unwatched == "sdpa" and sdpa_ok and attention_mask is not None
                and not torch.is_grad_enabled()):
            # The rows before the active suffix are never changed: with unwatched="sdpa" (speed over bit-exactness)
            # they take the fast kernel, and only the active rows are computed eagerly (prefill: one row, not Q x K).
            prefix, _ = kernels.plain_sdpa(module, query[:, :, :first], key, value, attention_mask[:, :, :first],
                                           scaling, dropout, **kwargs)
            query, attention_mask, first = query[:, :, first:], attention_mask[:, :, first:], 0
        call = AttentionCall(self, layer, module, query, key, value, attention_mask, scaling, dropout, softcap, sinks,
                             first, active, self.image_keys(k_len), pad, prefix)
        if layer not in self.watched:  # a faulted layer the method does not watch: the faulted rows, nothing else
            weights = call.weights()
            return call.finish(torch.matmul(weights, call.values()), weights)
        return self.method.attend(call)

    def row_positions(self, pad: int) -> torch.Tensor:
        """(B, Q - pad): for the rows from ``pad`` on of this forward call, the index of each among its sample's
        active rows (0 at the last prompt token), negative before them."""
        return self._call["columns"][pad:][None, :] - self._seq.active_from[:, None]

    def keep_record(self, layer: int, record: dict, pad: int) -> None:
        """Store a layer's trace record for this forward call, padded to every query row, on the CPU."""
        if self.trace is None or "record" not in self._call:
            return
        record = {k: torch.nn.functional.pad(t, (pad, 0), value=(float("nan") if t.is_floating_point() else 0))
                  .to("cpu") for k, t in record.items()}
        for k in ("flag", "corrected"):
            if k in record:
                record[k] = record[k].bool()
        self._call["record"]["layers"][layer] = record

    def image_keys(self, k_len: int) -> torch.Tensor:
        """The image mask over ``k_len`` keys (B, K), padded or cut once per forward call and shared by layers."""
        cache = self._call["image_keys"]
        if k_len not in cache:
            image = self._seq.image
            if image.shape[1] < k_len:
                image = torch.nn.functional.pad(image, (0, k_len - image.shape[1]))
            cache[k_len] = image[:, :k_len]
        return cache[k_len]

    def image_row(self, k_len: int, dtype) -> torch.Tensor:
        """The image mask over ``k_len`` keys as numbers of ``dtype``, shaped (B, 1, K); once per forward call."""
        cache = self._call["image_keys"]
        key = (k_len, dtype)
        if key not in cache:
            cache[key] = self.image_keys(k_len).to(dtype)[:, None, :]
        return cache[key]

    @property
    def image(self) -> torch.Tensor:
        """The current sequence's image positions (B, T0)."""
        return self._seq.image
