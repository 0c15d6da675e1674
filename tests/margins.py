"""Margins of the discrete decisions a test relies on: D-LEAF's flags (a signal against its running threshold) and
head choices (h*, the heads below the mean IAF), SPIN's kept heads, and greedy token choices (the largest score
against the next one).

A test that compares a discrete outcome computed along two numerically different paths (one-pass scoring and
step-by-step decoding, a padded batch and each sample alone, another cache, another kernel), or that takes a finite
difference across such an outcome, is only meaningful, and green on every machine, when every decision it relies on
is taken by a clear margin: rounding (another CPU's vectorised kernels, another reduction order) must not be able to
flip it. These helpers measure the smallest margin over the decisions and fail, naming the decision, when it is
below what the test needs: a fixture that sits on a tie is then reported as such, on every machine, instead of as a
wrong result on the one machine whose rounding happens to flip it.
"""

from __future__ import annotations

import math

import torch

#: float32's machine epsilon (1.19e-7). D-LEAF's signals (an image-attention entropy normalised by log |I|, an image
#: mass) lie in [-1, 1] and are computed from attention weights that eager attention rounds to float32 (its softmax
#: runs in float32 even in a float64 model), so their rounding, and a threshold's built from them, is a few of these.
EPS32 = torch.finfo(torch.float32).eps

#: The margin a D-LEAF flag or head choice (an IAF, an image mass in [0, 1], against the mean or the next head's)
#: needs: 100 float32 epsilons (1.2e-5), several times a worst-case bound on the rounding of ``signal - tau`` (a few
#: epsilons for the signal, as many for each of the running mean and standard deviation in tau), 60 times the
#: differences measured between two paths of a float32 model (one pass and step by step, static and dynamic cache,
#: padded batch and alone, eager and sdpa: at most 2e-7) and thousands of times those of a float64 model and
#: between CPU kernels (ATEN_CPU_CAPABILITY default / avx2 / avx512: at most 2e-9).
FLAG_MARGIN = 100 * EPS32


#: The gap a greedy choice needs between its two largest scores: 1e-4, ten times the 1e-5 to which the tests require
#: two paths' logits to agree (paths that agree that closely cannot order two tokens this far apart differently) and
#: a thousand times the differences measured between them (at most 1e-7).
GREEDY_GAP = 1e-4


class MarginTooSmall(AssertionError):
    """A decision the test relies on is within the required margin of its tie."""


def sharpen_attention(model, factor: float):
    """Scale the query and key projections of ``model``'s language model by ``factor`` in place (its attention logits
    by the square), and return it: a random model attends almost uniformly, so its D-LEAF signals (image-attention
    entropies) lie within rounding of each other and of their thresholds; sharpened, they spread."""
    names = [name for name, _ in model.named_parameters()]
    text = any("language_model" in name for name in names)  # a vision-language model: its language model only
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("q_proj" in name or "k_proj" in name) and "lora_" not in name and ("language_model" in name or not text):
                p.mul_(factor)
    return model


def flag_cells(trace, columns=None):
    """Every flag D-LEAF decided against a threshold in ``trace`` (a :class:`dleaf.engine.trace.Trace`):
    ``((sample, column, layer), signal, tau, flag)`` for each active position of a watched layer whose threshold was
    ready (``tau`` finite), the signal and threshold as the engine compared them (float64, from the raw records).
    ``columns``: per sample, the columns whose flags decide the test's result (None: every traced one). ``trace`` may
    also be a list of its steps (the records of some of its forward calls)."""
    for step in (trace.steps if hasattr(trace, "steps") else trace):
        cols = step["columns"].tolist()
        active = step["active"]
        for layer, rec in sorted(step["layers"].items()):
            signal, tau, flag = rec["signal"].double(), rec["tau"].double(), rec["flag"]
            for b in range(active.shape[0]):
                for j, c in enumerate(cols):
                    if not bool(active[b, j]) or not math.isfinite(float(tau[b, j])):
                        continue
                    if columns is not None and c not in columns[b]:
                        continue
                    yield (b, c, layer), float(signal[b, j]), float(tau[b, j]), bool(flag[b, j])


