"""Fault injection: known damage to a model's image attention, at chosen decoder layers, heads and generated
positions: the ground truth a localization method is measured against.

A fault is data: a frozen :class:`FaultConfig`, validated on construction, like a method's configuration. It is
attached with a method or alone::

    from dleaf import engine
    from dleaf.faults import FaultConfig

    fault = FaultConfig("diffuse", layers=[3], heads=0.5, strength=1.0, positions="random", fraction=0.5)
    with engine.attached(model, "dleaf", fault=fault, trace=True) as iv:      # or method None: the fault alone
        out = model.generate(**inputs, max_new_tokens=64, **engine.generation_kwargs(iv, inputs))

and applied inside the engine's attention function, before the method (the engine's pre-method hook,
:meth:`dleaf.engine.AttentionCall.weights`): in a faulted layer, every method sees the faulted rows exactly as it
would see natural ones, and a faulted layer the method does not watch runs the faulted rows and nothing else. A method
that edits pre-softmax scores (PAI) gets the scores whose softmax is the faulted row (the log of each changed weight
plus the row's log-normaliser; every unchanged weight keeps its score). Order: **the fault first, then the method.**

Definitions. At an active row of a faulted layer (a generated position, see below), a faulted head h has the
post-softmax attention ``a`` over the keys; ``I`` is the set of the sample's image keys, ``T`` the other keys;
``m = sum_I a`` (image mass), ``t = sum_T a`` (text mass), ``p = a_I / m`` (image profile), ``u`` the uniform
distribution over ``I``. Each kind maps ``a`` to a target ``a1`` (the fault at full strength), and the strength
``s`` in [0, 1] gives ``a' = a + s (a1 - a)`` (``torch.lerp``: ``s = 0`` returns ``a`` bit for bit):

- ``diffuse``: ``a1_i = m / |I|`` on ``I``, the text keys unchanged: the image profile becomes ``(1 - s) p + s u``
  and the image mass is kept. This is the damage the layer image-attention entropy (LIAE) is meant to see.
- ``drift``: ``a1 = 0`` on ``I`` and ``a1_j = a_j (1 + m / t)`` on ``T``: a share ``s`` of the image mass moves to
  the text keys, in proportion to their attention; the image profile is kept. This is the damage an image-mass signal
  is meant to see. A row with no text mass (``t = 0``) is left as it is.
- ``swap``: the faulted heads of a layer, in index order ``h_1 < ... < h_n`` (``n >= 2``), take each other's image
  profiles in a cycle, ``a1_{h_k, i} = m_{h_k} p_{h_{k+1}, i}`` (``h_{n+1} = h_1``; two heads swap), each keeping
  its own image mass and text keys. A head with no image mass passes on an all-zero profile.

Heads: a list of indices, or a fraction ``f``: ``floor(f H + 1/2)`` heads (at least one) of each faulted layer,
drawn without replacement by ``numpy.random.default_rng([seed, layer])``. Positions: the rows a method acts on are
indexed per sample from 0 (the last prompt token, whose row predicts the first generated token) on, one per generated
token; ``positions="all"`` faults every one, ``"from"`` those from index ``start`` on, ``"random"`` index ``k`` when
the ``k``-th number of ``numpy.random.default_rng(seed).random`` is below ``fraction`` (the same indices in every
reply). A row is faulted the same way in ``generate``, in teacher-forced scoring and after a cached prompt, since
it depends only on its index.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["KINDS", "POSITIONS", "FaultConfig", "FaultHook", "fault_config", "fault_knobs", "faulted_cells"]

KINDS = ("diffuse", "drift", "swap")
POSITIONS = ("all", "from", "random")


def _index_list(owner: str, name: str, value, what: str) -> tuple[int, ...]:
    if isinstance(value, str):
        parts = [v.strip() for v in value.split(",") if v.strip()]
        try:
            value = [int(v) for v in parts]
        except ValueError:
            raise ValueError(f"{owner}.{name} must be a list of {what} indices (e.g. [2, 3] or \"2,3\"), got "
                             f"{value!r}") from None
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = [int(value)]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{owner}.{name} must be a non-empty list of {what} indices, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{owner}.{name} must hold non-negative integer {what} indices, got {v!r}")
        out.append(int(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{owner}.{name} repeats an index: {out}")
    return tuple(sorted(out))


def _number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    """A fault of a model's image attention: which layers, heads and generated positions, what kind, how strong.

    Knobs:
        kind: "diffuse" (profile toward uniform over the image keys, image mass kept), "drift" (image mass moved to
            the text keys, profile kept) or "swap" (image profiles exchanged between the faulted heads)
        layers: decoder layers faulted: a list of indices (or "2,3"), or "all"
        heads: heads faulted in each faulted layer: a fraction in (0, 1] (that share of the heads, drawn per layer
            with seed) or a list of head indices
        strength: s in [0, 1]: the row becomes a + s (a1 - a), a1 the fault at full strength (0: no change, bit
            for bit)
        positions: "all" generated positions, "from" position start on, or "random" (each index with probability
            fraction, the same in every reply)
        start: first position faulted with positions="from" (0: the row predicting the first reply token)
        fraction: probability that a position is faulted with positions="random", in (0, 1]
        seed: seed of the head draw (heads given as a fraction) and of the random positions
    """

    kind: str = "diffuse"
    layers: Any = "all"
    heads: Any = 1.0
    strength: float = 1.0
    positions: str = "all"
    start: int | None = None
    fraction: float | None = None
    seed: int = 0

    def __post_init__(self):
        owner = "FaultConfig"
        if self.kind not in KINDS:
            raise ValueError(f"{owner}.kind must be one of {', '.join(map(repr, KINDS))}; got {self.kind!r}")
        if not (isinstance(self.layers, str) and self.layers.strip() == "all"):
            object.__setattr__(self, "layers", _index_list(owner, "layers", self.layers, "layer"))
        else:
            object.__setattr__(self, "layers", "all")
        if _number(self.heads):
            if not 0.0 < float(self.heads) <= 1.0:
                raise ValueError(f"{owner}.heads as a fraction must lie in (0, 1], got {self.heads!r}")
            object.__setattr__(self, "heads", float(self.heads))
        else:
            heads = _index_list(owner, "heads", self.heads, "head")
            if self.kind == "swap" and len(heads) < 2:
                raise ValueError(f"{owner}: a swap needs at least two faulted heads to exchange profiles, got "
                                 f"heads={list(heads)}")
            object.__setattr__(self, "heads", heads)
        if not _number(self.strength) or not 0.0 <= float(self.strength) <= 1.0:
            raise ValueError(f"{owner}.strength must be a number in [0, 1], got {self.strength!r}")
        object.__setattr__(self, "strength", float(self.strength))
        if self.positions not in POSITIONS:
            raise ValueError(f"{owner}.positions must be one of {', '.join(map(repr, POSITIONS))}; got "
                             f"{self.positions!r}")
        if self.positions == "from":
            if self.start is None or isinstance(self.start, bool) or not isinstance(self.start, (int, np.integer)) \
                    or self.start < 0:
                raise ValueError(f"{owner}: positions='from' needs start, a non-negative integer (the first faulted "
                                 f"position), got {self.start!r}")
            object.__setattr__(self, "start", int(self.start))
        elif self.start is not None:
            raise ValueError(f"{owner}.start={self.start!r} applies to positions='from' only (positions is "
                             f"{self.positions!r})")
        if self.positions == "random":
            if self.fraction is None or not _number(self.fraction) or not 0.0 < float(self.fraction) <= 1.0:
                raise ValueError(f"{owner}: positions='random' needs fraction in (0, 1] (the share of positions "
                                 f"faulted), got {self.fraction!r}")
            object.__setattr__(self, "fraction", float(self.fraction))
        elif self.fraction is not None:
            raise ValueError(f"{owner}.fraction={self.fraction!r} applies to positions='random' only (positions is "
                             f"{self.positions!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"{owner}.seed must be a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    # ------------------------------------------------------------------ resolution
    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The faulted layers of a decoder of ``num_layers`` layers (an error if one does not exist)."""
        if self.layers == "all":
            return tuple(range(num_layers))
        bad = [layer for layer in self.layers if layer >= num_layers]
        if bad:
            raise ValueError(f"FaultConfig.layers {list(self.layers)}: layer(s) {bad} do not exist in a decoder of "
                             f"{num_layers} layers")
        return self.layers

    def head_indices(self, layer: int, num_heads: int) -> tuple[int, ...]:
        """The faulted heads of ``layer`` in a layer of ``num_heads`` heads."""
        if isinstance(self.heads, float):
            n = max(1, min(num_heads, math.floor(self.heads * num_heads + 0.5)))
            heads = tuple(sorted(int(h) for h in np.random.default_rng([self.seed, layer]).choice(
                num_heads, n, replace=False)))
        else:
            bad = [h for h in self.heads if h >= num_heads]
            if bad:
                raise ValueError(f"FaultConfig.heads {list(self.heads)}: head(s) {bad} do not exist in a layer of "
                                 f"{num_heads} heads")
            heads = self.heads
        if self.kind == "swap" and len(heads) < 2:
            raise ValueError(f"FaultConfig: a swap needs at least two faulted heads; heads={self.heads!r} gives "
                             f"{len(heads)} of {num_heads}")
        return heads

    def position_faulted(self, index: np.ndarray | Sequence[int]) -> np.ndarray:
        """Whether each position index (0 = the last prompt token's row) is faulted (bool array)."""
        index = np.asarray(index, dtype=np.int64)
        if self.positions == "all":
            return index >= 0
        if self.positions == "from":
            return index >= self.start
        draws = _draws(self.seed, int(index.max()) + 1 if index.size else 0)
        return (index >= 0) & (draws[np.clip(index, 0, None)] < self.fraction) if index.size else index >= 0

    def bind(self, num_layers: int, num_heads: int) -> "FaultHook":
        """The pre-method hook the engine calls (:class:`FaultHook`) for a decoder of this shape."""
        return FaultHook(self, num_layers, num_heads)

    # ------------------------------------------------------------------ records
    def record(self) -> dict:
        """The fault as plain data (for run configurations); :func:`fault_config` reads it back."""
        out = dataclasses.asdict(self)
        for key in ("layers", "heads"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    def label(self) -> str:
        """A short name: kind, layers, heads, strength and positions, e.g. ``diffuse L3 h0.5 s1 p~0.5``."""
        layers = "all" if self.layers == "all" else ",".join(map(str, self.layers))
        heads = f"h{self.heads:g}" if isinstance(self.heads, float) else "h" + ",".join(map(str, self.heads))
        pos = (f" p>={self.start}" if self.positions == "from" else
               f" p~{self.fraction:g}" if self.positions == "random" else "")
        return f"{self.kind} L{layers} {heads} s{self.strength:g}{pos}"


def fault_config(record: Mapping[str, Any] | FaultConfig | None = None, **knobs) -> FaultConfig:
    """A :class:`FaultConfig` from a mapping of its fields (a record, a YAML entry, ``--fault`` knobs) and/or
    keyword arguments; an unknown field is an error that lists the valid ones."""
    if isinstance(record, FaultConfig):
        record = record.record()
    fields = {**dict(record or {}), **knobs}
    valid = [f.name for f in dataclasses.fields(FaultConfig)]
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"a fault has no field(s) {', '.join(unknown)}; its fields are {', '.join(valid)}")
    return FaultConfig(**fields)


