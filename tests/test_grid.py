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


def test_the_learned_settings_use_the_detector_they_are_given(tiny_organism, tmp_path):
    """Another model's grid runs its own detector file at every learned setting; the default keeps the shipped one
    (dleaf_learned's own default, so the organism's run folders keep their knobs); a detector of another model, or
    no detector at all where none was shipped for the model, is refused or leaves the learned settings out."""
    from dleaf import detect, models

    own = grid.grid(0.1, detector="runs/x/detector.json")
    learned = {s.label: s for s in own if "learned" in s.label}
    assert len(learned) == 4 and all(s.knob_dict["detector"] == "runs/x/detector.json" for s in learned.values())
    assert learned["dleaf_learned gamma=0.5"].knob_dict == {"gamma": 0.5, "detector": "runs/x/detector.json"}
    assert "detector" not in grid.grid(0.1)[-5].knob_dict and grid.grid(0.1)[-5].label == "dleaf_learned"
    organism = models.load("organism")[0]
    assert detect.shipped_detector_for(organism) == "organism" and grid.grid_detector(organism) == "organism"
    assert detect.shipped_detector_for(tiny_organism[0]) is None and grid.grid_detector(tiny_organism[0]) is None
    with pytest.raises(harness.InputError, match="--detector organism: this detector was fitted on model"):
        grid.grid_detector(tiny_organism[0], "organism")
    path = detect.shipped_detector("organism")
    assert grid.grid_detector(organism, path) == str(path)


def test_the_grid_script_checks_its_detector_before_loading_a_model(tmp_path, capsys):
    import runpy

    from dleaf import cli

    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "organism_grid.py"),
                          run_name="script")["main"]
    bad = tmp_path / "det.json"
    bad.write_text("{}")
    for path, words in ((tmp_path / "missing.json", "cannot read a detector file"), (bad, "not a version")):
        code = cli.main(main, ["--model", "llava-hf/nonexistent-model-7b", "--detector", str(path), "--limit", "1",
                               "--output_dir", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and "error: --detector: " in err and words in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()


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
