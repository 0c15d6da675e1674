"""``calibrated``: flag the rows whose layer signal exceeds a per-layer percentile of plain decoding's.

A calibration file (written by ``scripts/calibrate_localizer.py``, :func:`calibration_from_signals`) holds, per
decoder layer, percentiles of one layer signal (:func:`dleaf.methods.localizers.prompt_threshold.row_signal`: LIAE,
or the image-mass deficit) over every reply row of plain greedy replies on a calibration set (rows 0 to the reply's
end-of-sequence row), with its mean and sd, and the identity of the model it was measured on (its name, the number of
decoder layers and attention heads, a hash of its text configuration). A method with ``localization="calibrated"``
reads it from its ``calibration`` knob (a path, or the file's mapping) and flags an active row, position 0 included,
in a watched layer where the row's signal is strictly above the layer's ``percentile`` (a knob; it must be one the
file holds: :data:`PERCENTILES`). The file's own signal definition is used. At ``percentile=100`` (the largest
calibration value) nothing on the calibration replies is flagged, so decoding them is plain decoding bit for bit.

A file measured on another model is refused (:class:`dleaf.io.InputError` naming the file and both models).

``calibration`` may also be a :class:`SignalRecorder`: the localizer then flags nothing and records every active
row's signal per layer (what the calibration script does).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from . import Localizer, register_localizer
from .prompt_threshold import row_signal, signal_knobs

CALIBRATION_VERSION = 1
CALIBRATION_KIND = "dleaf-localizer-calibration"
#: the percentiles a calibration file holds per layer: 0, 0.5, ..., 100, and 99.1 ... 99.9
PERCENTILES = tuple(sorted({round(0.5 * i, 1) for i in range(201)} | {round(99 + 0.1 * i, 1) for i in range(1, 10)}))
_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
                        "attn_implementation", "_attn_implementation_internal", "use_cache", "output_attentions",
                        "output_hidden_states", "return_dict", "_commit_hash"}


def model_identity(model) -> dict:
    """``{"name", "num_layers", "num_heads", "config_hash"}``: the name or path the model was loaded from, its
    decoder's layers and attention heads, and the SHA-256 of its text configuration (sorted JSON, without the dtype,
    attention implementation and version fields)."""
    from ...engine.interface import text_config

    cfg = text_config(model)
    d = {k: v for k, v in sorted(cfg.to_dict().items()) if k not in _IGNORED_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()
    name = getattr(model.config, "_name_or_path", "") or getattr(cfg, "_name_or_path", "") or type(model).__name__
    return {"name": str(name), "num_layers": int(cfg.num_hidden_layers), "num_heads": int(cfg.num_attention_heads),
            "config_hash": digest}


def _describe(identity: Mapping) -> str:
    return (f"{identity.get('name')!r} ({identity.get('num_layers')} layers, {identity.get('num_heads')} heads, "
            f"config {str(identity.get('config_hash'))[:12]})")


def calibration_from_signals(signals: Mapping[int, np.ndarray], model, knobs: dict, source: Mapping | None = None
                             ) -> dict:
    """The calibration mapping from ``{layer: 1-D array of signal values}`` (every layer of the decoder)."""
    identity = model_identity(model)
    L = identity["num_layers"]
    values, means, sds, counts = [], [], [], []
    for layer in range(L):
        x = np.asarray(signals.get(layer, ()), dtype=np.float64)
        x = x[np.isfinite(x)]
        counts.append(int(x.size))
        if x.size:
            values.append([float(v) for v in np.percentile(x, PERCENTILES)])
            means.append(float(x.mean()))
            sds.append(float(x.std()))
        else:
            values.append(None)
            means.append(None)
            sds.append(None)
    return {"version": CALIBRATION_VERSION, "kind": CALIBRATION_KIND, "model": identity,
            "signal": {k: knobs[k] for k in ("layer_signal", "liae_variant", "liae_normalize")},
            "percentiles": list(PERCENTILES), "n_rows": counts, "values": values, "mean": means, "sd": sds,
            "source": dict(source or {})}


def load_calibration(calibration, model=None, where: str | None = None) -> dict:
    """The calibration mapping of a path or mapping, checked (format, and, with ``model``, that it was measured on
    ``model``; else :class:`dleaf.io.InputError`)."""
    from ...io import InputError

    where = where or (str(calibration) if isinstance(calibration, (str, os.PathLike)) else "the calibration")
    if isinstance(calibration, (str, os.PathLike)):
        try:
            data = json.loads(Path(calibration).read_text())
        except FileNotFoundError:
            raise InputError(f"calibration file {where} does not exist") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"calibration file {where} is not JSON ({exc})") from None
    elif isinstance(calibration, Mapping):
        data = dict(calibration)
    else:
        raise InputError(f"calibration must be the path of a calibration file or its mapping, got "
                         f"{type(calibration).__name__}")
    if (not isinstance(data, Mapping) or data.get("kind") != CALIBRATION_KIND
            or data.get("version") != CALIBRATION_VERSION):
        raise InputError(f"{where} is not a version-{CALIBRATION_VERSION} localizer calibration file "
                         f"(kind {CALIBRATION_KIND!r}; write one with scripts/calibrate_localizer.py)")
    if model is not None:
        mine, theirs = model_identity(model), data.get("model") or {}
        keys = ("num_layers", "num_heads", "config_hash")
        if any(mine[k] != theirs.get(k) for k in keys):
            raise InputError(f"calibration file {where} belongs to model {_describe(theirs)}, not to the attached "
                             f"model {_describe(mine)}; calibrate this model with scripts/calibrate_localizer.py")
    return data


class SignalRecorder:
    """What the ``calibrated`` localizer records when its ``calibration`` is this object (it then flags nothing):
    per forward call and layer, each active row's sequence-wide sample index, position and signal. Samples are
    numbered in order over the sequences since the method was attached (the item index of the generation loop)."""

    def __init__(self):
        self.rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (layer, sample, position, signal)
        self.offset = 0
        self.batch = 0

    def new_sequence(self, batch: int) -> None:
        self.offset += self.batch
        self.batch = batch

    def add(self, layer: int, positions: torch.Tensor, active: torch.Tensor, signal: torch.Tensor) -> None:
        b, q = torch.nonzero(active, as_tuple=True)
        self.rows.append((layer, (b + self.offset).cpu().numpy(), positions[b, q].cpu().numpy(),
                          signal[b, q].detach().cpu().numpy()))

    def signals(self, lengths: Mapping[int, int] | list) -> dict[int, np.ndarray]:
        """``{layer: values}`` over the rows ``0 <= position < lengths[sample]`` (the reply's generated tokens up to
        and including its end-of-sequence token), one value per (sample, position): a row recorded twice (a
        replayed pass) counts once, its last value kept."""
        lengths = np.asarray(list(lengths), dtype=np.int64)
        per: dict[int, dict] = {}
        for layer, sample, pos, sig in self.rows:
            keep = (sample < len(lengths)) & (pos >= 0)
            keep &= pos < np.where(sample < len(lengths), lengths[np.minimum(sample, len(lengths) - 1)], 0)
            table = per.setdefault(layer, {})
            for s, p, v in zip(sample[keep].tolist(), pos[keep].tolist(), sig[keep].tolist()):
                table[(s, p)] = v
        return {layer: np.array([table[k] for k in sorted(table)], dtype=np.float64) for layer, table in per.items()}


@register_localizer("calibrated")
class Calibrated(Localizer):
    """The module docstring's flags: per watched layer, rows above the calibration's ``percentile``."""

    needs_rows = True

    def __init__(self, config, host):
        from ...io import InputError

        super().__init__(config, host)
        source = getattr(config, "calibration", None)
        self.recorder = source if isinstance(source, SignalRecorder) else None
        self.percentile = float(getattr(config, "percentile", 95.0))
        if self.recorder is not None:
            self.knobs = signal_knobs(config)
            self.tau = None
            return
        if source is None:
            raise InputError("localization='calibrated' needs calibration (the path of a calibration file written by "
                             "scripts/calibrate_localizer.py)")
        data = load_calibration(source, host.model)
        self.knobs = dict(data["signal"])
        grid = [float(p) for p in data["percentiles"]]
        match = [i for i, p in enumerate(grid) if abs(p - self.percentile) < 1e-9]
        if not match:
            raise InputError(f"percentile {self.percentile} is not in calibration file {source} (it holds "
                             f"{grid[0]}, {grid[1]}, ..., {grid[-1]} in steps of 0.5, and 99.1 ... 99.9)")
        i = match[0]
        self.tau_cpu = torch.tensor([math.inf if v is None else float(v[i]) for v in data["values"]],
                                    dtype=torch.float64)
        self.tau = None

    def begin(self, batch, device):
        if self.recorder is not None:
            return
        if self.tau is None or self.tau.device != torch.device(device):
            self.tau = self.tau_cpu.to(device)

    def before_forward(self, kwargs, new_sequence):
        if self.recorder is not None and new_sequence:
            ids = kwargs.get("input_ids")
            self.recorder.new_sequence(int(ids.shape[0]) if ids is not None else int(self.host.image.shape[0]))

    def flags(self, call, rows=None):
        if rows is None:
            raise ValueError("the calibrated localizer needs the layer's attention rows")
        signal = row_signal(rows, call.image, self.knobs)  # (B, Qa)
        if self.recorder is not None:
            self.recorder.add(call.layer, call.positions(), call.active, signal)
            return torch.zeros_like(call.active)
        return call.active & (signal > self.tau[call.layer])


def calibrate(model, processor, items, knobs: dict | None = None, max_new_tokens: int = 80, batch_size: int = 100,
              sentence_rule: str = "keep", source: Mapping | None = None) -> dict:
    """The calibration mapping of ``model`` on ``items`` (objects with ``id``, ``prompt`` and ``image``): plain
    greedy replies (D-LEAF attached at zero strength with this localizer recording, which flags nothing, so the
    replies are plain decoding's), every reply row's signal per layer up to its end-of-sequence row."""
    from ...generation import generate
    from ...settings import Setting

    knobs = signal_knobs(type("K", (), dict(knobs or {}))())
    recorder = SignalRecorder()
    setting = Setting("dleaf", {"gamma": 0.0, "localization": "calibrated", "calibration": recorder, **knobs})
    with setting.attached(model) as iv:
        rows = list(generate(model, processor, items, setting, max_new_tokens, batch_size, sentence_rule,
                             intervention=iv, token_ids=True))
    signals = recorder.signals([len(r["token_ids"]) for r in rows])
    return calibration_from_signals(signals, model, knobs, {**(source or {}), "n_replies": len(rows),
                                                            "max_new_tokens": max_new_tokens})


__all__ = ["CALIBRATION_KIND", "CALIBRATION_VERSION", "Calibrated", "PERCENTILES", "SignalRecorder",
           "calibrate", "calibration_from_signals", "load_calibration", "model_identity"]
