"""Can a layer signal see a fault at all? On the unfaulted model's own replies, teacher-forced (so that every
condition reads the same tokens), each variant of the layer image-attention entropy (LIAE, normalised by
``log |I|``) per layer: without a fault, and under a diffuse fault of every head of every layer at every generated
position with strength ``s``; the rise it causes in units of the signal's within-reply standard deviation (what a
running threshold of the reply's own earlier values has to beat); and the head-mean image mass.

Two variants (:func:`dleaf.attention_stats.layer_entropy`): ``mixed``, the entropy of the head-mixed profile (D-LEAF's
default), and ``mean_head``, the mean of the heads' entropies. A diffuse fault of strength 1 makes every faulted head's
profile uniform, so both variants read exactly 1 there: ``1 - (unfaulted value)`` is the most a diffuse fault can
raise the signal (its headroom).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import engine
from ..models import teacher_forced_inputs
from .config import FaultConfig

VARIANTS = ("mixed", "mean_head")


@torch.no_grad()
def reply_signals(model, processor, prompts, images, replies, variant: str, strength: float,
                  batch_size: int = 8) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per reply, (rows, L) arrays of the LIAE ``variant`` (normalised) and of the head-mean image mass at the rows
    that predict its tokens, under a diffuse fault of every head, layer and position with ``strength`` (none at 0).
    D-LEAF is attached with ``gamma=0`` only to read its trace: it changes nothing."""
    from ..methods.dleaf import DLeafConfig

    config = DLeafConfig(gamma=0.0, layer_signal="liae", liae_variant=variant, liae_normalize=True)
    fault = FaultConfig("diffuse", "all", strength=strength) if strength > 0 else None
    signals, masses = [], []
    for start in range(0, len(prompts), batch_size):
        sl = slice(start, start + batch_size)
        full, n, reply_ids = teacher_forced_inputs(processor, prompts[sl], images[sl], replies[sl], model)
        with engine.attached(model, config, fault=fault, trace=True) as iv:
            engine.response_logprobs(model, full, [n] * len(reply_ids), iv)
        for i, length in enumerate(len(r) for r in reply_ids):
            tr = iv.trace.sample(i)
            row_of = {int(p): k for k, p in enumerate(tr["positions"])}
            rows = [row_of[n + j - 1] for j in range(length)]
            signals.append(tr["signal"][rows].double().numpy())
            masses.append(tr["iaf"][rows].double().mean(-1).numpy())
    return signals, masses


def signal_sensitivity(model, processor, prompts: Sequence[str], images: Sequence, replies: Sequence[str],
                       strengths: Sequence[float] = (0.25, 0.5, 1.0), variants: Sequence[str] = VARIANTS,
                       batch_size: int = 8) -> dict:
    """Per LIAE variant and layer: the unfaulted mean and within-reply standard deviation (population, averaged over
    replies with at least two rows), the mean under each diffuse strength, the rise over the unfaulted mean in
    units of that standard deviation, and the headroom ``1 - mean``; and per layer the head-mean image mass."""
    was_training = model.training
    model.eval()
    out: dict = {"n_replies": len(replies), "strengths": list(strengths), "variants": {}}
    try:
        for variant in variants:
            base, mass = reply_signals(model, processor, prompts, images, replies, variant, 0.0, batch_size)
            rows = np.concatenate(base)
            mean = rows.mean(0)
            std = np.mean([s.std(0) for s in base if s.shape[0] >= 2], axis=0)
            entry = {"unfaulted_mean": mean.tolist(), "within_reply_std": std.tolist(),
                     "headroom": (1 - mean).tolist(), "faulted_mean": {}, "rise_in_sd": {}}
            for s in strengths:
                faulted, _ = reply_signals(model, processor, prompts, images, replies, variant, s, batch_size)
                fm = np.concatenate(faulted).mean(0)
                entry["faulted_mean"][f"{s:g}"] = fm.tolist()
                with np.errstate(divide="ignore", invalid="ignore"):
                    entry["rise_in_sd"][f"{s:g}"] = ((fm - mean) / std).tolist()
            out["variants"][variant] = entry
            out["image_mass"] = np.concatenate(mass).mean(0).tolist()
    finally:
        model.train(was_training)
    return out


def sensitivity_markdown(diag: dict) -> str:
    """The diagnosis as a Markdown table: per layer, image mass and, per variant, unfaulted mean, within-reply
    standard deviation, headroom and the rise under each strength in standard deviations."""
    strengths = [f"{s:g}" for s in diag["strengths"]]
    variants = list(diag["variants"])
    head = ["layer", "image mass"]
    for v in variants:
        head += [f"{v} mean", f"{v} within-reply sd", f"{v} headroom"] + [f"{v} rise at s={s} (sd)"
                                                                         for s in strengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer, m in enumerate(diag["image_mass"]):
        cells = [str(layer), f"{m:.3f}"]
        for v in variants:
            e = diag["variants"][v]
            cells += [f"{e['unfaulted_mean'][layer]:.4f}", f"{e['within_reply_std'][layer]:.4f}",
                      f"{e['headroom'][layer]:.4f}"] + [f"{e['rise_in_sd'][s][layer]:+.1f}" for s in strengths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
