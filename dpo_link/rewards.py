"""Implicit rewards: of a DPO adapter and of D-LEAF, per sequence and per token, and the DPO loss of any of them.

A policy pi with reference pi_0 is the optimum of the KL-regularised objective
``max_pi E_{y~pi}[r(x, y)] - beta KL(pi || pi_0)`` for its *implicit reward*
``r(x, y) = beta * log pi(y | x) / pi_0(y | x) = beta * sum_t log pi(y_t | x, y_<t) / pi_0(y_t | x, y_<t)``
(up to a term that depends on x alone and cancels between two replies to the same x). So every policy built on
pi_0 has one, and two policies can be compared reward against reward (``docs/correspondence.md``):

- ``r_theta``: pi = the base model with its PEFT adapter on, pi_0 = the same model inside ``disable_adapter()``.
  This is exactly what TRL's ``DPOTrainer`` logs (batch means) as ``rewards/chosen`` and ``rewards/rejected``.
- ``r_D``, D-LEAF's *reward shift*: pi = the base model with D-LEAF attached, teacher-forced in one pass
  (:func:`dleaf.engine.response_logprobs`, equal to step-by-step decoding), pi_0 = the plain base model.

The DPO loss of a policy on preference pairs (x, y_w, y_l) is ``mean -log sigmoid(r(x, y_w) - r(x, y_l))``
(:func:`dpo_loss`); it is log 2 for pi = pi_0, whose rewards are all 0.

Batches come from :func:`dpo_link.collate.pair_batches` (chosen rows first, rejected second, as TRL's collator lays
them out) or :func:`dpo_link.collate.response_batches`. Every forward pass runs through the engine's attention: the
pi_0 and pi_theta passes attach D-LEAF at gamma 0 (bit for bit the plain model) with a trace when asked, so that the
same pass also yields each head's image mass at every position that predicts a reply token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest

from dleaf import engine
from dleaf.config import DLeafConfig

#: batch entries of TRL's collator that are not model inputs
NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
#: the configuration of the reference passes: the plain model (gamma 0) with each head's image mass in the trace
MASS_PROBE = DLeafConfig(gamma=0.0, iaf_variant="mass")

#: token kinds of :func:`token_kinds`
OTHER, GROUNDED, HALLUCINATED = 0, 1, 2
KIND_NAMES = {OTHER: "other", GROUNDED: "grounded", HALLUCINATED: "hallucinated"}


# ------------------------------------------------------------------------------------------------ adapters
def split_adapter(model, require: bool = False) -> tuple[torch.nn.Module, Callable[[], Any]]:
    """``(base, reference)`` for a plain or a PEFT model: ``base`` is the transformers model (which holds the LoRA
    layers, so scoring it with the adapter on gives pi_theta) and ``reference()`` a context manager inside which it
    is pi_0 (the adapter disabled; a no-op for a plain model).

    With ``require``, anything but a ``peft.PeftModel`` with an adapter configured is refused (TypeError /
    ValueError naming what was passed): r_theta needs both policies.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if not getattr(model, "peft_config", None):
            raise ValueError("the PEFT model has no adapter configured")
        return model.get_base_model(), model.disable_adapter
    if require:
        raise TypeError(f"r_theta needs a peft.PeftModel (the base model with its DPO adapter); got "
                        f"{type(model).__name__}. Load one with dpo_link.rewards.load_adapter(model, path)")
    return model, contextlib.nullcontext


