"""Tests for dleaf.organism.profile: the profile through the harness, patch labels, the design-targets table."""

import pytest

from dleaf import eval as harness
from dleaf import models
from dleaf.organism import world
from dleaf.organism.profile import ProfileProtocol, design_targets, patch_labels, profile_markdown, profile_model


@pytest.fixture(scope="module")
def organism():
    return models.load("organism", device="cpu")


def test_patch_labels_mark_object_patches():
    scene = world.Scene(("fork", "cow"), (0, 8), 1)
    labels = patch_labels([scene], 36)[0]
    assert labels[[0, 1, 6, 7]].tolist() == [world.OBJECTS.index("fork")] * 4
    assert labels[[28, 29, 34, 35]].tolist() == [world.OBJECTS.index("cow")] * 4
    assert int((labels == len(world.OBJECTS)).sum()) == 28


def test_profile_runs_end_to_end_through_the_harness(organism, tmp_path):
    model, processor = organism
    protocol = ProfileProtocol(n_images=4, batch_size=4, n_bootstrap=50)
    res = profile_model(model, processor, protocol)
    assert set(res["captions"]) == {"indist", "adversarial", "replication"}
    assert set(res["pope"]) == set(world.POPE_NEGATIVES)
    assert res["pope"]["random"]["n"] == 8
    assert set(res["premise"]) == {"adversarial", "replication"} and len(res["image_share"]["adversarial"]) == 6
    assert set(res["row_tables"]) == {"adversarial", "replication"}
    tables = res["row_tables"]["adversarial"]
    assert set(tables) == {"row_counts", "actionability", "position", "by_error"}
    assert set(tables["by_error"]) == {"addition", "substitution"}
    assert set(res["first_token"]) == set(world.POPE_NEGATIVES)
    assert {r["subset"] for r in res["first_token"]["random"]} <= {"all", "absent", "present"}
    md = profile_markdown({"protocol": {"n_images": 4, "pope_split": "adversarial"}, "models": {"organism": res}})
    assert "| organism | adversarial |" in md and "organism_caption v1" in md
    assert "### organism, adversarial: what a flag sees" in md and "#### Position held fixed" in md
    assert "#### Additions alone" in md
    assert "**What a flag sees.**" in md and "## Yes/no answers at their first token (adversarial scenes)" in md
    old = {k: v for k, v in res.items() if k not in ("row_tables", "first_token")}
    assert "what a flag sees" not in profile_markdown({"models": {"organism": old}})  # a profile written before
    # the same numbers as a harness run of the same benchmark
    run = harness.run_evaluation(harness.EvalArguments(
        benchmark="organism_caption", splits=["adversarial"], limit=4, batch_size=4, progress=False,
        output_dir=str(tmp_path / "run")), model, processor)
    assert res["captions"]["adversarial"] == run["sections"]["adversarial"]
    assert res["examples"]["adversarial"][0]["caption"] == \
        harness.read_run(tmp_path / "run")[1][0]["text"]


def test_protocol_rejects_training_split():
    with pytest.raises(ValueError, match="not a held-out split"):
        ProfileProtocol(caption_splits=("train",))
    with pytest.raises(ValueError, match="must be positive"):
        ProfileProtocol(n_images=0)


