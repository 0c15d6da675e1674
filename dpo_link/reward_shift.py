"""Implicit rewards of a DPO adapter and of D-LEAF, per sequence and per token, for any (image, prompt, response) rows.

THEORY.md point 1: a policy pi with reference pi_0 is the optimum of the KL-regularised objective for its implicit
reward ``r(x, y) = beta * log pi(y | x) / pi_0(y | x) = beta * sum_t log pi(y_t | x, y_<t) / pi_0(y_t | x, y_<t)``.

- ``r_theta``: pi = the base model with its PEFT adapter on, pi_0 = the same model inside ``disable_adapter()``:
  exactly what TRL's ``DPOTrainer`` logs as ``rewards/chosen`` / ``rewards/rejected`` (batch means).
- ``r_D``: pi = D-LEAF's teacher-forced scoring (:func:`dleaf.engine.response_logprobs` with the intervention
  attached; equal to step-by-step decoding), pi_0 = plain scoring of the same tokens, both with the adapter off.

Rows are turned into model inputs by TRL's own vision preference collator (through
:class:`dpo_link.collate.VisionPreferenceCollator`, which restores the BOS like inference), so the tokens scored are
the tokens DPO trains on: each prompt is followed by its reply, sequences are flushed left and padded on the right,
and ``completion_mask`` marks the reply. A preference batch holds the chosen replies first and the rejected ones
second, as TRL's does.

Every forward pass here runs through the engine's attention function: the reference passes attach D-LEAF at gamma 0
(bit-for-bit the plain model, see ``dleaf.engine.fuse_heads``) with a trace, so that the same pass also yields each
head's image mass (IAF with ``iaf_variant="mass"``) at every position that predicts a reply token; that is what the
mechanism comparison of :mod:`dpo_link.correspondence` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dleaf import engine
from dleaf.config import DLeafConfig

from .collate import VisionPreferenceCollator
from .pairs import assistant_reply, user_prompt

NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
#: the configuration of the reference passes: the plain model (gamma 0) with each head's image mass in the trace
MASS_PROBE = DLeafConfig(gamma=0.0, iaf_variant="mass")

#: token kinds of :func:`token_kinds`
OTHER, GROUNDED, HALLUCINATED = 0, 1, 2
KIND_NAMES = {OTHER: "other", GROUNDED: "grounded", HALLUCINATED: "hallucinated"}


# ------------------------------------------------------------------------------------------------ adapters
def peft_parts(peft_model):
    """``(peft_model, base)``: the PEFT wrapper and the transformers model inside it (which holds the LoRA layers).

    Raises a TypeError naming the model when it is not a PEFT model, and a ValueError when it has no active adapter.
    """
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise ImportError("r_theta needs peft") from e
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"r_theta needs a peft.PeftModel (the base model with its DPO adapter); got "
                        f"{type(peft_model).__name__}. Load one with dpo_link.reward_shift.load_adapter(model, path)")
    if not getattr(peft_model, "peft_config", None):
        raise ValueError("the PEFT model has no adapter configured")
    return peft_model, peft_model.get_base_model()


def load_adapter(model, path: str | Path):
    """``PeftModel.from_pretrained(model, path)`` in eval mode, after checking that the adapter belongs to ``model``.

    An adapter trained on another model fails here with a ValueError that says so: its target modules must exist in
    ``model`` and each saved LoRA weight must have the shape of the module it adapts (PEFT alone would report a
    state-dict size mismatch, or silently load nothing when no key matches).
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no PEFT adapter at {path}: expected adapter_config.json and "
                                "adapter_model.safetensors "
                                "(train one with scripts/train_dpo.py)")
    cfg = json.loads(cfg_file.read_text())
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"{path} has adapter_config.json but no adapter_model.safetensors")
    saved = load_file(str(weights_file))
    modules = dict(model.named_modules())
    problems, matched = [], 0
    for key, tensor in saved.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        kind = "lora_A" if ".lora_A." in key else "lora_B"
        name = key.split(f".{kind}.")[0]
        if name.startswith("base_model.model."):
            name = name[len("base_model.model."):]
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            problems.append(f"{name} (no such module in {type(model).__name__})")
            continue
        out_f, in_f = module.weight.shape
        ok = tensor.shape[1] == in_f if kind == "lora_A" else tensor.shape[0] == out_f
        if not ok:
            problems.append(f"{key}: shape {tuple(tensor.shape)} does not fit {name} of shape {(out_f, in_f)}")
        matched += 1
    if problems or matched == 0:
        detail = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(f"the adapter at {path} does not belong to this model (its base model is "
                         f"{cfg.get('base_model_name_or_path')!r}): " + (detail or "no LoRA weight matched a module"))
    peft_model = PeftModel.from_pretrained(model, str(path))
    peft_model.eval()
    return peft_model


