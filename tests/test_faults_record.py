"""The fault benchmark's cell records (dleaf/faults/record.py): the row-change record against the model's own
output_attentions."""

import pytest
import torch

from dleaf import engine
from dleaf.faults.record import RowChangeRecorder


# ------------------------------------------------------------------------------------------------ row changes
@torch.no_grad()
@pytest.mark.parametrize("method,knobs,layer", [("pai", dict(alpha=0.8, layer_start=1), 1),
                                                ("no_localization", dict(gamma=0.6, layer_start=2), 2)])
def test_row_change_record_equals_output_attentions(organism_batch, method, knobs, layer):
    """The recorded change at the first layer a method acts on equals sum_h |a_method - a_plain|_1 from the model's
    own attention weights (that layer's input is the plain model's)."""
    model, _, _, _, batch = organism_batch
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    n = batch["input_ids"].shape[1]
    full = {**batch, "input_ids": out,
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(out[:, n:])], 1)}
    plain = model(**full, output_attentions=True).attentions
    with engine.attached(model, method, **knobs) as iv:
        rec = RowChangeRecorder(iv)
        with iv.scoring(response_start=torch.full((out.shape[0],), n)):
            used = model(**full, output_attentions=True).attentions
    T = out.shape[1] - n + 1
    for b in range(out.shape[0]):
        got = rec.sample(b, T)
        for k in range(T):
            t = n - 1 + k
            want = float((used[layer][b, :, t].double() - plain[layer][b, :, t].double()).abs().sum())
            assert got[k, layer] == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert got[:, :layer].sum() == 0
    assert got[:, layer].sum() > 0


