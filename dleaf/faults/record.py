"""What a generation row of the fault benchmark keeps about its (position, layer) cells: the flags and signal margins
of a flagging method's trace, and the change a method makes to the attention rows it is handed
(:class:`RowChangeRecorder`)."""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np
import torch

from .. import engine
from .config import FaultConfig, faulted_cells

CELLS_VERSION = 1


class RowChangeRecorder:
    """Records, per sample, generated position and layer, the L1 change a method makes to the attention rows it is
    handed (summed over heads): ``sum_h sum_k |a_method[h, k] - a_in[h, k]|``, where ``a_in`` are the rows the
    method receives (the faulted rows in a faulted layer; for a method that edits pre-softmax scores, the rows
    before its edit) and ``a_method`` the rows it attends with. It wraps the attached method's ``attend`` on that
    one instance (nothing else is changed)."""

    def __init__(self, intervention: engine.Intervention):
        self.num_layers = intervention.num_layers
        self.rows: dict[int, np.ndarray] = {}
        method = intervention.method
        original = method.attend

        def attend(this, call):
            seen = {}
            plain_weights = call.weights

            def weights(pre_softmax=None):
                w = plain_weights(pre_softmax)
                given = w if pre_softmax is None else plain_weights(None)
                seen["rows"] = given[:, :, call.first:].detach().clone()
                return w

            call.weights = weights
            out, used = original(call)
            if "rows" in seen and used is not None:
                change = (used[:, :, call.first:].detach() - seen["rows"]).abs().sum(-1).sum(1)  # (B, Qa)
                self.add(call.layer, call.positions(), call.active, change)
            return out, used

        method.attend = types.MethodType(attend, method)

    def reset(self) -> None:
        self.rows = {}

    def add(self, layer: int, positions: torch.Tensor, active: torch.Tensor, change: torch.Tensor) -> None:
        pos = positions.cpu().numpy()
        act = active.cpu().numpy()
        val = change.double().cpu().numpy()
        for b, q in zip(*np.nonzero(act)):
            k = int(pos[b, q])
            arr = self.rows.get(int(b))
            if arr is None or arr.shape[0] <= k:
                grown = np.zeros((max(k + 1, 2 * (arr.shape[0] if arr is not None else 32)), self.num_layers))
                if arr is not None:
                    grown[:arr.shape[0]] = arr
                arr = self.rows[int(b)] = grown
            arr[k, layer] += val[b, q]

    def sample(self, b: int, n: int) -> np.ndarray:
        """(n, L) changes of sample ``b``'s first ``n`` rows."""
        arr = self.rows.get(b)
        out = np.zeros((n, self.num_layers))
        if arr is not None:
            m = min(n, arr.shape[0])
            out[:m] = arr[:m]
        return out


def _round(x: float, digits: int = 6):
    return None if not math.isfinite(x) else float(f"{x:.{digits}g}")


def cell_record(n: int, num_layers: int, fault: FaultConfig | None, trace_sample: dict | None,
                change: np.ndarray | None) -> dict:
    """What a generation row keeps about its (position, layer) cells: ``rows`` (n, the rows from the last prompt
    token to the one predicting the last kept token, end of sequence included); with a flagging method's trace,
    ``flags`` (per row a bit mask of the flagged layers), ``margin`` (per row and layer the signal minus its causal
    threshold, null where there is no threshold yet), ``signal_sum`` and ``signal_sq`` (per layer, over the
    unfaulted rows, and ``signal_faulted_sum`` over the faulted ones) and ``mass_sum`` (per layer, the head-mean
    image mass summed over rows); with a row-change record, ``change`` (per layer, the method's L1 change to the
    attention rows summed over ``faulted`` and ``clean`` (unfaulted) cells)."""
    faulted = faulted_cells(fault, n, num_layers) if fault is not None else np.zeros((n, num_layers), bool)
    rec: dict[str, Any] = {"version": CELLS_VERSION, "rows": n}
    if trace_sample is not None:
        flag = trace_sample["flag"][:n].numpy().astype(bool)
        signal = trace_sample["signal"][:n].double().numpy()
        tau = trace_sample["tau"][:n].double().numpy()
        rec["flags"] = [int(sum(1 << j for j in np.nonzero(r)[0])) for r in flag]
        margin = signal - tau
        rec["margin"] = [[_round(v) for v in r] for r in margin]
        sig = np.where(np.isfinite(signal), signal, 0.0)
        rec["signal_sum"] = [_round(v) for v in np.where(~faulted, sig, 0).sum(0)]
        rec["signal_sq"] = [_round(v) for v in np.where(~faulted, sig * sig, 0).sum(0)]
        rec["signal_faulted_sum"] = [_round(v) for v in np.where(faulted, sig, 0).sum(0)]
        iaf = trace_sample["iaf"][:n].double().numpy()
        rec["mass_sum"] = [_round(v) for v in np.nan_to_num(iaf.mean(-1)).sum(0)]
    if change is not None:
        rec["change"] = {"faulted": [_round(v) for v in np.where(faulted, change, 0).sum(0)],
                         "clean": [_round(v) for v in np.where(~faulted, change, 0).sum(0)]}
    return rec