@contextlib.contextmanager
def adapter_off(peft_model):
    """The reference policy: the PEFT model with its adapter disabled (nothing else changes)."""
    with peft_model.disable_adapter():
        yield


# ---------------------------------------------------------------------------------------------------- batches
def pair_batches(rows: Sequence[dict], processor, batch_size: int = 16,
                 max_length: int | None = None) -> Iterator[tuple[dict, slice]]:
    """Collated preference batches of TRL's vision format rows (``images``, ``prompt``, ``chosen``, ``rejected``),
    ``batch_size`` pairs each (so 2 x batch_size sequences: chosen first, rejected second), with the slice of rows
    each covers."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    collator = VisionPreferenceCollator(processor=processor, max_length=max_length)
    for i in range(0, len(rows), batch_size):
        chunk = [dict(r) for r in rows[i:i + batch_size]]
        yield collator(chunk), slice(i, i + len(chunk))


def response_rows(images: Sequence, prompts: Sequence[str], responses: Sequence[str], **meta) -> list[dict]:
    """Rows of (image, prompt, response) in the conversational format :func:`response_batches` reads; ``meta``
    columns (lists of the same length, e.g. ``objects``) are copied into each row."""
    n = len(images)
    for name, seq in [("prompts", prompts), ("responses", responses), *meta.items()]:
        if len(seq) != n:
            raise ValueError(f"got {n} images but {len(seq)} {name}; every row needs one of each")
    return [{"images": [images[i]], "prompt": user_prompt(prompts[i]), "response": assistant_reply(responses[i]),
             **{k: v[i] for k, v in meta.items()}} for i in range(n)]


def response_batches(rows: Sequence[dict], processor, batch_size: int = 16,
                     max_length: int | None = None) -> Iterator[tuple[dict, slice]]:
    """Collated batches of single responses (rows with ``images``, ``prompt``, ``response``), tokenized exactly as
    :func:`pair_batches` tokenizes a chosen reply: each row is collated as a pair with itself and the first half of
    the batch is kept."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    collator = VisionPreferenceCollator(processor=processor, max_length=max_length)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        for j, r in enumerate(chunk):
            if "response" not in r:
                raise ValueError(f"row {i + j} has no 'response' column (columns: {', '.join(r)})")
        pairs = [{"images": r["images"], "prompt": r["prompt"], "chosen": r["response"], "rejected": r["response"]}
                 for r in chunk]
        batch = collator(pairs)
        n = len(chunk)
        if all(not torch.is_tensor(v) or v.shape[0] == 2 * n for v in batch.values()):
            batch = {k: (v[:n] if torch.is_tensor(v) else v) for k, v in batch.items()}
        else:  # image tensors not laid out per row (flat patches): keep the doubled batch, use its first half
            batch = dict(batch, _duplicated=True)
        yield batch, slice(i, i + n)


def response_start(batch: dict) -> torch.Tensor:
    """Column of each row's first reply token (from ``completion_mask``); a row without one is an error."""
    cm = batch["completion_mask"].bool()
    empty = (~cm.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} of the batch have no reply token (empty response, or cut by max_length)")
    return cm.int().argmax(dim=1)