def fault_knobs() -> list[dict]:
    """Every field of :class:`FaultConfig` with its default and help (for command-line help texts)."""
    from ..methods.base import knob_help

    helps = knob_help(FaultConfig)
    return [{"name": f.name, "default": f.default, "help": helps.get(f.name, "")}
            for f in dataclasses.fields(FaultConfig)]


_DRAWS: dict[int, np.ndarray] = {}


def _draws(seed: int, n: int) -> np.ndarray:
    """The first ``n`` numbers of ``numpy.random.default_rng(seed).random`` (a prefix of one stream, so the draw of
    an index never depends on how many were asked for)."""
    have = _DRAWS.get(seed)
    if have is None or have.shape[0] < n:
        size = max(n, 256, 2 * (have.shape[0] if have is not None else 0))
        have = np.random.default_rng(seed).random(size)
        _DRAWS[seed] = have
    return have[:n]


def faulted_cells(config: FaultConfig, n_rows: int, num_layers: int) -> np.ndarray:
    """(n_rows, num_layers) bool: the (position, layer) cells of a reply whose first ``n_rows`` rows are active that
    the fault touches (every faulted head of the cell's layer)."""
    rows = config.position_faulted(np.arange(n_rows))
    layers = np.zeros(num_layers, dtype=bool)
    layers[list(config.layer_indices(num_layers))] = True
    return rows[:, None] & layers[None, :]