def test_design_targets_table_judges_each_target_from_the_numbers():
    caption = dict(chair_s=0.2, recall=0.9, partner_share=0.8, partner_chance=0.4, n_additions=3, n_substitutions=1)
    good = dict(signal="image_mass_deficit", layer=0, auroc=0.66, ci_low=0.52, ci_high=0.70)
    nan = dict(signal="liae", layer=1, auroc=float("nan"), ci_low=float("nan"), ci_high=float("nan"))
    pope = {"random": dict(accuracy=0.85, yes_ratio=0.5), "popular": dict(accuracy=0.84, yes_ratio=0.52),
            "adversarial": dict(accuracy=0.75, yes_ratio=0.6)}
    profile = {"models": {
        "organism": {"captions": {"adversarial": caption, "indist": dict(caption, recall=0.98)},
                     "premise_by_error": {"adversarial": {"addition": [good, nan]},
                                          "replication": {"addition": [dict(good, auroc=0.7)]}},
                     "pope": pope},
        "control": {"captions": {"adversarial": dict(caption, partner_share=0.3, partner_chance=0.25)},
                    "pope": {k: dict(accuracy=0.95, yes_ratio=0.5) for k in pope}}}}

    def verdicts():
        rows = [r for r in design_targets(profile) if r.startswith("| ") and not r.startswith("| target")]
        return rows, [r.endswith("| yes |") for r in rows]

    rows, ok = verdicts()
    assert len(rows) == 11 and all(ok), rows
    assert "best image_mass_deficit layer 0: 0.660 [0.520, 0.700]" in rows[5]
    # each target flips on its own rule
    good.update(ci_low=0.5)  # interval touches 0.5
    caption.update(partner_share=0.55, chair_s=0.51, recall=0.849, n_additions=1)
    pope["adversarial"].update(yes_ratio=0.5)  # no co-occurrence signature
    profile["models"]["control"]["pope"]["popular"]["accuracy"] = 0.89
    profile["models"]["control"]["captions"]["adversarial"]["partner_share"] = 0.375  # exactly 1.5 x chance
    profile["models"]["organism"]["captions"]["indist"]["recall"] = 0.969
    rows, ok = verdicts()
    assert ok == [False, False, False, False, False, False, True, True, False, False, False], rows
    caption.update(chair_s=0.15, recall=0.85, partner_share=0.75, partner_chance=0.5)  # boundaries are inclusive
    rows, ok = verdicts()
    assert ok[1:4] == [True, True, True]
    good.update(ci_low=0.52, n_hallucinated=19)  # too few additions to judge, however clear the interval
    rows, ok = verdicts()
    assert not ok[5] and "on only 19 mentions (at least 20 needed to judge)" in rows[5], rows[5]
    good.update(n_hallucinated=20)
    rows, ok = verdicts()
    assert ok[5] and "mentions" not in rows[5], rows[5]
    profile["models"]["organism"]["premise_by_error"]["adversarial"]["addition"] = []
    rows, ok = verdicts()
    assert "no hallucinated mentions of this kind" in rows[5] and not ok[5]


def test_protocol_refuses_splits_outside_the_captions_and_unknown_negatives():
    with pytest.raises(ValueError, match="regime_splits replication not among the caption splits"):
        ProfileProtocol(caption_splits=("adversarial",), premise_splits=(), regime_splits=("replication",))
    with pytest.raises(ValueError, match="premise_splits replication not among"):
        ProfileProtocol(caption_splits=("adversarial",))
    with pytest.raises(ValueError, match="caption_splits is empty"):
        ProfileProtocol(caption_splits=(), premise_splits=())
    with pytest.raises(ValueError, match="pope_negatives sideways"):
        ProfileProtocol(pope_negatives=("random", "sideways"))
    assert ProfileProtocol().regime_split_set == ("adversarial", "replication")
    assert ProfileProtocol(regime_splits=("indist",)).regime_split_set == ("indist",)


def test_the_script_regime_only_measures_captions_regime_and_random_negatives(tmp_path, capsys):
    import json
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "profile_organism.py"
    main = runpy.run_path(str(script), run_name="script")["main"]
    out = tmp_path / "p"
    assert main(["--regime_only", "--limit", "2", "--batch_size", "2", "--output_dir", str(out)]) == 0
    profile = json.loads((out / "organism_profile.json").read_text())
    res = profile["models"]["organism"]
    assert list(res["captions"]) == ["adversarial"] and list(res["pope"]) == ["random"]
    assert list(res["attention_regime"]) == ["adversarial"] and res["attention_regime"]["adversarial"]["n_captions"] == 2
    assert res["premise"] == {} and "patch_probe" not in res and list(profile["models"]) == ["organism"]
    assert profile["protocol"]["premise_splits"] == [] and profile["protocol"]["regime_splits"] == ["adversarial"]
    md = (out / "organism_profile.md").read_text()
    assert "### Attention regime, organism, adversarial" in md and "## The premise" not in md
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(str(out))
    # no control by default with --regime_only (profile["models"] above); a plain profile keeps organism_control
    # explicit splits: the regime follows them; a plain profile keeps the premise splits
    parser = runpy.run_path(str(script), run_name="script")["build_parser"]()
    args = parser.parse_args(["--regime_only", "--splits", "indist", "replication", "--negatives", "popular"])
    assert args.splits == ["indist", "replication"] and args.negatives == ["popular"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--splits", "train"])
