import pytest
import torch

from dleaf import metrics, premise_check
from dleaf.organism import world
from dleaf.organism.chat import user_turn
from dleaf.organism.profile import VOCAB, _prompt_batch, object_word_attention


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
def test_premise_records_equal_the_output_attentions_computation(tiny):
    model, processor = tiny
    scenes = world.scenes("adversarial", 4)
    replies = [world.describe(s, seed=i) for i, s in enumerate(scenes)]
    partner = [next(iter(world.PARTNERS[s.objects[0]])) for s in scenes]
    replies[1] = replies[1] + f" there is also a {partner[1]} ."  # a hallucinated partner
    prompt = world.CAPTION_PROMPTS[0]
    records = premise_check.premise_records(model, processor, [world.render(s) for s in scenes], [prompt] * 4,
                                            replies, [s.objects for s in scenes], VOCAB, chat=user_turn,
                                            batch_size=3)
    # independent computation: full attention matrices from output_attentions on prompt + reply + </s>
    tok = processor.tokenizer
    batch = _prompt_batch(processor, scenes, [prompt] * 4)
    n = batch["input_ids"].shape[1]
    reply_ids = [tok(r + " </s>", add_special_tokens=False)["input_ids"] for r in replies]
    width = max(map(len, reply_ids))
    out = torch.full((4, n + width), tok.pad_token_id)
    out[:, :n] = batch["input_ids"]
    for i, r in enumerate(reply_ids):
        out[i, n:n + len(r)] = torch.tensor(r)
    want, _ = object_word_attention(model, processor, [(out, batch["pixel_values"])], lambda o: n, scenes)
    assert len(records) == len(want) > 4
    assert any(r["hallucinated"] for r in records) and not all(r["hallucinated"] for r in records)
    for got, ref in zip(records, want):
        assert (got["sample"], got["word"], got["hallucinated"]) == (ref["scene"], ref["word"], ref["hallucinated"])
        assert got["liae"] == pytest.approx(ref["liae"], rel=1e-4, abs=1e-5)
        assert got["mass"] == pytest.approx(ref["mass"], rel=1e-4, abs=1e-6)
    rows = premise_check.premise_rows(records, n_bootstrap=100)
    assert {(r.signal, r.layer) for r in rows} == {(s, l) for s in premise_check.SIGNALS for l in range(3)}


def test_mismatched_inputs_are_an_error(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="differ in length"):
        premise_check.premise_records(model, processor, [None], ["a", "b"], ["x"], [[]], VOCAB)


def test_premise_check_script_on_a_harness_run(tiny, tmp_path):
    import json
    import runpy
    from pathlib import Path

    model, processor = tiny
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    common = ["--benchmark", "organism_caption", "--model", str(tmp_path / "m"), "--splits", "adversarial",
              "--limit", "3", "--progress", "false"]
    runpy.run_path(str(scripts / "evaluate.py"), run_name="x")["main"](
        common + ["--max_new_tokens", "30", "--output_dir", str(tmp_path / "run")])
    runpy.run_path(str(scripts / "premise_check.py"), run_name="x")["main"](
        common + ["--run_dir", str(tmp_path / "run"), "--n_bootstrap", "50"])
    data = json.loads((tmp_path / "run" / "premise.json").read_text())
    assert data["n_items"] == 3 and data["n_mentions"] == len(data["records"]) > 0
    assert (tmp_path / "run" / "premise.md").is_file()
