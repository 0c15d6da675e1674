"""Tests for dleaf.premise_check: mention offsets, the per-mention records against explicit loops over attention
weights, the image share, the run-level check (config.json read, non-greedy and mismatched-model runs refused)."""

import math

import pytest
import torch

from dleaf import cli, metrics, models, premise_check
from dleaf.io import InputError, loads_strict
from dleaf.organism import world
from dleaf.organism.benchmarks import VOCAB


@pytest.fixture(scope="module")
def tiny(tiny_organism):
    return tiny_organism


def test_mention_offsets_point_at_the_first_token_of_each_object_word(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    ids = tok("there is a fork on the left . there is also a knife and a fork .",
              add_special_tokens=False)["input_ids"]
    got = premise_check.mention_token_offsets(tok, ids, VOCAB)
    assert [(j, m.category) for j, m in got] == [(3, "fork"), (12, "knife"), (15, "fork")]
    words = tok.convert_ids_to_tokens(ids)
    assert [words[j] for j, _ in got] == ["fork", "knife", "fork"]
    # a vocabulary whose names span several tokens: the first token of the phrase is returned
    vocab = metrics.ObjectVocabulary({"the left": "table"})
    assert [j for j, _ in premise_check.mention_token_offsets(tok, ids, vocab)] == [5]


@torch.no_grad()
def test_records_equal_explicit_loops_over_attention_weights(tiny):
    model, processor = tiny
    scenes = world.scenes("adversarial", 3)
    replies = [world.describe(s, seed=i) for i, s in enumerate(scenes)]
    partner = next(iter(world.PARTNERS[scenes[1].objects[0]]))
    replies[1] += f" there is also a {partner} ."  # a hallucinated partner
    prompt = world.CAPTION_PROMPTS[0]
    images = [world.render(s) for s in scenes]
    records, share = premise_check.attention_records(model, processor, images, [prompt] * 3, replies,
                                                     [s.objects for s in scenes], VOCAB, batch_size=2)
    assert any(r["hallucinated"] for r in records) and not all(r["hallucinated"] for r in records)
    tok = processor.tokenizer
    want, share_sum, share_n = [], torch.zeros(model.config.text_config.num_hidden_layers, dtype=torch.float64), 0
    for i, (image, reply) in enumerate(zip(images, replies)):
        # brute force, one sample alone: the prefix that predicts each reply token, attention weights of its last
        # row, LIAE and head-mean image mass by explicit loops over heads and image keys
        prompt_ids = models.model_inputs(processor, [prompt], [image])
        reply_ids = tok(reply, add_special_tokens=False)["input_ids"]
        full = torch.cat([prompt_ids["input_ids"], torch.tensor([reply_ids])], 1)
        res = model(input_ids=full, pixel_values=prompt_ids["pixel_values"], output_attentions=True)
        n = prompt_ids["input_ids"].shape[1]
        img = [k for k in range(full.shape[1]) if int(full[0, k]) == model.config.image_token_id]
        per_row = []
        for j in range(len(reply_ids)):
            liae, mass = [], []
            for att in res.attentions:
                row = att[0, :, n + j - 1].double()  # (H, K): the row that predicts reply token j
                masses = [sum(float(row[h, k]) for k in img) for h in range(row.shape[0])]
                mixed = [sum(float(row[h, k]) / masses[h] for h in range(row.shape[0])) / row.shape[0] for k in img]
                liae.append(-sum(p * math.log(p) for p in mixed if p > 0))
                mass.append(sum(masses) / row.shape[0])
            per_row.append((liae, mass))
            share_sum += torch.tensor(mass, dtype=torch.float64)
            share_n += 1
        words = tok.convert_ids_to_tokens(reply_ids)
        for j, w in enumerate(words):
            if w in world.THEME_OF:
                want.append({"sample": i, "word": w, "hallucinated": w not in scenes[i].object_set,
                             "liae": per_row[j][0], "mass": per_row[j][1]})
    assert len(records) == len(want) > 3
    for got, ref in zip(records, want):
        assert (got["sample"], got["word"], got["hallucinated"]) == (ref["sample"], ref["word"], ref["hallucinated"])
        assert got["liae"] == pytest.approx(ref["liae"], rel=1e-4, abs=1e-5)
        assert got["mass"] == pytest.approx(ref["mass"], rel=1e-4, abs=1e-6)
    assert share == pytest.approx((share_sum / share_n).tolist(), rel=1e-4, abs=1e-6)
    rows = premise_check.premise_rows(records, n_bootstrap=100)
    assert {(r.signal, r.layer) for r in rows} == {(s, l) for s in premise_check.SIGNALS for l in range(3)}
    assert premise_check.premise_rows([]) == []


def test_premise_orientation_on_synthetic_records():
    import numpy as np

    rng = np.random.default_rng(0)
    records = []
    for i in range(200):
        hall = i % 4 == 0
        records.append({"hallucinated": hall, "liae": [rng.normal(1.0 if hall else 0.0), rng.normal()],
                        "mass": [rng.normal(-1.0 if hall else 0.0), rng.normal()]})
    rows = {(r.signal, r.layer): r for r in premise_check.premise_rows(records, n_bootstrap=200)}
    assert rows[("liae", 0)].auroc > 0.7 and rows[("image_mass_deficit", 0)].auroc > 0.7
    assert 0.3 < rows[("liae", 1)].auroc < 0.7


def test_mismatched_inputs_are_an_error(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="differ in length"):
        premise_check.premise_records(model, processor, [None], ["a", "b"], ["x"], [[]], VOCAB)


def test_which_runs_the_check_accepts():
    greedy = {"benchmark": "organism_caption", "method": "greedy", "decoding": {"strategy": "greedy"},
              "model": "organism"}
    assert premise_check.check_run(greedy) == "organism"
    assert premise_check.check_run(greedy, "organism") == "organism"
    with pytest.raises(InputError, match="only applies to greedy runs"):
        premise_check.check_run({**greedy, "method": "dleaf"})
    with pytest.raises(InputError, match="only applies to greedy runs"):
        premise_check.check_run({**greedy, "decoding": {"strategy": "sample"}})
    with pytest.raises(InputError, match="written by 'organism'.*organism_control"):
        premise_check.check_run(greedy, "organism_control")
    with pytest.raises(InputError, match="needs a caption benchmark"):
        premise_check.check_run({**greedy, "benchmark": "organism_pope"})


def test_premise_check_script_on_a_harness_run(tiny, tmp_path, run_script, capsys):
    import runpy
    from pathlib import Path

    model, processor = tiny
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    evaluate = runpy.run_path(str(scripts / "evaluate.py"), run_name="x")["main"]
    check = runpy.run_path(str(scripts / "premise_check.py"), run_name="x")["main"]
    common = ["--benchmark", "organism_caption", "--model", str(tmp_path / "m"), "--splits", "adversarial",
              "--limit", "3", "--no_progress", "--max_new_tokens", "30"]
    assert cli.main(evaluate, common + ["--output_dir", str(tmp_path / "run")]) == 0
    assert cli.main(check, ["--run_dir", str(tmp_path / "run"), "--n_bootstrap", "50",
                            "--output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"outputs: {tmp_path / 'out'}"
    data = loads_strict((tmp_path / "out" / "premise.json").read_text())
    sec = data["sections"]["adversarial"]
    assert sec["n_items"] == 3 and sec["n_mentions"] == len(sec["records"]) > 0
    assert data["model"] == str(tmp_path / "m")
    assert (tmp_path / "out" / "premise.md").is_file()
    # a D-LEAF run and another model are refused before anything loads
    assert cli.main(evaluate, common + ["--output_dir", str(tmp_path / "d"), "--method", "dleaf"]) == 0
    capsys.readouterr()
    assert cli.main(check, ["--run_dir", str(tmp_path / "d")]) == 2
    assert "only applies to greedy runs" in capsys.readouterr().err
    assert cli.main(check, ["--run_dir", str(tmp_path / "run"), "--model", "organism_control"]) == 2
    assert "would measure another model" in capsys.readouterr().err
    assert cli.main(check, ["--run_dir", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
