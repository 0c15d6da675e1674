"""Tests for dleaf.grid: the grid's settings, every setting really decoded with its own method through
the harness, the summary table's statistics and paired differences against independent computations."""

import json
from pathlib import Path

import numpy as np
import pytest

from dleaf import eval as harness
from dleaf import generation, metrics
from dleaf.io import InputError
from dleaf import grid
from dleaf.organism import world
from dleaf.organism.benchmarks import VOCAB


def _scores(captions, scenes, split="adversarial"):
    res = metrics.chair(captions, [s.objects for s in scenes], VOCAB)
    return [{"id": f"{split}/{i}", "section": split, "kind": "caption", "n_words": pc.n_words,
             "n_mentions": pc.n_mentions, "n_hallucinated_mentions": pc.n_hallucinated_mentions,
             "hallucinated": sorted(pc.hallucinated), "grounded": sorted(pc.mentioned - pc.hallucinated),
             "n_truth": len(s.objects)} for i, (s, pc) in enumerate(zip(scenes, res.per_caption))], res


def _captions(scenes, rng, p_extra):
    caps = []
    for s in scenes:
        words = list(s.objects[: max(1, len(s.objects) - int(rng.random() < 0.2))])
        if rng.random() < p_extra:
            words.append(str(rng.choice([o for o in world.OBJECTS if o not in s.object_set])))
        caps.append("there is a " + " and a ".join(words) + " .")
    return caps


def test_caption_stats_equal_the_metric_core():
    scenes = world.scenes("adversarial", 60)
    scores, res = _scores(_captions(scenes, np.random.default_rng(0), 0.4), scenes)
    got = harness.caption_stats(scores)
    for key in ("chair_s", "chair_i", "recall", "mean_length"):
        assert got[key] == pytest.approx(getattr(res, key))
    assert got["n_hallucinated_mentions"] == res.n_hallucinated_mentions
    assert got["n_grounded_mentions"] == res.n_grounded_mentions


def test_paired_difference_matches_a_brute_force_bootstrap():
    from dleaf.eval import compare

    scenes = world.scenes("adversarial", 200)
    base, _ = _scores(_captions(scenes, np.random.default_rng(1), 0.5), scenes)
    other, _ = _scores(_captions(scenes, np.random.default_rng(2), 0.2), scenes)
    b, o = compare.caption_arrays(base), compare.caption_arrays(other)
    f = compare.CAPTION_STATISTICS["chair_i"]
    d = compare.paired_difference(b, o, f, n_resamples=3000)
    assert d["diff"] == pytest.approx(harness.caption_stats(other)["chair_i"] - harness.caption_stats(base)["chair_i"])
    rng = np.random.default_rng(5)
    boot = []
    for _ in range(3000):
        idx = rng.integers(0, len(base), len(base))  # whole items (both runs' rows of an image) resampled together
        boot.append(f(*(x[idx] for x in o)) - f(*(x[idx] for x in b)))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert d["low"] == pytest.approx(lo, abs=0.015) and d["high"] == pytest.approx(hi, abs=0.015)
    assert d["low"] < d["diff"] < d["high"] < 0  # fewer extras -> lower CHAIR_i
    assert compare.paired_difference(b, b, f, n_resamples=200) == {"diff": 0.0, "low": 0.0, "high": 0.0}
    whole = compare.paired_differences(base, other, n_resamples=500)["adversarial"]
    assert whole["chair_i"]["diff"] == pytest.approx(d["diff"])
    with pytest.raises(InputError, match="do not score the same items"):
        compare.paired_differences(base, other[1:])


def test_pope_statistics_equal_the_metric_core():
    from dleaf.eval import compare

    pairs = [(True, "yes"), (True, "no ."), (False, "yes , there is"), (False, "no"), (True, "yes"), (False, "no"),
             (True, "maybe"), (False, "a cup")]
    scores = [{"label": lab, "answer": metrics.parse_yes_no(a)} for lab, a in pairs]
    p = metrics.pope([a for _, a in pairs], [lab for lab, _ in pairs])
    assert p.n_unparsed == 2
    arrays = compare.pope_arrays(scores)
    # tp 2, fn 1, fp 1, tn 2, two unparsed answers (wrong, and neither fp nor fn)
    assert compare.pope_accuracy(*arrays) == pytest.approx(p.accuracy) == pytest.approx(4 / 8)
    assert compare.pope_f1(*arrays) == pytest.approx(p.f1) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_settings_validate_knobs_and_labels_are_folders():
    with pytest.raises(ValueError, match="no knob"):
        grid.setting("x", "dleaf", alpha=1)
    assert grid.setting("d", "dleaf", gamma=0.5).knob_dict == {"gamma": 0.5}
    labels = [s.label for s in grid.grid(0.0312)]
    assert len(labels) == len(set(labels)) == 14 and labels[:4] == ["greedy", "pai", "spin", "dleaf"]
    assert len({grid.slug(l) for l in labels}) == 14 and grid.slug("dleaf gamma=0.25") == "dleaf_gamma=0.25"
    assert grid.grid(0.0312)[-1].knob_dict == {"random_rate": 0.0312}


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
