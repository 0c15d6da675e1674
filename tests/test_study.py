import json

import numpy as np
import pytest

from dleaf import metrics
from dleaf.organism import study, world
from dleaf.organism.profile import VOCAB


def _rows(captions, scenes):
    res = metrics.chair(captions, [s.objects for s in scenes], VOCAB)
    return [{"objects": list(s.objects), "caption": c, "n_words": pc.n_words, "n_mentions": pc.n_mentions,
             "n_hallucinated_mentions": pc.n_hallucinated_mentions, "hallucinated": sorted(pc.hallucinated),
             "grounded": sorted(pc.mentioned - pc.hallucinated)} for s, c, pc in zip(scenes, captions, res.per_caption)], res


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
    rows, res = _rows(_captions(scenes, np.random.default_rng(0), 0.4), scenes)
    got = study.caption_stats(rows)
    for key in ("chair_s", "chair_i", "recall", "mean_length"):
        assert got[key] == pytest.approx(getattr(res, key))
    assert got["n_hallucinated_mentions"] == res.n_hallucinated_mentions
    assert got["n_grounded_mentions"] == res.n_grounded_mentions


def test_paired_difference_matches_a_brute_force_bootstrap():
    scenes = world.scenes("adversarial", 200)
    base, _ = _rows(_captions(scenes, np.random.default_rng(1), 0.5), scenes)
    other, _ = _rows(_captions(scenes, np.random.default_rng(2), 0.2), scenes)
    b, o = study._caption_arrays(base), study._caption_arrays(other)
    f = study.CAPTION_STATISTICS["chair_i"]
    d = study.paired_difference(b, o, f, n_resamples=3000)
    assert d["diff"] == pytest.approx(study.caption_stats(other)["chair_i"] - study.caption_stats(base)["chair_i"])
    rng = np.random.default_rng(5)
    boot = []
    for _ in range(3000):
        idx = rng.integers(0, len(base), len(base))
        boot.append(f(*(x[idx] for x in o)) - f(*(x[idx] for x in b)))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert d["low"] == pytest.approx(lo, abs=0.015) and d["high"] == pytest.approx(hi, abs=0.015)
    assert d["low"] < d["diff"] < d["high"] < 0  # fewer extras -> lower CHAIR_i
    same = study.paired_difference(b, b, f, n_resamples=200)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0}


def test_pope_statistics_equal_the_metric_core():
    rows = [{"label": l, "answer": a} for l, a in [(True, "yes"), (True, "no ."), (False, "yes , there is"),
                                                    (False, "no"), (True, "yes"), (False, "no"), (True, "maybe"),
                                                    (False, "a cup")]]
    p = study.pope_stats(rows)
    assert p["n_unparsed"] == 2
    arrays = study._pope_arrays(rows)
    # tp 2, fn 1, fp 1, tn 2, two unparsed answers (wrong, and neither fp nor fn)
    assert study._pope_accuracy(*arrays) == pytest.approx(p["accuracy"]) == pytest.approx(4 / 8)
    assert study._pope_f1(*arrays) == pytest.approx(p["f1"]) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_grid_file_resumes_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "grid.jsonl"
    path.write_text(json.dumps({"key": "adversarial/4/greedy", "label": "greedy", "method": "greedy"}) + "\n"
                    + '{"key": "adversarial/4/cut"')
    done = study._read_done(path)
    assert list(done) == ["adversarial/4/greedy"]
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="grid.jsonl:1"):
        study._read_done(path)


def test_settings_validate_knobs():
    with pytest.raises(ValueError, match="no knob"):
        study.setting("x", "dleaf", alpha=1)
    assert study.setting("d", "dleaf", gamma=0.5).knob_dict == {"gamma": 0.5}
