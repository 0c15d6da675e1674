"""dpo_link.pairs: the organism's ground-truth pairs against the world, its held-out stream, and self-generated
pairs decoded with each decoder's own method."""

import numpy as np
import pytest
import torch

from dleaf import engine, generation, metrics
from dleaf.organism import world
from dleaf.organism.profile import VOCAB
from dpo_link import data, pairs, validate
from dleaf.settings import Setting
from dpo_link.train import ScriptArguments, build_datasets, self_generated_settings


def test_ground_truth_pairs_against_the_world(small_pairs):
    captions = questions = 0
    for row in small_pairs:
        scene = world.sample_scene(row["scene_seed"], row["scene_kind"])
        assert list(scene.objects) == row["objects"]
        assert list(row["images"][0].getdata()) == list(world.render(scene).getdata())
        assert row["prompt"][0]["content"][0]["type"] == "image"
        chosen, rejected = data.message_text(row["chosen"]), data.message_text(row["rejected"])
        assert chosen != rejected
        if row["task"] == "question":
            questions += 1
            obj = row["prompt"][0]["content"][1]["text"].split()[3]
            assert chosen == world.answer(scene, obj)
            assert metrics.parse_yes_no(rejected) is (obj not in scene.object_set)
            continue
        captions += 1
        injected = set(row["injected"])
        ch = metrics.chair([chosen, rejected], [scene.object_set] * 2, VOCAB).per_caption
        assert ch[0].mentioned == scene.object_set and not ch[0].hallucinated  # faithful and complete
        assert ch[1].hallucinated == injected and ch[1].mentioned == scene.object_set | injected
        assert 1 <= len(injected) <= 2 and row["rejected_hallucinations"] == len(injected)
        partners = set(pairs.absent_partners(scene))
        if partners:  # the prior's objects: absent partners of present objects
            assert injected <= partners
        # rejected = chosen plus one sentence per injected object, in canonical order
        kept = [s for s in pairs.description_sentences(rejected) if not any(o in s.split() for o in injected)]
        assert " ".join(kept) == chosen
        named = [w for w in rejected.split() if w in world.THEME_OF]
        assert named == sorted(named, key=world.OBJECTS.index)
    assert captions > 10 and questions > 5
    kinds = set(small_pairs["scene_kind"])
    assert kinds == {"adversarial", "train"}


def test_pairs_are_deterministic_and_never_share_evaluation_scenes():
    cfg = pairs.OrganismPairConfig(n=12)
    a, b = pairs.organism_examples(cfg), pairs.organism_examples(cfg)
    assert [r["chosen"] for r in a] == [r["chosen"] for r in b]
    eval_seeds = {s.seed for split in ("indist", "adversarial", "replication") for s in world.scenes(split, 2000)}
    held_out = pairs.organism_examples(pairs.OrganismPairConfig(n=12, world_seed=pairs.EVAL_WORLD_SEED))
    seeds = {r["scene_seed"] for r in a} | {r["scene_seed"] for r in held_out}
    assert not seeds & eval_seeds
    assert not {r["scene_seed"] for r in a} & {r["scene_seed"] for r in held_out}


def test_inject_objects_places_a_partner_after_its_partner():
    scene = world.Scene(("fork", "ball"), (0, 4), seed=5)
    desc = world.describe(scene)
    out = pairs.inject_objects(scene, desc, ["knife"], np.random.default_rng(0))
    words = [w for w in out.split() if w in world.THEME_OF]
    assert words == ["fork", "knife", "ball"]
    assert "there is also a knife" in out
    with pytest.raises(ValueError, match="is in the scene"):
        pairs.inject_objects(scene, desc, ["fork"], np.random.default_rng(0))


def test_held_out_rows_follow_the_run_record():
    rows, info = pairs.held_out_rows(5, {"data": {"eval": {"config": {"n": 200, "world_seed": 2,
                                                                       "question_fraction": 0.0}}}})
    assert len(rows) == 5 and info["config"]["n"] == 5 and info["config"]["question_fraction"] == 0.0
    assert all(r["task"] == "caption" for r in rows)
    default, _ = pairs.held_out_rows(5)
    expected = pairs.organism_examples(pairs.OrganismPairConfig(n=5, world_seed=pairs.EVAL_WORLD_SEED))
    assert [data.message_text(r["rejected"]) for r in default] == [data.message_text(r["rejected"]) for r in expected]
    images, prompts, objects = pairs.caption_items(3)
    scenes = world.scenes("adversarial", 3, 0)
    assert objects == [list(s.objects) for s in scenes] and prompts == [world.CAPTION_PROMPTS[0]] * 3
    assert list(images[0].getdata()) == list(world.render(scenes[0]).getdata())


def _fake_generation(monkeypatch, scenes, calls):
    """Replace the decoding by the world's own descriptions: faithful for D-LEAF, with an injected absent partner
    for greedy; record each decoding setting the pairs were asked for."""
    def fake(model, proc, prompts, images, setting, *a, **k):
        calls.append(setting)
        good = [world.describe(s) for s in scenes[:len(images)]]
        if setting.method == "dleaf":
            return good
        rng = np.random.default_rng(0)
        return [pairs.inject_objects(s, d, pairs.absent_partners(s)[:1], rng) for s, d in zip(scenes, good)]

    monkeypatch.setattr(generation, "generate_texts", fake)


