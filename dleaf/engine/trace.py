"""What a method saw and did at every active position (filled while attached with ``trace=True``)."""

from __future__ import annotations

import math

import torch


class Trace:
    """What D-LEAF saw and did at every active position, per sample: each layer's signal and threshold, the flagged
    layers, each head's IAF, and the corrected heads. Filled while attached with ``trace=True``.

    ``steps`` holds one record per forward call: ``columns`` (absolute positions), ``active`` (B, Q) and, per
    watched layer, ``signal``/``tau``/``flag`` (B, Q) and ``iaf``/``corrected`` (B, H, Q), all on the CPU.
    """

    def __init__(self, num_layers: int, num_heads: int):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.steps: list[dict] = []

    def reorder(self, index: torch.Tensor) -> None:
        """Rows move as the batch does (beam search): row i becomes old row ``index[i]`` in every record."""
        index = index.cpu()
        for step in self.steps:
            for key, value in step.items():
                if key == "columns":
                    continue
                if key == "layers":
                    for rec in value.values():
                        for k in rec:
                            rec[k] = rec[k].index_select(0, index)
                else:
                    step[key] = value.index_select(0, index)

    def truncate(self, length: int, first_step: int = 0) -> None:
        """Forget the positions from ``length`` on in the records from ``first_step`` on (a rolled-back cache)."""
        kept = self.steps[:first_step]
        for step in self.steps[first_step:]:
            keep = step["columns"] < length
            if bool(keep.all()):
                kept.append(step)
                continue
            if not bool(keep.any()):
                continue
            n = int(keep.sum())
            step["columns"], step["active"] = step["columns"][:n], step["active"][:, :n]
            for rec in step["layers"].values():
                for k, t in rec.items():
                    rec[k] = t[..., :n]
            kept.append(step)
        self.steps[:] = kept

    def sample(self, i: int) -> dict:
        """Sample ``i``'s trace as arrays over its active positions: ``positions`` (T,), ``signal``, ``tau``,
        ``flag`` (T, L) and ``iaf``, ``corrected`` (T, L, H); unwatched layers hold NaN / False."""
        L, H = self.num_layers, self.num_heads
        pos, sig, tau, flag, iaf, cor = [], [], [], [], [], []
        for step in self.steps:
            act = step["active"][i]
            cols = step["columns"][act]
            q = int(act.sum())
            if q == 0:
                continue
            s = torch.full((q, L), math.nan)
            t = torch.full((q, L), math.nan)
            f = torch.zeros((q, L), dtype=torch.bool)
            a = torch.full((q, L, H), math.nan)
            c = torch.zeros((q, L, H), dtype=torch.bool)
            for layer, rec in step["layers"].items():
                s[:, layer] = rec["signal"][i][act].float()
                t[:, layer] = rec["tau"][i][act].float()
                f[:, layer] = rec["flag"][i][act]
                a[:, layer] = rec["iaf"][i][:, act].T.float()
                c[:, layer] = rec["corrected"][i][:, act].T
            pos.append(cols), sig.append(s), tau.append(t), flag.append(f), iaf.append(a), cor.append(c)
        if not pos:
            empty = torch.zeros(0)
            return {"positions": empty.long(), "signal": empty.reshape(0, L), "tau": empty.reshape(0, L),
                    "flag": empty.reshape(0, L).bool(), "iaf": empty.reshape(0, L, H),
                    "corrected": empty.reshape(0, L, H).bool()}
        return {"positions": torch.cat(pos), "signal": torch.cat(sig), "tau": torch.cat(tau), "flag": torch.cat(flag),
                "iaf": torch.cat(iaf), "corrected": torch.cat(cor)}

    @property
    def batch_size(self) -> int:
        return int(self.steps[0]["active"].shape[0]) if self.steps else 0

    def flag_rate(self) -> float:
        """Fraction of (active position, watched layer) pairs flagged."""
        flagged = total = 0
        for step in self.steps:
            for rec in step["layers"].values():
                flagged += int((rec["flag"] & step["active"]).sum())
                total += int(step["active"].sum())
        return flagged / total if total else float("nan")
