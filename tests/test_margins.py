"""tests/margins.py, the margin checks of the tests that rely on discrete decisions: they pass a fixture whose
decisions are clear and refuse one moved onto a tie (a flag's signal on its threshold, two heads' equal image mass,
two tokens' equal scores), and they refuse the plain random organism, whose decisions are ties to float32 rounding
(which is why the tests that compare them use the sharpened one)."""

import math

import pytest
import torch

from dleaf.engine.trace import Trace
from dleaf import engine
from margins import (FLAG_MARGIN, GREEDY_GAP, MarginTooSmall, assert_dleaf_margins, assert_flag_margin,
                     assert_greedy_gap, assert_margin, assert_same_decisions, assert_selection_gap, decisions,
                     flag_cells, flags_of, greedy_gap, smallest_margin)


def _trace(signal, tau, active=None, iaf=None):
    """A one-step, one-layer trace of one sample over len(signal) columns (tau NaN: not decided); ``iaf`` per column
    the heads' IAF (default: two heads, 0.2 and 0.6)."""
    s = torch.tensor([signal], dtype=torch.float64)
    t = torch.tensor([tau], dtype=torch.float64)
    iaf = torch.tensor([iaf or [[0.2, 0.6]] * s.shape[1]], dtype=torch.float64).transpose(1, 2)  # (1, H, Q)
    tr = Trace(num_layers=1, num_heads=iaf.shape[1])
    act = torch.ones_like(s, dtype=torch.bool) if active is None else torch.tensor([active])
    tr.steps.append({"columns": torch.arange(10, 10 + s.shape[1]), "active": act,
                     "layers": {0: {"signal": s, "tau": t, "flag": act & (s > t), "iaf": iaf}}})
    return tr


@pytest.mark.parametrize("offset", [0.0, 1e-15, 1e-9, 0.5 * FLAG_MARGIN])
def test_a_flag_on_its_threshold_is_refused(offset):
    tr = _trace([0.9, 0.95 + offset, 0.3], [math.nan, 0.95, 0.9])
    assert smallest_margin(flag_cells(tr))[0] == pytest.approx(offset, abs=1e-16)
    with pytest.raises(MarginTooSmall, match=r"threshold tie.*\(0, 11, 0\)"):
        assert_flag_margin(tr)


def test_clear_flags_pass_and_only_decided_active_columns_count():
    tr = _trace([0.9, 0.95, 0.3, 0.5], [math.nan, 0.9, 0.9, 0.5], active=[True, True, True, False])
    assert assert_flag_margin(tr) == pytest.approx(0.05)  # column 13 (on its tie) is not active
    with pytest.raises(MarginTooSmall, match="nothing is tested"):
        assert_flag_margin(tr, columns=[{10}])  # the one kept column has no threshold yet
    assert flags_of(decisions(tr)) == {(0, 11, 0): (0.95, 0.9, True), (0, 12, 0): (0.3, 0.9, False)}
    assert decisions(tr, sample=[7]).keys() == {(7, 11, 0), (7, 12, 0), (7, 11, 0, "h*"), (7, 11, 0, "head 0"),
                                                (7, 11, 0, "head 1")}  # head choices where flagged only
    assert decisions(tr)[(0, 11, 0, "h*")] == (0.6, 0.2, 1) and decisions(tr)[(0, 11, 0, "head 0")][2] is True


@pytest.mark.parametrize("iaf", [[0.4, 0.4, 0.1], [0.3, 0.2, 0.1]])  # a tie for h*; a head on the mean (0.2)
def test_a_head_choice_on_a_tie_is_refused(iaf):
    tr = _trace([0.9, 0.95], [math.nan, 0.5], iaf=[[0.3, 0.1, 0.2], iaf])  # the flag itself is clear (0.45)
    assert assert_flag_margin(tr) == pytest.approx(0.45)
    with pytest.raises(MarginTooSmall, match=r"head choices.*\(0, 11, 0, '(h\*|head 1)'\)"):
        assert_dleaf_margins(tr)
    assert assert_dleaf_margins(_trace([0.9, 0.95], [math.nan, 0.5], iaf=[[0.3, 0.1, 0.2], [0.5, 0.2, 0.05]])) == \
        pytest.approx(0.75 / 3 - 0.2)  # head 1 against the mean 0.25


def test_margins_of_any_decisions_and_the_same_flags():
    assert assert_margin([("a", 1.0, 0.5), ("b", 0.2, 0.25)], 0.01) == pytest.approx(0.05)
    with pytest.raises(MarginTooSmall, match="at b"):
        assert_margin({"a": (1.0, 0.5), "b": (0.25, 0.25)}, 0.01)
    one = {(0, 1, 0): (0.5, 0.4, True)}
    assert_same_decisions({"x": one, "y": {(0, 1, 0): (0.51, 0.4, True)}})
    with pytest.raises(AssertionError, match="decides differently"):
        assert_same_decisions({"x": one, "y": {(0, 1, 0): (0.3, 0.4, False)}})
    with pytest.raises(AssertionError, match="different decisions"):
        assert_same_decisions({"x": one, "y": {}})


def test_a_greedy_choice_between_equal_scores_is_refused():
    clear = [torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.5]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.5]])]
    assert greedy_gap(clear) == (1.0, (0, 0))
    assert assert_greedy_gap(clear, 1e-4) == 1.0
    tied = [clear[0], torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.5, 1.5]])]
    with pytest.raises(MarginTooSmall, match=r"tie between two tokens.*\(1, 1\)"):
        assert_greedy_gap(tied, 1e-4)
    assert assert_greedy_gap(tied, 1e-4, rows=[0]) == 1.0  # the tied row's choices do not count
    assert greedy_gap(torch.stack(clear, 1)) == (1.0, (0, 0))  # one (B, T, V) tensor of a forward pass


def test_a_selection_of_the_largest_on_a_tie_is_refused():
    mass = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.25, 0.25, 0.1, 0.4]])  # row 1: the 2nd and 3rd largest tie
    assert assert_selection_gap(mass[:1], 2) == pytest.approx(0.1)
    with pytest.raises(MarginTooSmall, match="in row 1"):
        assert_selection_gap(mass, 2)


@torch.no_grad()
def test_the_plain_random_organism_decides_by_rounding(organism_batch):
    """On the plain tiny organism D-LEAF's decisions and its greedy tokens sit within float32 rounding of ties: the
    margin checks refuse it (the tests that compare such decisions along two paths run on the sharpened one)."""
    model, _, _, _, batch = organism_batch
    with engine.attached(model, "dleaf", trace=True, gamma=1.0, warmup=1, kappa=0.0) as iv:
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert smallest_margin(decisions(iv.trace))[0] < 10 * torch.finfo(torch.float32).eps
    with pytest.raises(MarginTooSmall, match="threshold tie"):
        assert_margin(decisions(iv.trace), FLAG_MARGIN)
    with pytest.raises(MarginTooSmall, match="tie between two tokens"):
        assert_greedy_gap(out.logits, GREEDY_GAP)
