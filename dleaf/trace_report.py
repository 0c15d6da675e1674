"""Export, summarise and draw a D-LEAF :class:`~dleaf.engine.Trace`.

* :func:`trace_dict` / :func:`write_trace_json`: per sample and per active position, each layer's signal and
  threshold, the flagged layers, each head's IAF and the corrected heads (JSON; NaN is written as null).
* :func:`trace_summary`: a few lines of text per sample (flag rate, the most flagged layers, the heads most often
  corrected and most often the best head).
* :func:`plot_trace`: a layers-by-positions heatmap of the layer signal with the flagged cells marked, beside the
  per-head mean IAF and correction counts.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .engine import Trace
from .io import to_json, write_text_atomic


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
    """Write :func:`trace_dict` to ``path`` atomically (strict JSON: NaN is written as null)."""
    return write_text_atomic(to_json(trace_dict(trace, tokens, config)) + "\n", path)


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


def signal_label(config=None) -> str:
    """The colorbar label of the layer signal, with its unit, for a D-LEAF configuration."""
    if config is None:
        return "layer signal"
    if getattr(config, "layer_signal", "liae") == "mass_deficit":
        return "image-mass deficit: minus head-mean image mass (share of the row's attention)"
    if getattr(config, "liae_normalize", False):
        return "LIAE / log |image tokens| (0: one image token, 1: uniform)"
    return "LIAE (nats)"


def _heatmap(fig, ax, s, tokens, marks, title, label):
    from matplotlib.patches import Rectangle

    sig = s["signal"].numpy().T  # (L, T)
    flag = s["flag"].numpy().T
    T = sig.shape[1]
    im = ax.imshow(np.ma.masked_invalid(sig), aspect="auto", cmap="viridis", origin="lower")
    for l, t in zip(*np.nonzero(flag)):
        ax.add_patch(Rectangle((t - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_ylabel("decoder layer")
    ax.set_title(title, fontsize=9)
    ax.set_yticks(range(sig.shape[0]))
    if tokens is not None and T <= 80:
        ax.set_xticks(range(T))
        ax.set_xticklabels(list(tokens)[:T], rotation=90, fontsize=7)
        for k, tick in enumerate(ax.get_xticklabels()):
            mark = marks[k] if marks is not None and k < len(marks) else ""
            if mark == "hallucinated":
                tick.set_color("red")
                tick.set_fontweight("bold")
            elif mark == "object":
                tick.set_color("tab:blue")
                tick.set_fontweight("bold")
        ax.set_xlabel("generated position (the token it predicts; blue: object word in the image, red: "
                      "hallucinated object word; red boxes: flagged layers)", fontsize=7)
    else:
        ax.set_xlabel("generated position (red boxes: flagged layers)", fontsize=7)
    cb = fig.colorbar(im, ax=ax, fraction=0.04)
    cb.set_label(label, fontsize=7)


def trace_figure(trace: Trace, sample: int = 0, tokens: Sequence[str] | None = None,
                 signal_name: str | None = None, config=None, marks: Sequence[str] | None = None,
                 plain: Trace | None = None, plain_tokens: Sequence[str] | None = None,
                 plain_marks: Sequence[str] | None = None, title: str | None = None):
    """One sample's trace as a matplotlib figure (:func:`plot_trace` writes it as PNG).

    Left: the layer signal (layers x generated positions) with the flagged cells outlined in red, for the method's
    pass and, when ``plain`` is given (a trace of the same method at zero strength, which decodes exactly like
    plain decoding), for the plain pass above it. Token labels (``tokens``) are coloured by ``marks``
    (``"object"``: an object word that is in the image, ``"hallucinated"``: one that is not). Right: per head the
    mean IAF over the positions, and how many times each head was corrected (integer counts). ``config`` (the
    method's configuration) names the signal and its unit on the colorbar; ``signal_name`` overrides it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    s = trace.sample(sample)
    T = s["signal"].shape[0]
    label = signal_name or signal_label(config)
    rows = 2 if plain is not None else 1
    fig = Figure(figsize=(min(4 + 0.25 * T, 22) + 8, 4.2 * rows + 0.4))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, 3, width_ratios=[max(T, 4) / 4, 1.3, 1.3])
    if plain is not None:
        _heatmap(fig, fig.add_subplot(grid[0, 0]), plain.sample(sample), plain_tokens, plain_marks,
                 "plain decoding (the method watching at zero strength): flags it would raise", label)
    _heatmap(fig, fig.add_subplot(grid[rows - 1, 0]), s, tokens, marks, "with the method: flagged layers corrected",
             label)
    with warnings.catch_warnings():  # unwatched layers are all NaN: their mean is NaN, drawn blank
        warnings.simplefilter("ignore", RuntimeWarning)
        iaf = np.nanmean(s["iaf"].numpy(), axis=0) if T else np.zeros((trace.num_layers, trace.num_heads))
    ax = fig.add_subplot(grid[:, 1])
    im2 = ax.imshow(np.ma.masked_invalid(iaf), aspect="auto", cmap="magma", origin="lower")
    ax.set_title("mean IAF per head", fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("decoder layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    cb = fig.colorbar(im2, ax=ax, fraction=0.08)
    unit = "image attention mass of the head's row (share)" if getattr(config, "iaf_variant", "mass") == "mass" \
        else "image attention focus"
    cb.set_label(f"IAF: {unit}", fontsize=7)
    cor = s["corrected"].numpy().sum(axis=0)
    ax = fig.add_subplot(grid[:, 2])
    im3 = ax.imshow(cor, aspect="auto", cmap="Blues", origin="lower", vmin=0, vmax=max(1, int(cor.max())))
    ax.set_title("times corrected", fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("decoder layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    cb = fig.colorbar(im3, ax=ax, fraction=0.08, ticks=MaxNLocator(integer=True))
    cb.set_label("corrections (count of positions)", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_trace(trace: Trace, path: str | os.PathLike, sample: int = 0, tokens: Sequence[str] | None = None,
               signal_name: str | None = None, config=None, marks: Sequence[str] | None = None,
               plain: Trace | None = None, plain_tokens: Sequence[str] | None = None,
               plain_marks: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Draw one sample's trace (:func:`trace_figure`) and write it atomically as PNG to ``path``."""
    from .io import save_figure_atomic

    fig = trace_figure(trace, sample, tokens, signal_name, config, marks, plain, plain_tokens, plain_marks, title)
    return save_figure_atomic(fig, path, dpi=110)