def decisions(trace, columns=None, sample=None, heads: bool = True) -> dict:
    """Every discrete decision D-LEAF took in ``trace`` (columns as in :func:`flag_cells`), as a dict of ``where ->
    (value, threshold, outcome)``: ``(sample, column, layer)`` for each flag (:func:`flag_cells`: signal, tau, flagged)
    and, with ``heads``, the head choices where a layer was flagged (:func:`head_cells`): ``(sample, column, layer,
    "h*")`` (largest IAF, second largest, the head) and ``(sample, column, layer, "head h")`` (its IAF, the mean,
    corrected). ``sample`` renames the trace's batch rows (a list: row i is ``sample[i]``), so that traces of single
    rows can be merged."""
    out = {}
    rename = (lambda b: b) if sample is None else (lambda b: sample[b])
    for (b, c, layer), s, t, f in flag_cells(trace, columns):
        out[(rename(b), c, layer)] = (s, t, f)
    if heads:
        for (b, c, layer, what), v, t, outcome in head_cells(trace, columns):
            out[(rename(b), c, layer, what)] = (v, t, outcome)
    return out


def flags_of(decided: dict) -> dict:
    """The flags among :func:`decisions` (the keys that do not end in a head choice's name)."""
    return {k: v for k, v in decided.items() if not isinstance(k[-1], str)}


def smallest_margin(cells) -> tuple[float, object, float, float]:
    """The smallest ``|value - threshold|`` over ``cells``, an iterable of ``(where, value, threshold, ...)`` or a
    dict ``where -> (value, threshold, ...)``: ``(margin, where, value, threshold)``, ``(inf, None, nan, nan)`` when
    there is none."""
    items = ((w, *v) for w, v in cells.items()) if isinstance(cells, dict) else cells
    best = (math.inf, None, math.nan, math.nan)
    for where, value, threshold, *_ in items:
        if abs(value - threshold) < best[0]:
            best = (abs(value - threshold), where, value, threshold)
    return best


def assert_margin(cells, at_least: float, what: str = "D-LEAF's decisions") -> float:
    """:func:`smallest_margin` of ``cells``, which must be at least ``at_least`` (and some decision must be there:
    a test of none tests nothing); raises :class:`MarginTooSmall` otherwise. Returns the margin."""
    margin, where, value, threshold = smallest_margin(cells)
    if where is None:
        raise MarginTooSmall(f"{what}: no decision against a threshold was taken, so nothing is tested")
    if not margin >= at_least:
        raise MarginTooSmall(
            f"{what}: a decision sits on a threshold tie: |value - threshold| = {margin:.3g} < {at_least:.3g} at "
            f"{where} (value {value!r}, threshold {threshold!r}); rounding may flip it on another machine, so build "
            "the fixture away from it")
    return margin


def assert_flag_margin(trace, at_least: float = FLAG_MARGIN, columns=None, what: str = "D-LEAF flags") -> float:
    """:func:`assert_margin` over the flags of ``trace`` (:func:`flag_cells`)."""
    return assert_margin(flag_cells(trace, columns), at_least, what)


def head_cells(trace, columns=None):
    """The head choices D-LEAF made where it flagged a layer (``head_selection="below_mean"``, its default), from
    ``trace`` as in :func:`flag_cells`: ``((sample, column, layer, "h*"), largest IAF, second largest, h*)`` (the
    fusion target) and ``((sample, column, layer, "head h"), IAF of head h, the heads' mean IAF, corrected)`` (below
    the mean)."""
    for step in (trace.steps if hasattr(trace, "steps") else trace):
        cols = step["columns"].tolist()
        active = step["active"]
        for layer, rec in sorted(step["layers"].items()):
            if "iaf" not in rec:
                continue
            iaf = rec["iaf"].double()  # (B, H, Q)
            for b in range(active.shape[0]):
                for j, c in enumerate(cols):
                    if not (bool(active[b, j]) and bool(rec["flag"][b, j])):
                        continue
                    if columns is not None and c not in columns[b]:
                        continue
                    heads = iaf[b, :, j]
                    top = heads.topk(2)
                    yield (b, c, layer, "h*"), float(top.values[0]), float(top.values[1]), int(top.indices[0])
                    mean = float(heads.mean())
                    for h, v in enumerate(heads.tolist()):
                        yield (b, c, layer, f"head {h}"), v, mean, v < mean