# --------------------------------------------------------------------------------------------------- scoring
@dataclasses.dataclass
class Scored:
    """One pass over a batch: per-token log-probabilities of each row's reply and, when traced, per position that
    predicts a reply token, each (layer, head)'s image mass and whether D-LEAF corrected it.

    ``logprobs`` (B, T) tensor (0 outside the reply), ``mask`` (B, T) bool; ``mass`` and ``corrected``: per row a
    (n_reply_tokens, L, H) array, or None when not traced. Row b's reply tokens are ``input_ids[b][mask[b]]``.
    """

    logprobs: torch.Tensor
    mask: torch.Tensor
    mass: list[np.ndarray] | None = None
    corrected: list[np.ndarray] | None = None
    flagged: list[np.ndarray] | None = None

    def sequence(self) -> torch.Tensor:
        """``sum_t log p(y_t)`` per row (float64)."""
        return (self.logprobs.double() * self.mask).sum(dim=1)

    def tokens(self) -> list[np.ndarray]:
        """Per row, the reply tokens' log-probabilities (float64)."""
        return [self.logprobs[b][self.mask[b]].double().detach().cpu().numpy() for b in range(self.mask.shape[0])]


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS and not k.startswith("_")}


def _on_model_device(batch: dict, model) -> dict:
    """``batch`` with its tensors on ``model``'s device and its image tensors in the model's floating dtype."""
    param = next(model.parameters())
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(param.device)
            if k in ("pixel_values", "pixel_values_videos") and v.is_floating_point():
                v = v.to(param.dtype)
        out[k] = v
    return out


def score(model, batch: dict, method: DLeafConfig | None = None, trace: bool = False,
          intervention_factory=None, gamma_override: torch.Tensor | None = None) -> Scored:
    """Teacher-forced log-probabilities of each row's reply under ``model`` (plain when ``method`` is None, else
    with that D-LEAF configuration attached), in one forward pass.

    ``trace`` records, at each position that predicts a reply token, the image mass of every (layer, head) (needs
    ``method.iaf_variant == "mass"`` for the mass to be image mass) and the heads D-LEAF corrected.
    ``intervention_factory(model, config, trace)`` replaces :func:`dleaf.engine.attach` (the nulls use it);
    ``gamma_override`` replaces the intervention's gamma (a 0-d tensor; see ``Intervention.set_gamma``).
    Gradients flow when called outside ``torch.no_grad``.
    """
    batch = _on_model_device(batch, model)
    inputs = _model_inputs(batch)
    start = response_start(batch)
    if trace and method is None:
        raise ValueError("a trace needs a method attached (use MASS_PROBE for the plain model's image mass)")
    captured = {}
    # the logits, to take log-probabilities in the model's own precision when it is float64 (the engine's
    # response_logprobs works in float32, which quantises log-ratios of tiny corrections)
    hook = model.register_forward_hook(lambda m, a, o: captured.__setitem__("logits", o.logits))
    iv = None
    try:
        if method is None:
            _, mask = engine.response_logprobs(model, inputs, start)
        else:
            iv = engine.attach(model, method, trace=trace) if intervention_factory is None else \
                intervention_factory(model, method, trace)
            if gamma_override is not None:
                iv.set_gamma(gamma_override)
            _, mask = engine.response_logprobs(model, inputs, start, iv)
    finally:
        hook.remove()
        if iv is not None:
            iv.detach()
    logits = captured["logits"]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    ids = inputs["input_ids"]
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    logprobs = torch.cat([torch.zeros_like(logprobs[:, :1]), logprobs], dim=1)
    logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    expected = batch["completion_mask"].bool()
    if not torch.equal(mask, expected):
        raise RuntimeError("the scored reply columns differ from the collator's completion_mask; the reply must be "
                           "one contiguous run of tokens after the prompt")
    out = Scored(logprobs, mask)
    if trace:
        mass, corrected, flagged = [], [], []
        for b in range(mask.shape[0]):
            tr = iv.trace.sample(b)
            cols = mask[b].nonzero().flatten().cpu() - 1  # rows that predict reply tokens
            where = {int(p): i for i, p in enumerate(tr["positions"].tolist())}
            try:
                idx = torch.tensor([where[int(c)] for c in cols], dtype=torch.long)
            except KeyError as e:  # pragma: no cover - the engine traces every row from the last prompt token on
                raise RuntimeError(f"the trace misses position {e} of row {b}") from None
            mass.append(tr["iaf"][idx].detach().double().cpu().numpy())
            corrected.append(tr["corrected"][idx].cpu().numpy())
            flagged.append(tr["flag"][idx].cpu().numpy())
        out.mass, out.corrected, out.flagged = mass, corrected, flagged
    if batch.get("_duplicated"):
        n = mask.shape[0] // 2
        out = Scored(out.logprobs[:n], out.mask[:n], *(None if x is None else x[:n]
                                                          for x in (out.mass, out.corrected, out.flagged)))
    return out


