"""Tests for the harness's file benchmarks: COCO CHAIR (the project's rules, ``chair_rules: dleaf``) and POPE question
files against hand-computed values, their bad input (CHAIR's reference rules are checked against the reference
scripts' own outputs in tests/test_chair_reference.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dleaf import eval as ev
from dleaf.eval import coco, pope
from dleaf.resources import data_root

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_organism):
    return tiny_organism


# ----------------------------------------------------------------------------------------------------------------
# COCO CHAIR on a hand-made fixture
# ----------------------------------------------------------------------------------------------------------------
# Hand count under the project's rules (chair_rules dleaf: longest phrase first, every mention counted):
#   image 1, GT {dog, dining table} + captions {dog, dining table, person}:
#     "Two dogs and a puppy sit near a table. A woman holds a knife. The dogs look happy and the dog is sleeping."
#     mentions dogs puppy table woman knife dogs dog (7); objects {dog, dining table, person, knife}; H = {knife}
#     -> 1 hallucinated mention; words 9 + 5 + 9 = 23
#   image 2, GT {teddy bear} + captions {teddy bear, bed}:
#     "A teddy bear and two bears next to teddy bears."  mentions "teddy bear", "bears", "teddy bears" (3);
#     objects {teddy bear, bear}; H = {bear}; 1 hallucinated mention; grounded 1 of 2; words 10
#   image 3, GT {hot dog, cup} + captions {hot dog, cup}:
#     "A hot dog with ketchup."  mentions "hot dog" (1), no dog; grounded 1 of 2; words 5
GENERATED = {
    "val2014/1": "Two dogs and a puppy sit near a table. A woman holds a knife. The dogs look happy and the dog is "
                 "sleeping.",
    "val2014/2": "A teddy bear and two bears next to teddy bears.",
    "val2014/3": "A hot dog with ketchup.",
}


def test_coco_chair_on_hand_made_fixture(tmp_path, write_coco):
    img_dir, inst, caps = write_coco(tmp_path)
    protocol = ev.load_protocol("coco_chair")
    bench = coco.coco_chair_benchmark(protocol, img_dir, inst, caps, image_ids=[1, 2, 3], chair_rules="dleaf")
    assert [it.truth for it in bench.items] == [{"dog", "dining table", "person"}, {"teddy bear", "bed"},
                                                {"hot dog", "cup"}]
    rows = [{"id": k, "text": v} for k, v in GENERATED.items()]
    m = ev.compute_metrics(bench, rows)["val2014"]
    assert m["n_mentions"] == 11
    assert m["n_hallucinated_mentions"] == 2
    assert m["chair_i"] == pytest.approx(2 / 11)
    assert m["chair_i_unique"] == pytest.approx(2 / 7)
    assert m["chair_s"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(5 / 7)
    assert m["mean_length"] == pytest.approx(38 / 3)
    assert m["n_hallucinated_objects"] == 2 and m["n_grounded_objects"] == 5
    # ground truth from instances alone: "woman" (person) becomes a hallucination in caption 1
    ann = coco.load_coco_annotations(inst, None, bench.vocab)
    assert ann.ground_truth(1, ("instances",)) == {"dog", "dining table"}


def test_coco_vocabulary_synonyms_plurals_and_double_words():
    vocab = coco.coco_vocabulary()
    assert len(vocab.categories) == 80
    cats = lambda text: [(m.surface, m.category) for m in vocab.extract(text)]  # noqa: E731
    assert cats("two hot dogs beside three dogs") == [("hot dogs", "hot dog"), ("dogs", "dog")]
    assert cats("teddy bears and a polar bear") == [("teddy bears", "teddy bear"), ("polar bear", "bear")]
    assert cats("men, women and children with knives") == [
        ("men", "person"), ("women", "person"), ("children", "person"), ("knives", "knife")]
    assert cats("two glasses of wine, some buses, a microwave oven, ponies, sheep") == [
        ("glasses of wine", "wine glass"), ("buses", "bus"), ("microwave oven", "microwave"),
        ("ponies", "horse"), ("sheep", "sheep")]
    assert cats("a toilet bowl and a motor bike") == [("toilet bowl", "toilet"), ("motor bike", "motorcycle")]
    assert coco.plural_forms("sandwich") == ["sandwiches"] and coco.plural_forms("boy") == ["boys"]
    assert coco.plural_forms("sheep", same=["sheep"]) == []


def test_coco_chair_end_to_end_and_bad_input(tmp_path, tiny, write_coco):
    model, processor = tiny
    img_dir, inst, caps = write_coco(tmp_path)
    ids_protocol = tmp_path / "coco_fixture.yaml"
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# fixture ids\n3\n1\n")
    text = (ROOT / "data/protocols/coco_chair.yaml").read_text().replace(
        "file: coco/chair_val2014_ids.txt", f"file: {os.path.relpath(ids_file, data_root())}")
    ids_protocol.write_text(text)
    args = ev.EvalArguments(benchmark="coco_chair", protocol=str(ids_protocol), output_dir=str(tmp_path / "run"),
                            coco_images=str(img_dir), coco_instances=str(inst), coco_captions=str(caps),
                            max_new_tokens=5, progress=False)
    res = ev.run_evaluation(args, model, processor)
    assert res["sections"]["val2014"]["n_captions"] == 2
    assert res["run"]["inputs"]["image_ids"] == "file"
    lines = (tmp_path / "run" / ev.GENERATIONS).read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["val2014/3", "val2014/1"]

    # a missing image: the error names it
    (img_dir / "COCO_val2014_000000000003.jpg").unlink()
    with pytest.raises(ev.EvaluationInputError, match="COCO_val2014_000000000003.jpg"):
        ev.build_benchmark(args)
    # malformed annotation file: file and line
    bad = tmp_path / "bad_instances.json"
    bad.write_text('{\n  "images": [\n    {"id": 1,}\n  ]\n}\n')
    with pytest.raises(ev.EvaluationInputError, match=r"bad_instances\.json.*line 3"):
        coco.load_coco_annotations(bad, None, coco.coco_vocabulary())
    with pytest.raises(ev.EvaluationInputError, match="not found.*nowhere.json"):
        coco.load_coco_annotations(tmp_path / "nowhere.json", None, coco.coco_vocabulary())
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "unicorn"}]}))
    with pytest.raises(ev.EvaluationInputError, match="unicorn"):
        coco.load_coco_annotations(bad, None, coco.coco_vocabulary())
    ids_file.write_text("3\nseven\n")
    with pytest.raises(ev.EvaluationInputError, match=r"ids\.txt, line 2"):
        coco.read_id_list(ids_file)


def test_coco_id_rule_is_deterministic(tmp_path, write_coco):
    _, inst, _ = write_coco(tmp_path, with_images=False)
    ann = coco.load_coco_annotations(inst, None, coco.coco_vocabulary())
    assert coco.select_coco_ids(ann, 2, 0) == coco.select_coco_ids(ann, 2, 0)
    assert sorted(coco.select_coco_ids(ann, 5, 1)) == [1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# POPE from files
# ----------------------------------------------------------------------------------------------------------------


def test_pope_file_metrics_with_free_form_answers(tmp_path, write_pope):
    path, img_dir = write_pope(tmp_path)
    bench = pope.pope_file_benchmark(ev.load_protocol("pope_file"), [path], img_dir, answer_rule="dleaf")
    assert bench.sections == ["coco_pope_random"]
    assert bench.items[0].prompt == "Is there a dog in the image?"
    answers = ["Yes, there is a dog.",            # present, yes  -> tp
               "There is no cat in the image.",   # absent, no    -> tn
               "I don't see a car.",              # present, no   -> fn   (official rule: "don't" is no "not": tp)
               "Yes.",                            # absent, yes   -> fp
               "I think so, yes",                 # present, yes  -> tp
               "Hmm, hard to tell"]               # absent, unparsed      (official rule: no negative word: fp)
    rows = [{"id": it.id, "text": a} for it, a in zip(bench.items, answers)]
    m = ev.compute_metrics(bench, rows)["coco_pope_random"]
    assert (m["answer_rule"], m["tp"], m["fp"], m["tn"], m["fn"], m["n_unparsed"]) == ("dleaf", 2, 1, 1, 1, 1)
    assert [m[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == pytest.approx(
        [3 / 6, 2 / 3, 2 / 3, 4 / 6, 3 / 6])
    # the protocol's default, the official rule: tp 3, fp 2, tn 1, fn 0, nothing unparsed
    o = ev.compute_metrics(pope.pope_file_benchmark(ev.load_protocol("pope_file"), [path], img_dir), rows)
    o = o["coco_pope_random"]
    assert (o["answer_rule"], o["tp"], o["fp"], o["tn"], o["fn"], o["n_unparsed"]) == ("pope_official", 3, 2, 1, 0, 0)
    assert m["pope_official"] == {k: o[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}


def test_pope_file_bad_input(tmp_path, write_pope):
    path, img_dir = write_pope(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + '{"question_id": 3, "image": "b.jpg", \n' + "".join(lines[3:]))
    with pytest.raises(ev.EvaluationInputError, match=r"coco_pope_random\.json, line 3"):
        pope.read_pope_file(path)
    path.write_text("".join(lines[:3]) + json.dumps({"question_id": 9, "image": "b.jpg", "text": "?"}) + "\n")
    with pytest.raises(ev.EvaluationInputError, match=r"line 4: lacks label"):
        pope.read_pope_file(path)
    path.write_text("".join(lines))
    (img_dir / "b.jpg").unlink()
    with pytest.raises(ev.EvaluationInputError, match="b.jpg"):
        pope.pope_file_benchmark(ev.load_protocol("pope_file"), [path], img_dir)
