"""dpo_link.suite: inputs checked before any model loads, one run on a saved tiny checkpoint (report, files, the
pair as the unit of resampling), every statistic on the organism with its committed adapter, the study's step."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dleaf import generation
from dleaf.config import DLeafConfig
from dleaf.organism import world
from dpo_link import correspondence as C
from dpo_link import pairs, suite
from dpo_link.collate import response_rows

ROOT = Path(__file__).resolve().parents[2]

ORGANISM_READY = (ROOT / "data" / "organism" / "config.json").is_file() and \
    (ROOT / "data" / "organism_dpo" / "adapter_config.json").is_file()


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_dir, make_model, processor):
    """A random LoRA adapter on the saved tiny checkpoint, with a run record like train_dpo.py writes (beta 0.2,
    held-out pairs: the first 4 of world seed 2, and their recorded DPO loss)."""
    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    get_peft_model(make_model(processor), LoraConfig(target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False)).save_pretrained(path)
    (path / "dpo_run.json").write_text(json.dumps({
        "config": {"dpo": {"beta": 0.2}}, "data": {"eval": {"config": {"n": 4, "world_seed": 2}}},
        "eval_by_task": {"all": {"n": 4, "loss": 0.69, "rewards/accuracies": 0.5}}}))
    return path


def test_every_input_is_checked_before_any_model_loads(tmp_path, tiny_dir, tiny_adapter):
    ok = dict(model=str(tiny_dir), adapter=tiny_adapter)
    prep = suite.prepare(tmp_path / "out", **ok)
    assert prep.protocol.beta == 0.2 and prep.n_generations == 100 and prep.organism_data
    with pytest.raises(ValueError, match="n_pairs must be at least 3"):
        suite.prepare(tmp_path / "out", n_pairs=2, **ok)
    with pytest.raises(ValueError, match="n_generations must be 0"):
        suite.prepare(tmp_path / "out", n_generations=2, **ok)
    with pytest.raises(ValueError, match="no PEFT adapter"):
        suite.prepare(tmp_path / "out", model=str(tiny_dir), adapter=tmp_path / "nothing")
    with pytest.raises(ValueError, match="needs the DPO adapter"):
        suite.prepare(tmp_path / "out", model=str(tiny_dir))
    with pytest.raises(ValueError, match="gamma"):
        suite.prepare(tmp_path / "out", knobs={"gamma": 1.5}, **ok)
    with pytest.raises(ValueError, match="no knob.*gama"):
        suite.prepare(tmp_path / "out", knobs={"gama": 0.3}, **ok)
    with pytest.raises(ValueError, match="gamma='abc' must be a number"):
        suite.prepare(tmp_path / "out", knobs={"gamma": "abc"}, **ok)
    with pytest.raises(ValueError, match="model folder not found"):
        suite.prepare(tmp_path / "out", model=str(tmp_path / "nowhere"), adapter=tiny_adapter)
    with pytest.raises(ValueError, match="gammas must include 0"):
        suite.prepare(tmp_path / "out", gammas=[0.5], **ok)
    with pytest.raises(ValueError, match="no dataset at"):
        suite.prepare(tmp_path / "out", dataset=tmp_path / "missing.parquet", **ok)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        suite.prepare(tmp_path / "file", **ok)
    assert suite.prepare(tmp_path / "out", beta=0.05, **ok).protocol.beta == 0.05


def test_one_run_on_a_saved_tiny_checkpoint(tmp_path, tiny_dir, tiny_adapter):
    out = tmp_path / "report"
    messages = []
    report = suite.run_suite(out, progress=messages.append, model=str(tiny_dir), adapter=tiny_adapter, n_pairs=6,
                             n_generations=0, batch_size=3, n_resamples=50, permutations=50, gammas=(0.0, 0.5),
                             knobs={"kappa": 0.0})
    assert messages and messages[0].startswith("loading")
    for name in ("correspondence.json", "correspondence.md", "scatter.png", "loss_gamma.png", "heads.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*"))  # no temporary files left behind
    rep = json.loads((out / "correspondence.json").read_text())
    pr = rep["pairs_report"]
    assert rep["held_out_check"]["n"] == 4 and pr["beta"] == 0.2 and rep["config"]["dleaf"] == {"kappa": 0.0}
    assert rep["config"]["data"]["config"]["world_seed"] == 2
    assert pr["n_pairs"] == 6 and set(pr["dpo"]) == {"adapter", "dleaf", "random_target", "random_layers"}
    assert pr["curve"][0]["loss"] == pytest.approx(math.log(2)) and "slope" in pr
    assert np.array(pr["arrays"]["correction_frequency"]).shape == (2, 4)
    # the pair (its chosen and rejected reply) is the unit every sequence-level statistic resamples
    for name, entry in pr["sequence"].items():
        for stat in entry.values() if "pearson" in entry else [entry]:
            assert stat.get("n_units", 6) == 6 and stat["n"] == 12, name
    r_theta = np.asarray(pr["arrays"]["r_theta"])
    assert np.abs(r_theta).min() > 1e-4  # the adapter changes every reply's probability
    held = report["held_out_check"]
    from dpo_link.rewards import dpo_loss

    assert held["recomputed_loss"] == dpo_loss(r_theta[pr["arrays"]["chosen"][:4]],
                                                r_theta[pr["arrays"]["rejected"][:4]])["loss"]
    md = (out / "correspondence.md").read_text()
    assert "## Mechanism" in md and "Slope dL/dgamma" in md and str(tmp_path) not in md


# ------------------------------------------------------------------------------------ on the organism itself
@pytest.fixture(scope="module")
def organism_report():
    if not ORGANISM_READY:
        pytest.skip("needs the committed organism (data/organism) and its DPO adapter (data/organism_dpo)")
    from dpo_link.rewards import load_adapter

    from dleaf.organism.build import load_organism

    model, processor = load_organism()
    peft_model = load_adapter(model, ROOT / "data" / "organism_dpo")
    run = json.loads((ROOT / "data" / "organism_dpo" / "dpo_run.json").read_text())
    rows_, _ = pairs.held_out_rows(12, run)
    protocol = suite.CorrespondenceProtocol(beta=run["config"]["dpo"]["beta"], gammas=(0.0, 0.5), batch_size=12,
                                            n_resamples=200, permutations=200)
    report = suite.measure_pairs(peft_model, processor, rows_, DLeafConfig(), protocol, vocabulary=pairs.VOCABULARY)
    images, prompts, objects = pairs.caption_items(4)
    with peft_model.disable_adapter():
        replies = generation.generate_texts(peft_model.get_base_model(), processor, prompts, images)
    gen_rows = response_rows(images, prompts, replies, objects=objects)
    generations = suite.measure_generations(peft_model, processor, gen_rows, DLeafConfig(), protocol,
                                            pairs.VOCABULARY)
    return report, run, generations


def test_every_statistic_on_the_organism_with_its_adapter(organism_report):
    pr, run, gen = organism_report
    # the adapter learned something on held-out pairs, as its card says
    assert pr["dpo"]["adapter"]["accuracy"] > 0.5 and pr["dpo"]["adapter"]["loss"] < math.log(2)
    assert pr["dpo"]["dleaf"]["n"] == 12 and 0 <= pr["flag_rate"] <= 1
    for name in ("dleaf", "random_target", "random_layers", "matched_noise", "shuffled", "dleaf_length_partial"):
        for m in C.CORRELATIONS:
            e = pr["sequence"][name][m]
            assert e["note"] is not None or (e["low"] <= e["estimate"] <= e["high"] and 0 <= e["p_value"] <= 1)
    assert set(pr["pairs"]) == {"dleaf", "random_target", "random_layers", "shuffled"}
    assert set(pr["tokens"]) == {"all", "grounded", "hallucinated"} and pr["tokens"]["hallucinated"]["n_tokens"] > 0
    # DPO lowers the probability of hallucinated object tokens
    assert pr["tokens"]["hallucinated"]["mean_dpo"] < 0
    assert "s" in pr["scale"] and pr["mechanism"]["cells"] > 1
    assert pr["curve"][0]["loss"] == math.log(2)
    fd = pr["slope"]["finite_difference"]["central"]
    assert fd == pytest.approx(pr["slope"]["slope"], rel=0.1, abs=1e-4)
    # free generations: the base model's own greedy captions
    assert gen["n"] == 4 and set(gen["sequence"]) == set(C.CORRELATIONS) and "all" in gen["tokens"]
    assert world.OBJECTS == pairs.VOCABULARY


@pytest.mark.slow
@pytest.mark.skipif(not ORGANISM_READY, reason="needs data/organism and data/organism_dpo")
def test_study_step_on_the_organism(tmp_path):
    res = suite.study_step(tmp_path / "c", n_pairs=8)
    assert set(res) == {"summary", "agrees", "markdown"} and isinstance(res["agrees"], bool)
    assert "held-out pairs" in res["summary"] and (tmp_path / "c" / "correspondence.json").is_file()