def sequence_rewards(policy: Scored, reference: Scored, beta: float) -> torch.Tensor:
    """``beta * sum_t (log pi(y_t) - log pi_0(y_t))`` per row, float64 (the sum is taken in float64 over the reply
    tokens; TRL sums float32 log-probabilities, which agrees to float32 rounding)."""
    _check_beta(beta)
    if not torch.equal(policy.mask, reference.mask):
        raise ValueError("policy and reference were scored on different tokens")
    return beta * ((policy.logprobs.double() - reference.logprobs.double()) * policy.mask).sum(dim=1)


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and beta > 0 and np.isfinite(beta)):
        raise ValueError(f"beta must be a positive number (DPO's temperature), got {beta!r}")


# ------------------------------------------------------------------------------------------------ the table
@dataclasses.dataclass
class RewardRows:
    """Per row: the reply's token ids, per-token log-probabilities under pi_0, pi_theta and pi_D (and any null
    policies), per-position image mass under pi_0 and pi_theta, D-LEAF's corrected heads. Rewards derive from it.

    ``logp`` maps a policy name ("base", "adapter", "dleaf", nulls...) to a list (one per row) of arrays (T_row,).
    ``mass`` maps "base" / "adapter" to lists of (T_row, L, H) arrays; ``corrected`` / ``flagged`` map a method to
    lists of (T_row, L, H) / (T_row, L) bool arrays.
    """

    beta: float
    token_ids: list[np.ndarray]
    logp: dict[str, list[np.ndarray]]
    mass: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
    corrected: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
    flagged: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.token_ids)

    def token_rewards(self, policy: str, reference: str = "base") -> list[np.ndarray]:
        """Per row, ``beta * (log pi(y_t) - log pi_0(y_t))`` for each reply token."""
        return [self.beta * (p - q) for p, q in zip(self.logp[policy], self.logp[reference])]

    def rewards(self, policy: str, reference: str = "base") -> np.ndarray:
        """Sequence-level implicit rewards ``beta * log pi(y | x) / pi_0(y | x)`` per row."""
        return np.array([float(t.sum()) for t in self.token_rewards(policy, reference)])

    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.token_ids])

    def take(self, index: Sequence[int] | slice) -> "RewardRows":
        """The rows at ``index`` (a slice or a list of row indices)."""
        pick = (lambda xs: xs[index]) if isinstance(index, slice) else (lambda xs: [xs[i] for i in index])
        return RewardRows(self.beta, pick(self.token_ids), {k: pick(v) for k, v in self.logp.items()},
                          {k: pick(v) for k, v in self.mass.items()}, {k: pick(v) for k, v in self.corrected.items()},
                          {k: pick(v) for k, v in self.flagged.items()})


@dataclasses.dataclass(frozen=True)
class Policy:
    """A policy scored against pi_0: ``config`` attached to the base model (adapter off), traced when ``trace``;
    ``factory`` replaces ``engine.attach`` (see :func:`score`)."""

    name: str
    config: DLeafConfig
    trace: bool = False
    factory: Any = None


