"""Equivalence checks a benchmark run makes before it times anything: D-LEAF at zero strength decodes what plain
decoding decodes (tokens and logits), and the compiled per-token step computes what the eager step computes.

Every decoding here is teacher-forced on one token sequence, plain eager greedy decoding's own (``check_steps`` new
tokens), so that a near-tie between two logits (likely with random weights in bfloat16) cannot make two decodings
part ways and turn a rounding difference into a different continuation. A check compares the logits of every step
(float32, after the model's own dtype) and says whether each step's argmax is the reference token, that is whether the
decoding, left to itself, would have produced the same tokens.

Checks (:func:`equivalence_checks`):

=====================================  ==========================================================================
``gamma0_dleaf_vs_plain_eager``        D-LEAF, every layer watched and eager, ``gamma=0``, against plain eager:
                                       bit for bit (the engine's promise); passes within the tolerance and reports
                                       ``bit_exact``
``gamma0_dleaf_sdpa_vs_plain_sdpa``    the same with ``unwatched="sdpa"`` against plain sdpa (the current row goes
                                       eager, so rounding may differ: within the tolerance)
``compiled_vs_eager_step``             ``compile=True`` against the same configuration eager (default knobs); also
                                       says whether D-LEAF changed any logit at all on these steps
                                       (``corrections_made``: the default-strength eager run against its gamma-0
                                       run), so that a check of a step that corrects nothing is seen as such
``compiled_vs_eager_step_fusing``      the same with ``localization="everywhere"`` (every layer fused at every
                                       step: the fusion is exercised whatever the random weights flag; one more
                                       compilation)
=====================================  ==========================================================================

The tolerance is relative to the largest reference logit: ``1e-4`` in float32, ``5e-2`` in bfloat16 and float16.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import engine
from ..settings import Setting
from .config import BenchConfig, Plan, plan_of
from .loop import Stream
from .models import set_text_attention

#: The knobs of the second compiled-step check: fuse at every layer and step, so that the fusion itself is compared
#: (with random weights the default threshold may flag nothing in a few steps).
EVERYWHERE = {"localization": "everywhere"}

#: Relative tolerance of a logit comparison, by dtype.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}


def with_knobs(plan: Plan, **knobs) -> Plan:
    """``plan`` with some of its method's knobs changed (its label kept)."""
    s = plan.setting
    return dataclasses.replace(plan, setting=Setting(s.method, {**s.knob_dict, **knobs}, label=s.label))


@torch.no_grad()
def forced_logits(model, inputs: dict, plan: Plan, steps: int,
                  tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``steps`` tokens with ``plan``: a prefill and ``steps - 1`` cached steps, each fed ``tokens[:, i]``
    (teacher forcing) or, without ``tokens``, its own argmax (greedy). Returns ``(tokens (B, steps), logits (B,
    steps, V) in float32)``; the method's logits processors are applied as in the benchmark's loop."""
    set_text_attention(model, plan.attention)
    with plan.attached(model) as iv:
        processors = engine.generation_kwargs(iv, inputs).get("logits_processor")
        ids = inputs["input_ids"]
        stream = Stream(model, inputs)
        logits, chosen = [], []
        step_logits = stream.prefill()
        for i in range(steps):
            if processors:
                step_logits = processors(ids, step_logits)
            logits.append(step_logits.float())
            token = step_logits.argmax(dim=-1) if tokens is None else tokens[:, i]
            chosen.append(token)
            if processors:
                ids = torch.cat([ids, token[:, None]], dim=1)
            if i + 1 < steps:
                step_logits = stream.step(token)
    return torch.stack(chosen, 1), torch.stack(logits, 1)


def compare(reference: torch.Tensor, tokens: torch.Tensor, other: torch.Tensor, rtol: float) -> dict:
    """How far ``other``'s logits lie from ``reference``'s (both (B, S, V), teacher-forced on ``tokens``)."""
    diff = (other - reference).abs()
    finite = torch.isfinite(reference) & torch.isfinite(other)
    same_inf = (reference == other) | finite  # -inf in the same places (VCD's cut-off) counts as equal
    max_abs = float(diff[finite].max()) if finite.any() else 0.0
    scale = max(1.0, float(reference[torch.isfinite(reference)].abs().max()))
    argmax = other.argmax(dim=-1)
    return {
        "steps": int(tokens.shape[1]), "batch": int(tokens.shape[0]),
        "max_abs_logit_diff": max_abs, "logit_scale": scale, "tolerance": rtol * scale,
        "bit_exact": bool(torch.equal(other, reference)),
        "argmax_equal": bool(torch.equal(argmax, tokens)) and bool(same_inf.all()),
        "argmax_agreement": float((argmax == tokens).float().mean()),
        "passed": bool(max_abs <= rtol * scale and same_inf.all()),
    }


def equivalence_checks(model, inputs: dict, cfg: BenchConfig, log=print) -> dict:
    """The checks of the module docstring, for the configurations of ``cfg`` they concern; a dict of results, each
    with ``passed``, and ``all_passed``."""
    layers = model.config.text_config.num_hidden_layers
    rtol = TOLERANCE[cfg.dtype]
    steps = cfg.check_steps
    out: dict = {}
    tokens, ref_eager = forced_logits(model, inputs, plan_of("plain_eager", layers, cfg), steps)

    def forced(config, **knobs):
        plan = plan_of(config, layers, cfg)
        return forced_logits(model, inputs, with_knobs(plan, **knobs) if knobs else plan, steps, tokens)[1]

    if "dleaf" in cfg.configs:
        out["gamma0_dleaf_vs_plain_eager"] = compare(ref_eager, tokens, forced("dleaf", gamma=0.0), rtol)
    if "dleaf_sdpa" in cfg.configs or "dleaf_compiled" in cfg.configs:
        ref_sdpa = forced("plain_sdpa")
        out["gamma0_dleaf_sdpa_vs_plain_sdpa"] = compare(ref_sdpa, tokens, forced("dleaf_sdpa", gamma=0.0), rtol)
    if "dleaf_compiled" in cfg.configs:
        plain = forced("dleaf_sdpa", gamma=0.0)
        for check, knobs in (("compiled_vs_eager_step", {}), ("compiled_vs_eager_step_fusing", EVERYWHERE)):
            eager_step = forced("dleaf_sdpa", **knobs)
            row = compare(eager_step, tokens, forced("dleaf_compiled", **knobs), rtol)
            row["corrections_made"] = not torch.equal(eager_step, plain)
            row["knobs"] = knobs
            out[check] = row
    for name, row in out.items():
        log(f"  check {name}: {'passed' if row['passed'] else 'FAILED'} (max |logit diff| "
            f"{row['max_abs_logit_diff']:.3g}, tolerance {row['tolerance']:.3g}, bit exact {row['bit_exact']}, "
            f"argmax agreement {row['argmax_agreement']:.3f})")
    out["all_passed"] = all(row["passed"] for row in out.values())
    return out
