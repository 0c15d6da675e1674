"""``oracle``: act exactly at the (generated position, layer) cells a flag provider names, per sample.

Positions count a sample's active rows: 0 is the prompt's last row (the prefill's last row, whose logits give the
first generated token), ``p`` the row fed generated token ``p - 1`` (whose logits give token ``p``). A method with
``localization="oracle"`` reads its cells from its ``flags`` knob, which may be

- a :class:`FlagSet` (or anything with ``lookup(key)``), a mapping ``{key: entry}``, or a callable ``key -> entry``;
- the path of a JSON flag file ``{"version": 1, "samples": {key: entry}}`` (:meth:`FlagSet.save`).

An ``entry`` is ``{"rows": {position: layers}, "tokens": [...]}`` (or the ``rows`` mapping alone): ``layers`` a list
of layer indices or ``"all"`` (every watched layer); ``tokens``, optional, the reply the flags were made for (its
generated token ids). With ``tokens``, a sample's flags hold only while its decoding follows that reply: from the
first generated token that differs from ``tokens``, the sample's later flags are dropped (a flag names a row of that
reply, and the reply has changed). A flag at a row beyond the reply's end is never reached.

Keys: each sequence's rows are named, in order, by :meth:`dleaf.engine.Intervention.name_samples` when it was
called before the sequence started, else by a running count of rows since the method was attached (``0, 1, ...``:
the item index in :func:`dleaf.generation.generate`, which keeps item order). Keys are compared as strings. Under
beam search the beams of a sample are separate rows: name them with ``name_samples`` (a key repeated per beam).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from . import Localizer, register_localizer

FLAG_FILE_VERSION = 1


def _entry(raw) -> dict:
    """``{"rows": {int position: "all" | tuple of layers}, "tokens": list | None}`` from an entry as given."""
    if raw is None:
        return {"rows": {}, "tokens": None}
    if not isinstance(raw, Mapping):
        raise ValueError(f"a flag entry must be a mapping, got {type(raw).__name__}")
    if "rows" in raw or "tokens" in raw:
        rows, tokens = raw.get("rows") or {}, raw.get("tokens")
    else:
        rows, tokens = raw, None
    out = {}
    for pos, layers in rows.items():
        p = int(pos)
        if p < 0:
            raise ValueError(f"a flagged position must be >= 0, got {p}")
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"flagged layers must be a list of layer indices or 'all', got {layers!r}")
            out[p] = "all"
        else:
            out[p] = tuple(sorted({int(layer) for layer in layers}))
    return {"rows": out, "tokens": None if tokens is None else [int(t) for t in tokens]}


class FlagSet:
    """Oracle flags per sample key: ``FlagSet({key: {"rows": {position: layers}, "tokens": [...]}})``."""

    def __init__(self, samples: Mapping | None = None, meta: Mapping | None = None):
        self.samples = {str(k): _entry(v) for k, v in (samples or {}).items()}
        self.meta = dict(meta or {})

    def lookup(self, key) -> dict | None:
        return self.samples.get(str(key))

    def __len__(self) -> int:
        return len(self.samples)

    def n_cells(self, num_layers: int | None = None) -> int:
        """Flagged (position, layer) cells over every sample (``"all"`` counts ``num_layers``)."""
        n = 0
        for e in self.samples.values():
            for layers in e["rows"].values():
                n += (num_layers or 0) if layers == "all" else len(layers)
        return n

    def to_json(self) -> dict:
        return {"version": FLAG_FILE_VERSION, "meta": self.meta, "samples": {
            k: {"rows": {str(p): (v if v == "all" else list(v)) for p, v in sorted(e["rows"].items())},
                "tokens": e["tokens"]} for k, e in self.samples.items()}}

    def save(self, path: str | os.PathLike) -> Path:
        from ...io import write_json_atomic

        return write_json_atomic(self.to_json(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FlagSet":
        data = json.loads(Path(path).read_text())
        if not isinstance(data, Mapping) or data.get("version") != FLAG_FILE_VERSION or "samples" not in data:
            raise ValueError(f"{path}: not a version-{FLAG_FILE_VERSION} flag file (expected "
                             '{"version": 1, "samples": {...}})')
        return cls(data["samples"], data.get("meta"))


def provider_of(flags) -> Callable[[str], dict | None]:
    """``key -> entry or None`` from any accepted form of the ``flags`` knob."""
    if isinstance(flags, (str, os.PathLike)):
        flags = FlagSet.load(flags)
    if hasattr(flags, "lookup"):
        return lambda key: flags.lookup(key)
    if isinstance(flags, Mapping):
        table = {str(k): v for k, v in flags.items()}
        return lambda key: table.get(str(key))
    if callable(flags):
        return flags
    raise ValueError(f"flags must be a FlagSet, a mapping, a callable or a JSON flag file path; got "
                     f"{type(flags).__name__}")


@register_localizer("oracle")
class Oracle(Localizer):
    """The cells of a flag provider (module docstring). State per row: its key, its flag table (positions x layers),
    the reply its flags were made for, and whether the decoding still follows it."""

    def __init__(self, config, host):
        super().__init__(config, host)
        self.provider = provider_of(config.flags)
        self.pending: list | None = None  # keys for the next sequence (Intervention.name_samples)
        self.seen = 0  # rows named by the running count so far
        self.keys: list[str] = []
        self.table = self.tokens = self.on_track = None
        self.ids = None
        self.step: dict = {}

    def name_samples(self, keys: Iterable) -> None:
        self.pending = [str(k) for k in keys]

    def begin(self, batch, device):
        self.on_track = torch.ones(batch, dtype=torch.bool, device=device)

    def before_forward(self, kwargs, new_sequence):
        ids = kwargs.get("input_ids")
        self.ids, self.step = ids, {}
        if not new_sequence:
            return
        b, device = self.on_track.shape[0], self.on_track.device
        if self.pending is not None:
            if len(self.pending) != b:
                raise ValueError(f"name_samples gave {len(self.pending)} keys for a sequence of {b} rows")
            self.keys, self.pending = self.pending, None
        else:
            self.keys, self.seen = [str(self.seen + i) for i in range(b)], self.seen + b
        self._build(device)

    def _build(self, device) -> None:
        L = self.host.num_layers
        watched = sorted(self.host.watched)
        entries = [_entry(self.provider(k)) for k in self.keys]
        P = max([max(e["rows"], default=-1) for e in entries] + [-1]) + 2  # the last slot: never flagged
        table = torch.zeros(len(entries), P, L, dtype=torch.bool)
        for b, e in enumerate(entries):
            for p, layers in e["rows"].items():
                chosen = watched if layers == "all" else layers
                bad = [layer for layer in chosen if not 0 <= layer < L]
                if bad:
                    raise ValueError(f"sample {self.keys[b]!r}: flagged layers {bad} outside the decoder's {L} layers")
                table[b, p, list(chosen)] = True
        self.table = table.to(device)
        if any(e["tokens"] is not None for e in entries):
            T = max(len(e["tokens"] or ()) for e in entries) + 1
            tokens = torch.full((len(entries), T), -1, dtype=torch.long)
            for b, e in enumerate(entries):
                if e["tokens"] is not None:
                    tokens[b, :len(e["tokens"])] = torch.tensor(e["tokens"], dtype=torch.long)
            self.tokens = tokens.to(device)
            self.checked = torch.tensor([e["tokens"] is not None for e in entries], device=device)
        else:
            self.tokens = None

    def reorder(self, index):
        self.table = self.table.index_select(0, index)
        self.on_track = self.on_track.index_select(0, index)
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, index)
            self.checked = self.checked.index_select(0, index)
        self.keys = [self.keys[i] for i in index.tolist()]

    def rollback(self, length):
        return self.tokens is None  # whether the reply was left cannot be undone

    def end_forward(self):
        done = self.step.get("left")
        if done is not None:
            self.on_track &= ~done
        self.step = {}

    def _rows_on_track(self, call, pos):
        """(B, Qa) whether each row's earlier generated tokens are the reply's (True without a reply), once per
        forward call; the rows that leave the reply are kept for :meth:`end_forward`."""
        key = ("track", call.pad)
        if key not in self.step:
            if self.tokens is None or self.ids is None:
                ok = self.on_track[:, None].expand(pos.shape)
            else:
                fed = self.ids[:, call.pad:]  # the tokens at the active-suffix columns
                T = self.tokens.shape[1]
                expected = self.tokens.gather(1, (pos - 1).clamp(0, T - 1))
                mismatch = (pos >= 1) & (fed != expected) & self.checked[:, None]
                ok = self.on_track[:, None] & (torch.cumsum(mismatch.int(), 1) == 0)
                self.step["left"] = mismatch.any(1)
            self.step[key] = ok
        return self.step[key]

    def flags(self, call, rows=None):
        pos = call.positions()  # (B, Qa), negative before the active rows
        P = self.table.shape[1]
        slot = torch.where((pos >= 0) & (pos < P - 1), pos, torch.full_like(pos, P - 1))
        b = torch.arange(pos.shape[0], device=pos.device)[:, None]
        flagged = self.table[b, slot, call.layer]
        return flagged & call.active & self._rows_on_track(call, pos)


__all__ = ["FLAG_FILE_VERSION", "FlagSet", "Oracle", "provider_of"]
