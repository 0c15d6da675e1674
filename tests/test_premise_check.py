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


class _PieceTokenizer:
    """Decodes ids as the concatenation of fixed pieces: a tokenizer that splits words into several tokens."""

    pieces = ["there", " is", " a", " sk", "ate", "board", " and", " a", " fork", " ."]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_mention_spans_cover_every_token_of_a_split_word():
    tok = _PieceTokenizer()
    ids = list(range(len(tok.pieces)))
    vocab = metrics.ObjectVocabulary({"skateboard": "skateboard", "fork": "fork", "is a": "phrase"})
    got = [(first, last, m.category) for first, last, m in premise_check.mention_token_spans(tok, ids, vocab)]
    # "is a" spans tokens 1-2; "skateboard" tokens 3-5 (" sk" starts it, "ate" and "board" lengthen it); fork 8
    assert got == [(1, 2, "phrase"), (3, 5, "skateboard"), (8, 8, "fork")]
    assert [j for j, _ in premise_check.mention_token_offsets(tok, ids, vocab)] == [1, 3, 8]


class _CocoPieces(_PieceTokenizer):
    pieces = ["two", " hot", " do", "gs", " and", " a", " te", "ddy", " bear", " on", " a", " bus", " ."]


def test_mention_spans_under_chair_reference_rules_follow_its_merged_words():
    """The reference rules merge double words ("hot dogs" -> one word "hot dog") and lemmatize ("dogs" -> "dog"):
    a mention's span is the tokens of that one merged word, whatever the tokenizer's pieces."""
    from dleaf.eval.chair_reference import reference_vocabulary

    tok = _CocoPieces()
    ids = list(range(len(tok.pieces)))
    got = [(first, last, m.category) for first, last, m in
           premise_check.mention_token_spans(tok, ids, reference_vocabulary())]
    assert got == [(1, 3, "hot dog"), (6, 8, "teddy bear"), (11, 11, "bus")]
    assert [j for j, _ in premise_check.mention_token_offsets(tok, ids, reference_vocabulary())] == [1, 6, 11]


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
    rows = premise_check.reply_records(model, processor, images, [prompt] * 3, replies, [s.objects for s in scenes],
                                       VOCAB, batch_size=2)["rows"]
    assert any(r["hallucinated"] for r in records) and not all(r["hallucinated"] for r in records)
    tok = processor.tokenizer
    want, share_sum, share_n = [], torch.zeros(model.config.text_config.num_hidden_layers, dtype=torch.float64), 0
    want_rows = []
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
        seen = 0
        for j, w in enumerate(words):
            kind = "other"
            if w in world.THEME_OF:
                want.append({"sample": i, "word": w, "hallucinated": w not in scenes[i].object_set,
                             "liae": per_row[j][0], "mass": per_row[j][1]})
                kind = "hallucinated" if w not in scenes[i].object_set else "grounded"
            want_rows.append((i, j, kind, 1 + seen, per_row[j]))
            seen += kind != "other"
    assert len(records) == len(want) > 3
    for got, ref in zip(records, want):
        assert (got["sample"], got["word"], got["hallucinated"]) == (ref["sample"], ref["word"], ref["hallucinated"])
        assert got["liae"] == pytest.approx(ref["liae"], rel=1e-4, abs=1e-5)
        assert got["mass"] == pytest.approx(ref["mass"], rel=1e-4, abs=1e-6)
    assert share == pytest.approx((share_sum / share_n).tolist(), rel=1e-4, abs=1e-6)
    # every reply row, with its kind, position and mention ordinal
    assert len(rows["kind"]) == len(want_rows) and "hallucinated" in rows["kind"]
    for k, (i, j, kind, ordinal, (liae, mass)) in enumerate(want_rows):
        assert (rows["sample"][k], rows["position"][k], rows["kind"][k], rows["ordinal"][k]) == (i, j, kind, ordinal)
        assert rows["liae"][k] == pytest.approx(liae, rel=1e-4, abs=1e-5)
        assert rows["mass"][k] == pytest.approx(mass, rel=1e-4, abs=1e-6)
    assert premise_check.row_counts(rows)["hallucinated"] == sum(r["hallucinated"] for r in records)
    action = premise_check.actionability_rows(rows, 3, n_bootstrap=50)
    assert {(r["comparison"], r["signal"]) for r in action} == {
        (c, s) for c in ("all", "grounded", "non_object") for s in premise_check.SIGNALS}
    assert premise_check.actionability_rows({k: [] for k in premise_check.ROW_FIELDS}, 0) == []
    # by error kind: the hallucinated rows of the other kinds are left out, every other row stays
    kinds = set(r for r, k in zip(rows["error"], rows["kind"]) if k == "hallucinated")
    assert kinds and all(e is None for e, k in zip(rows["error"], rows["kind"]) if k != "hallucinated")
    only = premise_check.rows_of_error(rows, next(iter(kinds)))
    assert only["kind"].count("hallucinated") == rows["kind"].count("hallucinated")  # one kind here
    none = premise_check.rows_of_error(rows, next(k for k in premise_check.ERROR_KINDS if k not in kinds))
    assert "hallucinated" not in none["kind"] and len(none["kind"]) == len(rows["kind"]) - rows["kind"].count(
        "hallucinated")
    assert premise_check.actionability_rows(none, 3) == [] == premise_check.position_rows(none, 3)
    with pytest.raises(ValueError, match="unknown error kind"):
        premise_check.rows_of_error(rows, "omission")
    rows = premise_check.premise_rows(records, n_bootstrap=100)
    assert {(r.signal, r.layer) for r in rows} == {(s, l) for s in premise_check.SIGNALS for l in range(3)}
    assert premise_check.premise_rows([]) == []


