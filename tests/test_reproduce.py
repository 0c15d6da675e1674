import json

import pytest

from dleaf.organism import reproduce


def _metrics(chair_g, chair_d, acc_g, acc_d):
    cap = lambda c: {"sections": {"adversarial": {"kind": "caption", "chair_s": c, "recall": 0.5}}}
    pope = lambda a: {"sections": {"adversarial/adversarial": {"kind": "yesno", "accuracy": a, "f1": a}}}
    return {("organism_caption", "greedy"): cap(chair_g), ("organism_caption", "dleaf"): cap(chair_d),
            ("organism_pope", "greedy"): pope(acc_g), ("organism_pope", "dleaf"): pope(acc_d)}


def test_claims_table_computes_relative_chair_and_pope_changes():
    rows, md = reproduce.claims_table(_metrics(0.40, 0.20, 0.80, 0.85), {"dleaf_over_greedy_throughput": 0.97,
                                                                        "batch": 8}, None)
    assert "-50.0% relative" not in md and "+50.0% relative" in md  # (0.40 - 0.20) / 0.40
    assert [r["agrees"] for r in rows] == [True, True, True]
    rows, md = reproduce.claims_table(_metrics(0.40, 0.40, 0.80, 0.80), {"dleaf_over_greedy_throughput": 0.5,
                                                                        "batch": 8}, None)
    assert [r["agrees"] for r in rows] == [False, False, False] and "+0.0% relative" in md
    assert "accuracy +0.0 points" in md


def test_study_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_images"):
        reproduce.StudyConfig(n_images=0)


@pytest.mark.slow
def test_study_runs_end_to_end_and_resumes(tmp_path):
    cfg = reproduce.StudyConfig(n_images=3, timing_repeats=1, timing_batch=2, timing_tokens=4, correspondence=False)
    first = reproduce.run_study(tmp_path, cfg, progress=False, say=lambda m: None)
    assert len(first["metrics"]) == len(reproduce.SETTINGS) * len(reproduce.BENCHMARKS)
    assert (tmp_path / "report.md").is_file() and (tmp_path / "methods.png").stat().st_size > 1000
    (tmp_path / "report.json").unlink()
    second = reproduce.run_study(tmp_path, cfg, progress=False, say=lambda m: None)
    assert json.dumps(first["claims"]) == json.dumps(second["claims"])
    same = lambda x: json.dumps(x, sort_keys=True)  # NaN-safe: NaN != NaN, but serialises the same
    assert same(first["metrics"]) == same(second["metrics"])
    fresh = reproduce.run_study(tmp_path / "again", cfg, progress=False, say=lambda m: None)
    assert same(fresh["metrics"]["organism_caption/dleaf"]["sections"]) == \
        same(first["metrics"]["organism_caption/dleaf"]["sections"])  # seeded: a fresh run gives the same numbers
