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
    md = profile_markdown({"protocol": {"n_images": 4}, "models": {"organism": res}})
    assert "| organism | adversarial |" in md and "organism_caption v1" in md
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
    premise_rows = [dict(signal="liae", layer=0, auroc=0.66, ci_low=0.52, ci_high=0.70),
                    dict(signal="liae", layer=1, auroc=float("nan"), ci_low=float("nan"), ci_high=float("nan"))]
    profile = {"models": {"organism": {"captions": {"adversarial": caption, "indist": dict(caption, recall=0.99)},
                                       "premise": {"adversarial": premise_rows}},
                          "control": {"captions": {"adversarial": dict(caption, chair_s=0.01)}}}}
    rows = [r for r in design_targets(profile) if r.startswith("| ") and not r.startswith("| target")]
    assert len(rows) == 7 and all(r.endswith("| yes |") for r in rows)
    assert "best liae layer 0: 0.660 [0.520, 0.700]" in rows[4]
    premise_rows[0].update(auroc=0.66, ci_low=0.49)  # interval touches 0.5: not met
    caption.update(partner_share=0.55)  # mostly partners but not 1.5 x chance: not met
    rows = [r for r in design_targets(profile) if r.startswith("| ") and not r.startswith("| target")]
    assert [r.endswith("| **no** |") for r in rows] == [False, False, True, False, True, False, False]