@torch.no_grad()
def test_first_token_records_read_the_row_that_predicts_the_first_token(tiny):
    model, processor = tiny
    scenes = world.scenes("adversarial", 3)
    prompts = [f"is there a {s.objects[0]} in the image ?" for s in scenes]
    replies = ["yes , there is a fork .", "no , there is no cow .", "there might be"]
    images = [world.render(s) for s in scenes]
    recs = premise_check.first_token_records(model, processor, images, prompts, replies, [True, True, False],
                                             batch_size=2)
    assert [(r["sample"], r["label"], r["answer"], r["first_token"]) for r in recs] == [
        (0, True, True, "yes"), (1, True, False, "no"), (2, False, None, "there")]
    for prompt, image, reply, rec in zip(prompts, images, replies, recs):
        # brute force, one question alone: the prompt's last row predicts the reply's first token
        ids = models.model_inputs(processor, [prompt], [image])
        img = [k for k, t in enumerate(ids["input_ids"][0].tolist()) if t == model.config.image_token_id]
        res = model(**ids, output_attentions=True)
        liae, mass = [], []
        for att in res.attentions:
            row = att[0, :, -1].double()
            masses = row[:, img].sum(-1)
            mixed = (row[:, img] / masses[:, None]).mean(0)
            liae.append(float(-(mixed * mixed.log()).sum()))
            mass.append(float(masses.mean()))
        assert rec["liae"] == pytest.approx(liae, rel=1e-4, abs=1e-5)
        assert rec["mass"] == pytest.approx(mass, rel=1e-4, abs=1e-6)


def test_first_token_rows_set_wrong_against_right_answers():
    from sklearn.metrics import roc_auc_score

    recs = [{"label": lab, "answer": ans, "liae": [v, -v], "mass": [v, 0.5 * v]}
            for lab, ans, v in [(True, True, 0.1), (True, False, 0.9), (False, False, 0.3), (False, True, 0.7),
                                (True, True, 0.2), (False, False, 0.4), (True, None, 5.0), (False, True, 0.6),
                                (True, True, 0.35)]]
    rows = {(r["subset"], r["signal"], r["layer"]): r for r in premise_check.first_token_rows(recs, n_bootstrap=50)}
    parsed = [r for r in recs if r["answer"] is not None]  # the unparsed answer (liae 5.0) is left out
    wrong = [r["answer"] != r["label"] for r in parsed]
    v = [r["liae"][0] for r in parsed]
    assert rows["all", "liae", 0]["auroc"] == pytest.approx(roc_auc_score(wrong, v))
    assert rows["all", "image_mass_deficit", 1]["auroc"] == pytest.approx(roc_auc_score(wrong, [-0.5 * x for x in v]))
    assert (rows["all", "liae", 0]["n_wrong"], rows["all", "liae", 0]["n_right"]) == (3, 5)
    # absent objects: the wrong answers are the yes answers (0.7 and 0.6 against 0.3 and 0.4) -> AUROC 1
    assert rows["absent", "liae", 0]["auroc"] == 1.0 and rows["absent", "liae", 1]["auroc"] == 0.0
    assert (rows["present", "liae", 0]["n_wrong"], rows["present", "liae", 0]["n_right"]) == (1, 3)
    assert premise_check.first_token_rows([dict(recs[6])]) == []


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
    assert premise_check.check_run({**greedy, "benchmark": "organism_pope"}) == "organism"  # first-token tables


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
    assert sum(sec["row_counts"].values()) > sec["n_mentions"] == sec["row_counts"]["hallucinated"] + \
        sec["row_counts"]["grounded"]
    if sec["n_hallucinated"]:
        assert {r["comparison"] for r in sec["actionability"]} == {"all", "grounded", "non_object"}
        assert len(sec["position"]) == len(sec["actionability"]) == 3 * 2 * 3  # comparisons x signals x layers
    assert set(sec["by_error"]) == {"addition", "substitution"}
    md = (tmp_path / "out" / "premise.md").read_text()
    assert "### Actionability" in md and "### Position held fixed" in md and "**What a flag sees.**" in md
    assert "### Additions alone" in md
    # a yes/no run: the first-token tables
    pope = ["--benchmark", "organism_pope", "--model", str(tmp_path / "m"), "--splits", "adversarial",
            "--negatives", "adversarial", "--limit", "4", "--no_progress", "--max_new_tokens", "4"]
    assert cli.main(evaluate, pope + ["--output_dir", str(tmp_path / "pope")]) == 0
    assert cli.main(check, ["--run_dir", str(tmp_path / "pope"), "--n_bootstrap", "20"]) == 0
    data = loads_strict((tmp_path / "pope" / "premise.json").read_text())
    sec = data["sections"]["adversarial/adversarial"]
    assert sec["n_items"] == 8 and len(sec["records"]) == 8
    assert all(r["liae"] is not None and len(r["liae"]) == 3 for r in sec["records"])
    assert "**Yes/no answers at their first token.**" in (tmp_path / "pope" / "premise.md").read_text()
    # a D-LEAF run and another model are refused before anything loads
    assert cli.main(evaluate, common + ["--output_dir", str(tmp_path / "d"), "--method", "dleaf"]) == 0
    capsys.readouterr()
    assert cli.main(check, ["--run_dir", str(tmp_path / "d")]) == 2
    assert "only applies to greedy runs" in capsys.readouterr().err
    assert cli.main(check, ["--run_dir", str(tmp_path / "run"), "--model", "organism_control"]) == 2
    assert "would measure another model" in capsys.readouterr().err
    assert cli.main(check, ["--run_dir", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
