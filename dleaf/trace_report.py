"""Export, summarise and draw a D-LEAF :class:`~dleaf.engine.Trace`.

* :func:`trace_dict` / :func:`write_trace_json`: per sample and per active position, each layer's signal and
  threshold, the flagged layers, each head's IAF and the corrected heads (JSON; NaN is written as null).
* :func:`trace_summary`: a few lines of text per sample (flag rate, the most flagged layers, the heads most often
  corrected and most often the best head).
* :func:`plot_trace`: a layers-by-positions heatmap of the layer signal with the flagged cells marked, beside the
  per-head mean IAF and correction counts.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .engine import Trace
from .io import write_text_atomic


def _clean(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def trace_dict(trace: Trace, tokens: Sequence[Sequence[str]] | None = None, config=None) -> dict:
    """The whole trace as plain Python data. ``tokens[b][j]``, if given, is the text of the token that sample b's
    j-th active position predicts (the generated token)."""
    samples = []
    for b in range(trace.batch_size):
        s = trace.sample(b)
        rec = {
            "positions": s["positions"].tolist(),
            "signal": _clean(s["signal"].tolist()),
            "tau": _clean(s["tau"].tolist()),
            "flagged_layers": [np.flatnonzero(row).tolist() for row in s["flag"].numpy()],
            "iaf": _clean(s["iaf"].tolist()),
            "corrected_heads": [[np.flatnonzero(h).tolist() for h in row] for row in s["corrected"].numpy()],
        }
        if tokens is not None:
            rec["tokens"] = list(tokens[b])
        samples.append(rec)
    out = {"num_layers": trace.num_layers, "num_heads": trace.num_heads, "samples": samples}
    if config is not None:
        import dataclasses

        out["config"] = {"method": type(config).__name__, **dataclasses.asdict(config)}
    return out


def write_trace_json(trace: Trace, path: str | os.PathLike, tokens=None, config=None) -> Path:
    """Write :func:`trace_dict` to ``path`` atomically."""
    return write_text_atomic(json.dumps(trace_dict(trace, tokens, config)) + "\n", path)


def trace_summary(trace: Trace, sample: int = 0, top: int = 3) -> str:
    """A short text summary of one sample's trace."""
    s = trace.sample(sample)
    T = s["positions"].shape[0]
    if T == 0:
        return f"sample {sample}: no active positions"
    flag = s["flag"].numpy()
    watched = ~np.isnan(s["signal"].numpy()).all(axis=0)
    n_watched = int(watched.sum())
    rate = flag.sum() / max(1, T * n_watched)
    per_layer = flag.sum(axis=0)
    layers = [f"L{l} ({per_layer[l]}/{T})" for l in np.argsort(-per_layer, kind="stable")[:top] if per_layer[l] > 0]
    corrected = s["corrected"].numpy().sum(axis=0)  # (L, H)
    heads = [f"L{l}H{h} ({corrected[l, h]})" for l, h in
             zip(*np.unravel_index(np.argsort(-corrected, axis=None, kind="stable")[:top], corrected.shape))
             if corrected[l, h] > 0]
    iaf = s["iaf"].numpy()
    best = np.nanargmax(np.where(np.isnan(iaf), -np.inf, iaf), axis=2)  # (T, L)
    lines = [
        f"sample {sample}: {T} positions, {n_watched} watched layers, flag rate {rate:.1%} "
        f"({int(flag.sum())} flagged layer-positions, {int(s['corrected'].sum())} head corrections)",
        "  most flagged layers: " + (", ".join(layers) or "none"),
        "  most corrected heads: " + (", ".join(heads) or "none"),
    ]
    for l in np.flatnonzero(watched)[:]:
        counts = np.bincount(best[:, l], minlength=trace.num_heads)
        lines.append(f"  L{l}: best head {int(counts.argmax())} at {counts.max()}/{T} positions, mean signal "
                     f"{np.nanmean(s['signal'].numpy()[:, l]):.3f}")
    return "\n".join(lines)


def plot_trace(trace: Trace, path: str | os.PathLike, sample: int = 0, tokens: Sequence[str] | None = None,
               signal_name: str = "layer signal (LIAE)") -> Path:
    """Draw one sample's trace: signal heatmap (layers x positions) with flagged cells outlined, and per head the
    mean IAF and how often it was corrected. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    s = trace.sample(sample)
    sig = s["signal"].numpy().T  # (L, T)
    flag = s["flag"].numpy().T
    T = sig.shape[1]
    fig, axes = plt.subplots(1, 3, figsize=(min(4 + 0.25 * T, 22) + 8, 4.2),
                             gridspec_kw={"width_ratios": [max(T, 4) / 4, 1.3, 1.3]})
    ax = axes[0]
    im = ax.imshow(np.ma.masked_invalid(sig), aspect="auto", cmap="viridis", origin="lower")
    for l, t in zip(*np.nonzero(flag)):
        ax.add_patch(Rectangle((t - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlabel("generated position" + (" (token it predicts)" if tokens is not None else ""))
    ax.set_ylabel("layer")
    ax.set_title(f"{signal_name}; red: flagged")
    if tokens is not None and T <= 60:
        ax.set_xticks(range(T))
        ax.set_xticklabels(list(tokens)[:T], rotation=90, fontsize=7)
    ax.set_yticks(range(sig.shape[0]))
    fig.colorbar(im, ax=ax, fraction=0.04)
    with warnings.catch_warnings():  # unwatched layers are all NaN: their mean is NaN, drawn blank
        warnings.simplefilter("ignore", RuntimeWarning)
        iaf = np.nanmean(s["iaf"].numpy(), axis=0) if T else np.zeros((trace.num_layers, trace.num_heads))
    im2 = axes[1].imshow(np.ma.masked_invalid(iaf), aspect="auto", cmap="magma", origin="lower")
    axes[1].set_title("mean IAF per head")
    axes[1].set_xlabel("head")
    axes[1].set_ylabel("layer")
    fig.colorbar(im2, ax=axes[1], fraction=0.08)
    cor = s["corrected"].numpy().sum(axis=0)
    im3 = axes[2].imshow(cor, aspect="auto", cmap="Blues", origin="lower")
    axes[2].set_title("times corrected")
    axes[2].set_xlabel("head")
    axes[2].set_ylabel("layer")
    fig.colorbar(im3, ax=axes[2], fraction=0.08)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
