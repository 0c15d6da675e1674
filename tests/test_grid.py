"""Tests for dleaf.grid: the grid's settings, every setting really decoded with its own method through the
harness, the summary table (its statistics and paired differences: tests/test_eval_compare.py)."""

import json
from pathlib import Path

import pytest

from dleaf import eval as harness
from dleaf import generation, grid


def test_settings_validate_knobs_and_labels_are_folders():
    with pytest.raises(ValueError, match="no knob"):
        grid.setting("x", "dleaf", alpha=1)
    assert grid.setting("d", "dleaf", gamma=0.5).knob_dict == {"gamma": 0.5}
    labels = [s.label for s in grid.grid(0.0312)]
    assert len(labels) == len(set(labels)) == 18 and labels[:4] == ["greedy", "pai", "spin", "dleaf"]
    assert len({grid.slug(l) for l in labels}) == 18 and grid.slug("dleaf gamma=0.25") == "dleaf_gamma=0.25"
    assert grid.grid(0.0312)[-1].knob_dict == {"random_rate": 0.0312}
    assert labels[-5:-1] == ["dleaf_learned", "dleaf_learned gamma=0.5", "pai alpha=0.9 learned", "spin learned"]
    assert grid.grid(0.0312)[-4].knob_dict == {"gamma": 0.5} and grid.grid(0.0312)[-4].method == "dleaf_learned"
    assert grid.grid(0.0312)[-2].knob_dict == {"localization": "learned", "detector": "organism"}
    assert "dleaf_learned" not in [s.label for s in grid.grid(0.0312, learned=False)]


def test_the_learned_settings_run_only_where_the_shipped_detector_fits(tiny_organism):
    from dleaf import models

    assert not grid.has_shipped_detector(tiny_organism[0])
    assert grid.has_shipped_detector(models.load("organism")[0])


def test_every_setting_is_decoded_with_its_own_method(tmp_path, tiny_organism, monkeypatch):
    model, processor = tiny_organism
    seen = []
    original = generation.generate

    def spy(model, processor, items, setting, *a, **k):
        seen.append(setting)
        return original(model, processor, items, setting, *a, **k)

    monkeypatch.setattr("dleaf.eval.runner.generate", spy)
    settings = [grid.setting("greedy"), grid.setting("spin", "spin", keep_ratio=0.25, scale=0.0),
                grid.setting("dleaf gamma=1", "dleaf", gamma=1.0, kappa=0.0, warmup=1)]
    res = grid.run_grid(model, processor, settings, "adversarial", 3, tmp_path, pope=True, batch_size=3,
                         say=lambda m: None)
    assert [(s.method, s.knob_dict) for s in seen] == [(s.method, s.knob_dict) for s in settings for _ in (0, 1)]
    caps = {label: [json.loads(line)["raw"] for line in
                    (Path(rec["dirs"]["captions"]) / harness.GENERATIONS).read_text().splitlines()]
            for label, rec in res.items()}
    assert caps["spin"] != caps["greedy"]
    assert res["dleaf gamma=1"]["flag_rate"] > 0 and res["greedy"]["flag_rate"] is None
    table, md = grid.summary_table(res, n_resamples=100)
    assert [r["label"] for r in table] == ["greedy", "spin", "dleaf gamma=1"] and "vs_base" in table[1]
    assert table[0]["chair_s"] == pytest.approx(res["greedy"]["caption_metrics"]["chair_s"])
    assert "| spin |" in md and md.count("\n") == 5
    # a second call resumes from the run folders: nothing is generated again
    seen.clear()
    again = grid.run_grid(model, processor, settings, "adversarial", 3, tmp_path, pope=True, say=lambda m: None)
    assert seen == [] and again["spin"]["captions"] == res["spin"]["captions"]