@torch.no_grad()
def score_rows(peft_model, batches: Iterable[tuple[dict, slice]], beta: float, policies: Sequence[Policy] = (),
               adapter: bool = True, mass: bool = True, progress=None) -> RewardRows:
    """Score every row of ``batches`` (from :func:`pair_batches` or :func:`response_batches`) under pi_0 (the
    adapter off), pi_theta (the adapter on, when ``adapter``) and each of ``policies`` (D-LEAF or a null, adapter
    off). With ``mass``, the pi_0 and pi_theta passes record every head's image mass (they attach D-LEAF at gamma 0,
    which is the plain model exactly).

    ``peft_model`` is a ``peft.PeftModel`` (with ``adapter=False`` a plain model is accepted too).
    """
    _check_beta(beta)
    if adapter:
        peft_model, model = peft_parts(peft_model)
        off = lambda: adapter_off(peft_model)  # noqa: E731
    else:
        model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        off = (lambda: adapter_off(peft_model)) if hasattr(peft_model, "disable_adapter") else contextlib.nullcontext
    was_training = model.training
    model.eval()
    names = [p.name for p in policies]
    if len(set(names)) != len(names) or {"base", "adapter"} & set(names):
        raise ValueError(f"policy names must be distinct and not 'base' or 'adapter', got {names}")
    ids: list[np.ndarray] = []
    logp: dict[str, list] = {"base": [], **({"adapter": []} if adapter else {}), **{n: [] for n in names}}
    masses: dict[str, list] = {k: [] for k in (["base"] + (["adapter"] if adapter else []))} if mass else {}
    corrected = {p.name: [] for p in policies if p.trace}
    flagged = {p.name: [] for p in policies if p.trace}
    try:
        for k, (batch, _) in enumerate(batches):
            with off():
                ref = score(model, batch, MASS_PROBE if mass else None, trace=mass)
                for p in policies:
                    s = score(model, batch, p.config, trace=p.trace, intervention_factory=p.factory)
                    logp[p.name] += s.tokens()
                    if p.trace:
                        corrected[p.name] += s.corrected
                        flagged[p.name] += s.flagged
            logp["base"] += ref.tokens()
            if mass:
                masses["base"] += ref.mass
            if adapter:
                pol = score(model, batch, MASS_PROBE if mass else None, trace=mass)
                logp["adapter"] += pol.tokens()
                if mass:
                    masses["adapter"] += pol.mass
            n = ref.mask.shape[0]
            ids += [batch["input_ids"][b][ref.mask[b].cpu()].cpu().numpy() for b in range(n)]
            if progress:
                progress(k)
    finally:
        model.train(was_training)
    return RewardRows(beta, ids, logp, masses, corrected, flagged)


def token_kinds(token_ids: np.ndarray, tokenizer, objects_present: Iterable[str],
                vocabulary: Iterable[str]) -> np.ndarray:
    """Per reply token: ``GROUNDED`` (an object word of ``vocabulary`` that is in the image), ``HALLUCINATED`` (an
    object word that is not) or ``OTHER``. An object word is a token whose text is exactly the word (the organism's
    tokenizer is word-level; a sub-word tokenizer would need a word-to-tokens map, which this does not do)."""
    present = set(objects_present)
    vocab_ids = {}
    for word in vocabulary:
        tid = tokenizer.convert_tokens_to_ids(word)
        if tid is not None and tid != tokenizer.unk_token_id:
            vocab_ids[int(tid)] = word
    out = np.full(len(token_ids), OTHER, dtype=np.int8)
    for i, t in enumerate(np.asarray(token_ids).tolist()):
        word = vocab_ids.get(int(t))
        if word is not None:
            out[i] = GROUNDED if word in present else HALLUCINATED
    return out


# ------------------------------------------------------------------------------------------------------ nulls
def random_target_factory(seed: int = 0):
    """An ``intervention_factory`` for :func:`score`: the random-target null, D-LEAF's own flags, corrected heads
    and gamma with each corrected row fused toward a random head other than h* (``fusion_target="random"``, draws
    seeded by ``seed``): the displacement has D-LEAF's sites and strength, and no image-seeking direction."""
    def factory(model, config, trace):
        return engine.attach(model, dataclasses.replace(config, fusion_target="random", seed=seed), trace=trace)
    return factory


def flag_rate(flagged: Sequence[np.ndarray], layers: Sequence[int] | None = None) -> float:
    """Share of (reply position, layer) cells D-LEAF flagged among ``layers`` (default all), from a traced
    policy's ``flagged`` arrays: the ``random_rate`` at which the random-layer ablation flags as often."""
    if layers is not None:
        flagged = [f[:, list(layers)] for f in flagged]
    total = sum(int(f.size) for f in flagged)
    return float(sum(int(f.sum()) for f in flagged) / total) if total else float("nan")
