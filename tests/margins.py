"""Margins of the discrete decisions a test relies on: D-LEAF's flags (a signal against its running threshold) and
greedy token choices (the largest score against the next one).

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

#: The margin a D-LEAF flag needs: 100 float32 epsilons (1.2e-5), ten times a worst-case bound on the rounding of
#: ``signal - tau`` (a few epsilons for the signal, as many for each of the running mean and standard deviation in
#: tau) and thousands of times the differences measured between one-pass scoring and step-by-step decoding and
#: between CPU kernels (ATEN_CPU_CAPABILITY default / avx2 / avx512: at most 2e-9).
FLAG_MARGIN = 100 * EPS32


class MarginTooSmall(AssertionError):
    """A decision the test relies on is within the required margin of its tie."""


def flag_cells(trace, columns=None):
    """Every flag D-LEAF decided against a threshold in ``trace`` (a :class:`dleaf.engine.trace.Trace`):
    ``((sample, column, layer), signal, tau, flag)`` for each active position of a watched layer whose threshold was
    ready (``tau`` finite), the signal and threshold as the engine compared them (float64, from the raw records).
    ``columns``: per sample, the columns whose flags decide the test's result (None: every traced one)."""
    for step in trace.steps:
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


def decided_flags(trace, columns=None, sample=None) -> dict:
    """:func:`flag_cells` as a dict ``(sample, column, layer) -> (signal, tau, flag)``; ``sample`` renames the
    trace's batch rows (a list: row i is ``sample[i]``), so that traces of single rows can be merged."""
    out = {}
    for (b, c, layer), s, t, f in flag_cells(trace, columns):
        out[(b if sample is None else sample[b], c, layer)] = (s, t, f)
    return out


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


def assert_margin(cells, at_least: float, what: str = "D-LEAF flags") -> float:
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


def assert_same_flags(runs: dict) -> None:
    """``runs``, name -> :func:`decided_flags`: the same flags decided, and decided the same way, in every run."""
    (first, ref), *others = runs.items()
    for name, flags in others:
        assert flags.keys() == ref.keys(), f"{name} and {first} decide different flags"
        differ = [k for k in ref if flags[k][2] != ref[k][2]]
        assert not differ, f"{name} flags differently from {first} at (sample, column, layer) {differ[:5]}"


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