def assert_dleaf_margins(trace, at_least: float = FLAG_MARGIN, columns=None, what: str = "D-LEAF") -> float:
    """Every flag D-LEAF decided in ``trace`` (:func:`flag_cells`) and every head choice it made where it flagged
    (:func:`head_cells`) decided by at least ``at_least``; raises :class:`MarginTooSmall` otherwise. Returns the
    smallest margin."""
    flags = assert_margin(flag_cells(trace, columns), at_least, f"{what}: flags")
    heads = list(head_cells(trace, columns))
    return min(flags, assert_margin(heads, at_least, f"{what}: head choices") if heads else math.inf)


def assert_same_decisions(runs: dict) -> None:
    """``runs``, name -> :func:`decisions`: the same decisions taken, and taken the same way, in every run."""
    (first, ref), *others = runs.items()
    for name, decided in others:
        assert decided.keys() == ref.keys(), (f"{name} and {first} take different decisions: "
                                              f"{sorted(decided.keys() ^ ref.keys(), key=str)[:5]}")
        differ = [k for k in ref if decided[k][2] != ref[k][2]]
        assert not differ, f"{name} decides differently from {first} at {differ[:5]}"


def greedy_gap(scores, rows=None) -> tuple[float, tuple | None]:
    """The smallest gap between the largest and the second largest score over greedy choices: ``scores`` a sequence
    of (B, V) tensors, one per decoding step (``generate``'s ``scores``, or its ``logits`` when no logits processor
    changes them), or one (B, T, V) tensor (a forward pass's logits); ``rows`` (optional) the batch rows whose
    choices count. Returns the gap and ``(step, row)``."""
    steps = list(scores.unbind(1)) if torch.is_tensor(scores) else list(scores)
    best, where = math.inf, None
    for i, s in enumerate(steps):
        top = s.double().topk(2, dim=-1).values
        gap = top[:, 0] - top[:, 1]
        for b in (range(s.shape[0]) if rows is None else rows):
            if float(gap[b]) < best:
                best, where = float(gap[b]), (i, b)
    return best, where


def assert_greedy_gap(scores, at_least: float, rows=None, what: str = "greedy choices") -> float:
    """:func:`greedy_gap`, which must be at least ``at_least``; raises :class:`MarginTooSmall` otherwise."""
    gap, where = greedy_gap(scores, rows)
    if not gap >= at_least:
        raise MarginTooSmall(f"{what}: a greedy choice sits on a tie between two tokens: the top two scores differ by "
                             f"{gap:.3g} < {at_least:.3g} at (step, row) {where}; rounding may pick the other token "
                             "on another machine, so build the fixture away from it")
    return gap


def assert_selection_gap(scores, keep: int, at_least: float = FLAG_MARGIN, what: str = "head selection") -> float:
    """A selection of the ``keep`` largest of ``scores`` (N, H) in each row (SPIN's heads of most image mass): the
    smallest gap between the ``keep``-th and the next largest score, which must be at least ``at_least``; raises
    :class:`MarginTooSmall` otherwise. Returns the gap."""
    ordered = scores.double().sort(dim=-1, descending=True).values
    gaps = ordered[:, keep - 1] - ordered[:, keep]
    gap, row = float(gaps.min()), int(gaps.argmin())
    if not gap >= at_least:
        raise MarginTooSmall(f"{what}: the {keep} largest of {ordered.shape[1]} scores are chosen by a tie: the "
                             f"{keep}th and the next differ by {gap:.3g} < {at_least:.3g} in row {row}")
    return gap


def spin_selection_gap(model, inputs, knobs: dict, first: int, at_least: float = FLAG_MARGIN) -> float:
    """:func:`assert_selection_gap` of SPIN's kept heads (``knobs``: its configuration) at every layer and every
    row from ``first`` on, as one teacher-forced pass of ``inputs`` ranks them (SPIN damps head outputs, not
    weights, so ``output_attentions`` gives the weights it ranked by image mass)."""
    from dleaf import engine

    with torch.no_grad(), engine.attached(model, "spin", **knobs) as iv:
        attentions = model(**inputs, output_attentions=True).attentions
        keep = max(1, int(math.floor(iv.method.config.keep_ratio * iv.num_heads)))
    image = (inputs["input_ids"] == engine.image_token_id(model)).to(attentions[0].dtype)
    mass = torch.cat([(a[:, :, first:] * image[:, None, None, :a.shape[-1]]).sum(-1).transpose(1, 2).flatten(0, 1)
                      for a in attentions])  # (layers x B x rows, H)
    return assert_selection_gap(mass, keep, at_least, "SPIN's kept heads")