class FaultHook:
    """A :class:`FaultConfig` bound to a decoder's shape: the engine's pre-method hook. ``layers`` are the faulted
    layers; ``hook(call, rows)`` returns the faulted copy of ``rows`` (B, H, Qa, K), the post-softmax active rows of
    one attention call (:class:`dleaf.engine.AttentionCall`: ``active`` (B, Qa), ``image`` (B, K),
    ``positions()``)."""

    def __init__(self, config: FaultConfig, num_layers: int, num_heads: int):
        self.config = config
        self.layers = frozenset(config.layer_indices(num_layers))
        self.heads = {layer: config.head_indices(layer, num_heads) for layer in sorted(self.layers)}
        self._index: dict = {}

    def head_index(self, layer: int, device) -> torch.Tensor:
        key = (layer, str(device))
        if key not in self._index:
            self._index[key] = torch.tensor(self.heads[layer], dtype=torch.long, device=device)
        return self._index[key]

    def row_mask(self, call) -> torch.Tensor:
        """(B, Qa) bool: the active rows of this call that the fault touches."""
        cfg = self.config
        active = call.active
        if cfg.positions == "all":
            return active
        positions = call.positions()
        if cfg.positions == "from":
            return active & (positions >= cfg.start)
        n = int(positions.max()) + 1 if positions.numel() else 0
        draws = torch.as_tensor(_draws(cfg.seed, max(n, 1)), device=positions.device)
        return active & (positions >= 0) & (draws[positions.clamp(min=0)] < cfg.fraction)

    def target(self, sub: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The fault at full strength ``a1`` of the faulted heads' rows ``sub`` (B, n, Qa, K), ``image`` (B, 1, 1,
        K) bool."""
        img = image.to(sub.dtype)
        mass = (sub * img).sum(-1, keepdim=True)
        kind = self.config.kind
        if kind == "diffuse":
            return torch.where(image, mass / img.sum(-1, keepdim=True), sub)
        if kind == "drift":
            text = (sub * (1 - img)).sum(-1, keepdim=True)
            safe = torch.where(text > 0, text, torch.ones_like(text))
            moved = torch.where(image, torch.zeros_like(sub), sub + mass * (sub / safe))
            return torch.where(text > 0, moved, sub)
        profile = sub * img / (mass + (mass == 0))
        return torch.where(image, mass * profile.roll(-1, dims=1), sub)

    def __call__(self, call, rows: torch.Tensor) -> torch.Tensor:
        heads = self.head_index(call.layer, rows.device)
        sub = rows.index_select(1, heads)
        image = call.image[:, None, None, :]
        weight = (self.row_mask(call)[:, None, :, None] * self.config.strength).to(rows.dtype)
        faulted = torch.lerp(sub, self.target(sub, image), weight)
        return rows.index_copy(1, heads, faulted)