def test_self_generated_pairs_rank_settings(monkeypatch, processor):
    scenes = pairs.adversarial_scenes(3)
    calls = []
    _fake_generation(monkeypatch, scenes, calls)
    rows = pairs.self_generated_pairs(torch.nn.Linear(1, 1), processor, scenes)
    assert [(s.method, s.label) for s in calls] == [("greedy", "greedy"), ("dleaf", "dleaf")]
    assert len(rows) == 3
    assert {r["chosen_source"] for r in rows} == {"dleaf"} and {r["rejected_source"] for r in rows} == {"greedy"}
    assert [r["chosen_hallucinations"] for r in rows] == [0, 0, 0]
    assert [r["rejected_hallucinations"] for r in rows] == [1, 1, 1]
    assert [data.message_text(r["chosen"]) for r in rows] == [world.describe(s) for s in scenes]
    assert [r["scene_seed"] for r in rows] == [s.seed for s in scenes]
    with pytest.raises(ValueError, match="distinct labels"):
        pairs.self_generated_pairs(torch.nn.Linear(1, 1), processor, scenes, [Setting(label="greedy")] * 2)


def test_self_generated_pairs_join_the_organism_data(monkeypatch, processor):
    calls = []
    _fake_generation(monkeypatch, pairs.adversarial_scenes(4, start=6), calls)
    args = ScriptArguments(n_train_pairs=6, n_eval_pairs=3, self_generated_scenes=4, dleaf_knobs=["gamma=0.7"])
    train, held_out, info = build_datasets(args, torch.nn.Linear(1, 1), processor)
    assert [(s.method, s.knob_dict) for s in calls] == [("greedy", {}), ("dleaf", {"gamma": 0.7})]
    assert len(train) == 10 and len(held_out) == 3
    assert sorted(train["source"]) == ["ground_truth"] * 6 + ["self_generated"] * 4
    assert info["self_generated"]["pairs"] == 4 and info["self_generated"]["settings"][1]["knobs"] == {"gamma": 0.7}
    assert [s.method for s in self_generated_settings(ScriptArguments())] == ["greedy", "dleaf"]
    assert [s.method for s in pairs.DEFAULT_SETTINGS] == ["greedy", "dleaf"]
    validate.validate_preference_dataset(train, processor, 256)


def test_self_generated_replies_are_decoded_with_their_settings(monkeypatch, processor, make_model):
    """Each row's chosen reply is what D-LEAF decodes (an independent decoding with D-LEAF attached gives the same
    text) and its rejected reply what plain greedy decodes, and they differ: a D-LEAF setting that silently fell
    back to greedy would give no pair. The counts are faked so that every D-LEAF reply ranks first."""
    model = make_model(processor, peaky=True)
    scenes = world.scenes("adversarial", 4, 0)
    knobs = {"gamma": 1.0, "localization": "everywhere"}
    order = iter([[(1, 0)] * 4, [(0, 0)] * 4])  # greedy's replies are counted first, then D-LEAF's
    monkeypatch.setattr(pairs, "hallucination_counts", lambda replies, sc: next(order))
    rows = pairs.self_generated_pairs(model, processor, scenes, (Setting(label="greedy"),
                                                                 Setting("dleaf", knobs, label="dleaf")),
                                      max_new_tokens=12)

    def independent(method):
        texts = [processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": world.CAPTION_PROMPTS[0]}]}], add_generation_prompt=True,
            tokenize=False) for _ in scenes]
        processor.tokenizer.padding_side = "left"
        batch = processor(text=texts, images=[world.render(s) for s in scenes], return_tensors="pt", padding=True)
        with torch.no_grad(), engine.attached(model, method, **(knobs if method else {})):
            out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        return [t.strip() for t in processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                                      skip_special_tokens=True)]

    dleaf, greedy = independent("dleaf"), independent(None)
    assert rows, "D-LEAF decoded exactly what greedy decoded on every scene"
    seeds = [s.seed for s in scenes]
    for r in rows:
        i = seeds.index(r["scene_seed"])
        assert data.message_text(r["chosen"]) == dleaf[i] and data.message_text(r["rejected"]) == greedy[i]
        assert (r["chosen_source"], r["rejected_source"]) == ("dleaf", "greedy")


def test_hallucination_counts_against_chair():
    scenes = world.scenes("adversarial", 3, 0)
    replies = [world.describe(scenes[0]), "there is a fork . there is a knife .", "nothing ."]
    expected = metrics.chair(replies, [s.object_set for s in scenes], VOCAB).per_caption
    assert pairs.hallucination_counts(replies, scenes) == [(len(c.hallucinated), len(c.mentioned - c.hallucinated))
                                                           for c in expected]
    assert pairs.hallucination_counts(replies[:1], scenes[:1]) == [(0, len(scenes[0].objects))]