def check_adapter_files(path: str | Path) -> dict:
    """The adapter's ``adapter_config.json`` as a dict, after checking that ``path`` holds a PEFT adapter
    (FileNotFoundError naming what is missing). Cheap: scripts call it before loading any model."""
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no PEFT adapter at {path}: expected adapter_config.json and "
                                "adapter_model.safetensors (train one with scripts/train_dpo.py)")
    if not (path / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has adapter_config.json but no adapter_model.safetensors")
    return json.loads(cfg_file.read_text())


def load_adapter(model, path: str | Path):
    """``PeftModel.from_pretrained(model, path)`` in eval mode, after checking that the adapter belongs to ``model``.

    An adapter trained on another model fails here with a ValueError that says so: its target modules must exist in
    ``model`` and each saved LoRA weight must have the shape of the module it adapts (PEFT alone would report a
    state-dict size mismatch, or silently load nothing when no key matches).
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    path = Path(path)
    cfg = check_adapter_files(path)
    saved = load_file(str(path / "adapter_model.safetensors"))
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


#: weight files up to this size are fingerprinted whole; above it, by BLOCKS evenly spaced blocks of BLOCK_BYTES
FULL_HASH_BYTES = 64 << 20
BLOCK_BYTES, BLOCKS = 1 << 20, 64


def checkpoint_fingerprint(path: str | Path) -> str | None:
    """The identity of a local checkpoint folder's weights: sha256 over each weight file's name, size and bytes
    (``*.safetensors`` and ``*.bin`` sorted by name; whole files up to 64 MiB, else 64 evenly spaced blocks of
    1 MiB, which tell two trainings of one architecture apart without reading gigabytes). None for a hub id or a
    folder without weight files. :func:`dpo_link.train.run` records it in ``dpo_run.json`` as ``base_model``."""
    p = Path(path)
    if not p.is_dir():
        return None
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin")
                   and f.name != "training_args.bin")
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= FULL_HASH_BYTES:
                h.update(fh.read())
                continue
            for i in range(BLOCKS):
                fh.seek((size - BLOCK_BYTES) * i // (BLOCKS - 1))
                h.update(fh.read(BLOCK_BYTES))
    return h.hexdigest()


def check_adapter_base(adapter: str | Path, model_path: str | Path, run_record: dict | None) -> None:
    """A ValueError when the adapter's run record (``dpo_run.json``) fingerprints another base checkpoint than the
    local folder ``model_path``: an adapter applied to a model it was not trained on gives meaningless rewards, and
    PEFT loads it silently when the shapes agree (a retrained organism). Nothing when either side has no
    fingerprint (a hub id; an adapter recorded before fingerprints were)."""
    recorded = ((run_record or {}).get("base_model") or {}).get("fingerprint")
    if not recorded:
        return
    current = checkpoint_fingerprint(model_path)
    if current is not None and current != recorded:
        raise ValueError(f"the adapter at {adapter} was trained on another checkpoint than {model_path} (its "
                         f"dpo_run.json records base weights {recorded[:12]}, these are {current[:12]}): train an "
                         f"adapter on this checkpoint with scripts/train_dpo.py --model {model_path}")


# --------------------------------------------------------------------------------------------------- scoring
def response_start(batch: dict) -> torch.Tensor:
    """Column of each row's first reply token (from ``completion_mask``); a row without one is an error."""
    cm = batch["completion_mask"].bool()
    empty = (~cm.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} of the batch have no reply token (empty response, or cut by max_length)")
    return cm.int().argmax(dim=1)


@dataclasses.dataclass
class Scored:
    """One pass over a batch: per-token log-probabilities of each row's reply and, when traced, per position that
    predicts a reply token, each (layer, head)'s image mass and whether D-LEAF corrected it.

    ``logprobs`` (B, T) tensor (0 outside the reply), ``mask`` (B, T) bool; ``mass``, ``corrected`` and ``flagged``:
    per row a (n_reply_tokens, L, H) / (n_reply_tokens, L, H) / (n_reply_tokens, L) array, or None when not traced.
    Row b's reply tokens are ``input_ids[b][mask[b]]``.
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


def model_inputs(batch: dict) -> dict:
    """The model's inputs of a collated batch (without the collator's bookkeeping entries)."""
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
          intervention_factory=None, gamma: torch.Tensor | None = None) -> Scored:
    """Teacher-forced log-probabilities of each row's reply under ``model`` (plain when ``method`` is None, else
    with that D-LEAF configuration attached), in one forward pass (:func:`dleaf.engine.response_logprobs`).

    ``trace`` records, at each position that predicts a reply token, the image mass of every (layer, head) (needs
    ``method.iaf_variant == "mass"`` for the mass to be image mass) and the heads D-LEAF corrected.
    ``intervention_factory(model, config, trace)`` replaces :func:`dleaf.engine.attach` (the nulls use it).
    ``gamma``, a 0-d tensor, replaces the configured fusion strength (it may require grad, or lie outside [0, 1]:
    the fusion extrapolated); the flagged sites stay those the configuration selects. Gradients flow when called
    outside ``torch.no_grad``.
    """
    batch = _on_model_device(batch, model)
    inputs = model_inputs(batch)
    start = response_start(batch)
    if trace and method is None:
        raise ValueError("a trace needs a method attached (use MASS_PROBE for the plain model's image mass)")
    iv = None
    try:
        if method is not None:
            iv = engine.attach(model, method, trace=trace) if intervention_factory is None else \
                intervention_factory(model, method, trace)
            if gamma is not None:
                iv.set_gamma(gamma)
        logprobs, mask = engine.response_logprobs(model, inputs, start, iv)
    finally:
        if iv is not None:
            iv.detach()
    if not torch.equal(mask, batch["completion_mask"].bool()):
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


def check_beta(beta: float) -> float:
    """``beta`` if it is a positive finite number (DPO's temperature), else a ValueError."""
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta > 0 and np.isfinite(beta)):
        raise ValueError(f"beta must be a positive number (DPO's temperature), got {beta!r}")
    return float(beta)


