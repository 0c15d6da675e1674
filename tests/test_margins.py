"""tests/margins.py, the margin checks of the tests that rely on discrete decisions: they pass a fixture whose
decisions are clear and refuse one moved onto a tie (a flag's signal on its threshold, two tokens' equal scores)."""

import math

import pytest
import torch

from dleaf.engine.trace import Trace
from margins import (FLAG_MARGIN, MarginTooSmall, assert_flag_margin, assert_greedy_gap, assert_margin,
                     assert_same_flags, decided_flags, flag_cells, greedy_gap, smallest_margin)


def _trace(signal, tau, active=None):
    """A one-step, one-layer trace of one sample over len(signal) columns (tau NaN: not decided)."""
    s = torch.tensor([signal], dtype=torch.float64)
    t = torch.tensor([tau], dtype=torch.float64)
    tr = Trace(num_layers=1, num_heads=2)
    act = torch.ones_like(s, dtype=torch.bool) if active is None else torch.tensor([active])
    tr.steps.append({"columns": torch.arange(10, 10 + s.shape[1]), "active": act,
                     "layers": {0: {"signal": s, "tau": t, "flag": act & (s > t)}}})
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
    assert decided_flags(tr) == {(0, 11, 0): (0.95, 0.9, True), (0, 12, 0): (0.3, 0.9, False)}
    assert decided_flags(tr, sample=[7]).keys() == {(7, 11, 0), (7, 12, 0)}


def test_margins_of_any_decisions_and_the_same_flags():
    assert assert_margin([("a", 1.0, 0.5), ("b", 0.2, 0.25)], 0.01) == pytest.approx(0.05)
    with pytest.raises(MarginTooSmall, match="at b"):
        assert_margin({"a": (1.0, 0.5), "b": (0.25, 0.25)}, 0.01)
    one = {(0, 1, 0): (0.5, 0.4, True)}
    assert_same_flags({"x": one, "y": {(0, 1, 0): (0.51, 0.4, True)}})
    with pytest.raises(AssertionError, match="flags differently"):
        assert_same_flags({"x": one, "y": {(0, 1, 0): (0.3, 0.4, False)}})
    with pytest.raises(AssertionError, match="different flags"):
        assert_same_flags({"x": one, "y": {}})


def test_a_greedy_choice_between_equal_scores_is_refused():
    clear = [torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.5]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.5]])]
    assert greedy_gap(clear) == (1.0, (0, 0))
    assert assert_greedy_gap(clear, 1e-4) == 1.0
    tied = [clear[0], torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.5, 1.5]])]
    with pytest.raises(MarginTooSmall, match=r"tie between two tokens.*\(1, 1\)"):
        assert_greedy_gap(tied, 1e-4)
    assert assert_greedy_gap(tied, 1e-4, rows=[0]) == 1.0  # the tied row's choices do not count
    assert greedy_gap(torch.stack(clear, 1)) == (1.0, (0, 0))  # one (B, T, V) tensor of a forward pass