def implicit_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * (log pi(y | x) - log pi_0(y | x))`` from per-row sequence log-probabilities (any float dtype)."""
    return check_beta(beta) * (policy - reference)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` halves of a preference batch's per-row values (chosen rows first)."""
    if values.shape[0] % 2:
        raise ValueError(f"a preference batch has an even number of rows (chosen then rejected), got {values.shape[0]}")
    return values.chunk(2)


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The sigmoid DPO loss per pair, ``-log sigmoid(r(y_w) - r(y_l))`` (log 2 when both rewards are equal);
    differentiable."""
    return -torch.nn.functional.logsigmoid(chosen - rejected)


def dpo_loss(chosen, rejected) -> dict:
    """DPO statistics of implicit rewards on pairs: ``loss`` = mean :func:`dpo_losses` (log 2 when every margin is
    0), ``accuracy`` = share of pairs with ``r_w > r_l`` (TRL's ``rewards/accuracies``; ties count as wrong),
    ``ties`` = share with ``r_w == r_l``, ``accuracy_p_value`` = two-sided sign test (binomial, p = 1/2) of the pairs
    with a nonzero margin (NaN when every margin is 0), ``margin`` = mean ``r_w - r_l``, mean ``chosen`` and
    ``rejected`` rewards, and ``n`` pairs. Computed in float64. Mismatched lengths or no pair are errors."""
    c = torch.as_tensor(np.asarray(chosen, dtype=np.float64))
    r = torch.as_tensor(np.asarray(rejected, dtype=np.float64))
    if c.shape != r.shape or c.dim() != 1:
        raise ValueError(f"chosen and rejected rewards must be 1-d of the same length, got shapes {tuple(c.shape)} "
                         f"and {tuple(r.shape)}")
    if c.numel() == 0:
        raise ValueError("no pairs: the DPO loss of an empty preference set is undefined")
    m = c - r
    wins, decided = int((m > 0).sum()), int((m != 0).sum())
    sign_p = float(binomtest(wins, decided, 0.5).pvalue) if decided else float("nan")
    return {"n": int(c.numel()), "loss": float(dpo_losses(c, r).mean()),
            "accuracy": float((m > 0).double().mean()), "ties": float((m == 0).double().mean()),
            "accuracy_p_value": sign_p, "margin": float(m.mean()), "chosen": float(c.mean()),
            "rejected": float(r.mean())}


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


@dataclasses.dataclass(frozen=True)
class Policy:
    """A policy scored against pi_0: ``config`` attached to the base model (adapter off), traced when ``trace``;
    ``factory`` replaces ``engine.attach`` (see :func:`score`)."""

    name: str
    config: DLeafConfig
    trace: bool = False
    factory: Any = None


@torch.no_grad()
def score_rows(model, batches: Iterable[tuple[dict, slice]], beta: float, policies: Sequence[Policy] = (),
               adapter: bool = True, mass: bool = True, progress=None) -> RewardRows:
    """Score every row of ``batches`` under pi_0 (the adapter off), pi_theta (the adapter on, when ``adapter``) and
    each of ``policies`` (D-LEAF or a null, adapter off). With ``mass``, the pi_0 and pi_theta passes record every
    head's image mass (they attach D-LEAF at gamma 0, which is the plain model exactly).

    ``model`` is a ``peft.PeftModel`` (with ``adapter=False`` a plain model is accepted too).
    """
    check_beta(beta)
    base, reference = split_adapter(model, require=adapter)
    was_training = base.training
    base.eval()
    names = [p.name for p in policies]
    if len(set(names)) != len(names) or {"base", "adapter"} & set(names):
        raise ValueError(f"policy names must be distinct and not 'base' or 'adapter', got {names}")
    ids: list[np.ndarray] = []
    logp: dict[str, list] = {"base": [], **({"adapter": []} if adapter else {}), **{n: [] for n in names}}
    masses: dict[str, list] = {k: [] for k in (["base"] + (["adapter"] if adapter else []))} if mass else {}
    corrected = {p.name: [] for p in policies if p.trace}
    flagged = {p.name: [] for p in policies if p.trace}
    probe = MASS_PROBE if mass else None
    try:
        for k, (batch, _) in enumerate(batches):
            with reference():
                ref = score(base, batch, probe, trace=mass)
                for p in policies:
                    s = score(base, batch, p.config, trace=p.trace, intervention_factory=p.factory)
                    logp[p.name] += s.tokens()
                    if p.trace:
                        corrected[p.name] += s.corrected
                        flagged[p.name] += s.flagged
            logp["base"] += ref.tokens()
            if mass:
                masses["base"] += ref.mass
            if adapter:
                pol = score(base, batch, probe, trace=mass)
                logp["adapter"] += pol.tokens()
                if mass:
                    masses["adapter"] += pol.mass
            n = ref.mask.shape[0]
            ids += [batch["input_ids"][b][ref.mask[b].cpu()].cpu().numpy() for b in range(n)]
            if progress:
                progress(k)
    finally:
        base.train(was_training)
    return RewardRows(beta, ids, logp, masses, corrected, flagged)


@torch.no_grad()
def adapter_rewards(model, batch: dict, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """r_theta of one collated preference batch: ``(chosen rewards, rejected rewards)`` (float64), the reference
    being the same PEFT model with its adapter disabled."""
    base, reference = split_adapter(model, require=True)
    was_training = base.training
    base.eval()
    try:
        policy = score(base, batch).sequence()
        with reference():
            ref = score(base, batch).sequence()
    finally:
        base.train(was_training)
    return split_pairs(implicit_rewards(policy, ref, beta).cpu())


def token_kinds(token_ids: np.ndarray, tokenizer, objects_present: Iterable[str],
                vocabulary: Iterable[str]) -> np.ndarray:
    """Per reply token: ``GROUNDED`` (an object word of ``vocabulary`` that is in the image), ``HALLUCINATED`` (an
    object word that is not) or ``OTHER``. An object word is a token whose text is exactly the word (a word-level
    tokenizer, as the organism's; a sub-word tokenizer would need a word-to-tokens map, which this does not do)."""
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
