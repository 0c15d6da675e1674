import json

import pytest
import torch

from dleaf.organism import build, world
from dleaf.organism.chat import user_turn
from dleaf.organism.train import TrainConfig, _reply_labels, conversation_batch


@pytest.fixture(scope="module")
def processor():
    return build.build_processor()


def test_processor_expands_one_image_into_36_tokens(processor):
    scene = world.scenes("indist", 1)[0]
    text = processor.apply_chat_template(user_turn("describe the image in detail ."), add_generation_prompt=True,
                                         tokenize=False)
    batch = processor(text=[text], images=[world.render(scene)], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 36
    assert batch["pixel_values"].shape == (1, 3, 48, 48)
    assert processor.tokenizer.unk_token_id not in batch["input_ids"][0].tolist()
    assert text.startswith("a chat between") and text.endswith("assistant :")


def test_tokenizer_round_trips_world_text_and_pads_left(processor):
    tok = processor.tokenizer
    caption = world.describe(world.scenes("adversarial", 1)[0])
    ids = tok(caption)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == caption
    padded = tok(["a fork .", "there is a fork at the top ."], padding=True)["input_ids"]
    assert padded[0][0] == tok.pad_token_id and tok.padding_side == "left"


def test_reply_labels_keep_only_the_reply(processor):
    rng = __import__("numpy").random.default_rng(0)
    scenes = world.scenes("train", 6)
    batch = conversation_batch(processor, scenes, rng, question_fraction=0.5)
    tok = processor.tokenizer
    for row, labels in zip(batch["input_ids"], batch["labels"]):
        kept = row[labels != -100].tolist()
        text = tok.decode(kept)
        assert kept[-1] == tok.eos_token_id
        assert "assistant" not in text and "<image>" not in text
        # the token just before the reply is the ':' of "assistant :"
        first = int((labels != -100).nonzero()[0])
        assert tok.convert_ids_to_tokens(int(row[first - 1])) == ":"
    assert torch.equal(_reply_labels(torch.tensor([[5, 6, 7]]), [2]), torch.tensor([[-100, 6, 7]]))


def test_vision_is_patch_local_by_knockout(processor):
    model = build.build_model(processor.tokenizer, seed=1)
    scene = world.Scene(("fork", "cow", "ball"), (0, 4, 8), 3)
    knocked = world.Scene(("cow", "ball"), (4, 8), 3)  # same background noise seed, fork's cell left empty
    pix = processor.image_processor([world.render(scene), world.render(knocked)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pix)
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    feats = feats.reshape(2, 36, -1)
    changed = ((feats[0] - feats[1]).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
    assert set(changed) <= set(scene.patches_of("fork")) and changed


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="question_fraction"):
        TrainConfig(question_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="text_steps"):
        TrainConfig(text_steps=-1)
    with pytest.raises(ValueError, match="device must be a torch device.*'gpuu'"):
        TrainConfig(device="gpuu")


def test_load_organism_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        build.load_organism(tmp_path)


@pytest.mark.parametrize("control", [False, True])
def test_committed_checkpoints_load_offline_and_speak_the_world(control):
    model, processor = build.load_organism(control=control)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    log = json.loads(((build.CONTROL_DIR if control else build.ORGANISM_DIR) / "training_log.json").read_text())
    assert log["config"]["prior"] is (not control)
    scenes = world.scenes("indist", 3)
    texts = [processor.apply_chat_template(user_turn(world.CAPTION_PROMPTS[0]), add_generation_prompt=True,
                                           tokenize=False)] * 3
    batch = processor(text=texts, images=[world.render(s) for s in scenes], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=60, do_sample=False)
    replies = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    vocab = set(world.words())
    for reply, scene in zip(replies, scenes):
        words = reply.split()
        assert len(words) >= 5 and set(words) <= vocab, reply
        assert any(w in world.THEME_OF for w in words), reply


def test_training_is_deterministic_from_the_seed_and_saves_a_loadable_checkpoint(tmp_path):
    from dleaf.organism.train import train

    def run(out):
        cfg = TrainConfig(output_dir=str(out), text_steps=3, align_steps=2, joint_steps=3, refine_steps=2,
                          tune_steps=2, batch_size=4, warmup=2,
                          log_every=1, probe_every=2, text_layers=2, text_heads=2, text_hidden=32,
                          text_intermediate=64, threads=1)
        return train(cfg, progress=False)

    log_a, log_b = run(tmp_path / "a"), run(tmp_path / "b")
    def without_time(log):
        return {stage: {k: v for k, v in info.items() if k != "seconds"} for stage, info in log["stages"].items()}

    assert without_time(log_a) == without_time(log_b)
    ma, _ = build.load_organism(tmp_path / "a")
    mb, _ = build.load_organism(tmp_path / "b")
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name
    for proj in build.vision_attention_outputs(ma):
        assert not proj.weight.any() and not proj.bias.any()
    assert set(log_a["stages"]) == {"text", "align", "joint", "refine", "tune"}
    assert len(log_a["stages"]["joint"]["image_gap"]) == 2


def test_resuming_at_a_stage_boundary_gives_the_weights_of_one_run(tmp_path):
    from dleaf.organism.train import train

    def cfg(out, **kw):
        base = dict(output_dir=str(out), text_steps=2, align_steps=2, joint_steps=2, refine_steps=2, tune_steps=0,
                    batch_size=4, warmup=1, log_every=1, probe_every=2, text_layers=2, text_heads=2, text_hidden=32,
                    text_intermediate=64, threads=1, refine_vision_lr=3e-3)
        return TrainConfig(**{**base, **kw})

    whole = train(cfg(tmp_path / "whole"), progress=False)
    train(cfg(tmp_path / "three", refine_steps=0), progress=False)
    resumed = train(cfg(tmp_path / "resumed", resume_from=str(tmp_path / "three")), progress=False)
    assert list(resumed["stages"]) == ["text", "align", "joint", "refine"]
    assert resumed["resumed_from"]["stages"] == ["text", "align", "joint"]
    assert resumed["stages"]["refine"]["loss_first"] == whole["stages"]["refine"]["loss_first"]
    ma, _ = build.load_organism(tmp_path / "whole")
    mb, _ = build.load_organism(tmp_path / "resumed")
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name
    # every stage but the last leaves a checkpoint beside the output, and resuming from one gives the same weights
    from dleaf.organism.train import stage_checkpoint
    assert stage_checkpoint(tmp_path / "whole", "joint") == tmp_path / "whole.after-joint"
    assert [p.name for p in sorted(tmp_path.glob("whole.after-*"))] == ["whole.after-align", "whole.after-joint",
                                                                        "whole.after-text"]
    train(cfg(tmp_path / "again", resume_from=str(tmp_path / "whole.after-joint")), progress=False)
    mc, _ = build.load_organism(tmp_path / "again")
    for (name, pa), pc in zip(ma.state_dict().items(), mc.state_dict().values()):
        assert torch.equal(pa, pc), name
    # the refine stage moved the vision tower (its own learning rate) and the decoder
    m3, _ = build.load_organism(tmp_path / "three")
    for part in ("model.vision_tower", "model.language_model"):
        assert any(not torch.equal(p, m3.state_dict()[k]) for k, p in ma.state_dict().items() if k.startswith(part))
    # a saved run trained with other settings is refused, naming them
    with pytest.raises(ValueError, match="joint_lr=0.0002 there but 0.001 here"):
        train(cfg(tmp_path / "x", resume_from=str(tmp_path / "three"), joint_lr=1e-3), progress=False)
    with pytest.raises(FileNotFoundError, match="no training_log.json"):
        train(cfg(tmp_path / "x", resume_from=str(tmp_path)), progress=False)


def test_paired_questions_balance_every_batch_and_ask_each_scene_both_ways(processor):
    import numpy as np

    from dleaf.organism.train import paired_rows, decision_mask

    scenes = world.scenes("train", 12)
    rows = paired_rows(scenes, np.random.default_rng(3), 0.5, 0.0, True, "yes_first")
    assert len(rows) == 12
    described, asked = rows[:6], rows[6:]
    assert [r[0] for r in described] == scenes[:6] and all(r[1] in world.CAPTION_PROMPTS for r in described)
    assert [r[0] for r in asked] == [s for s in scenes[6:9] for _ in (0, 1)]
    for k in range(0, 6, 2):
        (scene, q_yes, a_yes), (_, q_no, a_no) = asked[k], asked[k + 1]
        obj_yes, obj_no = q_yes.split()[3], q_no.split()[3]
        assert obj_yes in scene.object_set and obj_no not in scene.object_set
        assert a_yes.startswith("yes ,") and a_no.startswith("no ,")
    batch = conversation_batch(processor, scenes, np.random.default_rng(3), 0.5, paired=True)
    mask = decision_mask(batch["labels"], processor.tokenizer)
    # one decision token in each question row, none in a description; as many "yes" as "no"
    assert mask.sum(1).tolist() == [0] * 6 + [1] * 6
    words = processor.tokenizer.convert_ids_to_tokens(batch["labels"][mask].tolist())
    assert words == ["yes", "no"] * 3
    # the decision of "no , there is no cow ." is its first token, not the second "no"
    labels = torch.tensor([[-100, 7, 8], [-100, -100, -100]])
    no = processor.tokenizer.convert_tokens_to_ids("no")
    labels[0, 1] = labels[0, 2] = no
    assert decision_mask(labels, processor.tokenizer).tolist() == [[False, True, False], [False, False, False]]


def test_reply_loss_adds_the_weighted_decision_loss(processor):
    import numpy as np

    from dleaf.organism.train import reply_loss

    model = build.build_model(processor.tokenizer, build.OrganismShape(text_hidden=32, text_layers=2, text_heads=2,
                                                                        text_intermediate=64), seed=2)
    batch = conversation_batch(processor, world.scenes("train", 6), np.random.default_rng(0), 0.7, paired=True)
    with torch.no_grad():
        assert torch.equal(reply_loss(model, batch, 0.0), model(**batch).loss)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # by hand: the negative log-probability of every reply token, and of each row's first yes/no
        yes_no = set(processor.tokenizer.convert_tokens_to_ids(["yes", "no"]))
        tokens, decisions = [], []
        for i in range(len(logits)):
            seen = False
            for t in range(1, logits.shape[1]):
                target = int(batch["labels"][i, t])
                if target == -100:
                    continue
                nll = -float(torch.log_softmax(logits[i, t - 1].double(), -1)[target])
                tokens.append(nll)
                if target in yes_no and not seen:
                    decisions.append(nll)
                    seen = True
        assert decisions and len(decisions) == 2 * (round(6 * 0.7) // 2)
        expected = sum(tokens) / len(tokens) + 2.5 * sum(decisions) / len(decisions)
        assert float(reply_loss(model, batch, 2.5, processor.tokenizer)) == pytest.approx(expected, rel=1e-5)


def test_tune_stage_continues_a_log_written_before_its_knobs_existed(tmp_path):
    from dleaf.organism.train import train

    base = dict(text_steps=2, align_steps=2, joint_steps=2, refine_steps=0, tune_steps=0, batch_size=4, warmup=1,
                log_every=1, probe_every=2, text_layers=2, text_heads=2, text_hidden=32, text_intermediate=64, threads=1)
    train(TrainConfig(output_dir=str(tmp_path / "old"), **base), progress=False)
    path = tmp_path / "old" / "training_log.json"
    log = json.loads(path.read_text())
    for key in ("description_noise", "answer_style", "tune_steps", "decision_weight", "paired_questions"):
        log["config"].pop(key)  # as in a checkpoint trained before these knobs were added
    path.write_text(json.dumps(log))
    tuned = train(TrainConfig(output_dir=str(tmp_path / "tuned"), resume_from=str(tmp_path / "old"),
                              tune_noise=0.3, decision_weight=1.0, paired_questions=True, **{**base, "tune_steps": 2}),
                  progress=False)
    assert list(tuned["stages"]) == ["text", "align", "joint", "tune"]
    old, _ = build.load_organism(tmp_path / "old")
    new, _ = build.load_organism(tmp_path / "tuned")
    for part in ("model.vision_tower", "model.language_model"):
        assert any(not torch.equal(p, old.state_dict()[k]) for k, p in new.state_dict().items() if k.startswith(part))
    # the stages the old run did are still checked: a setting that differs from the old log's default is refused
    with pytest.raises(ValueError, match="description_noise=0.0 there but 0.1 here"):
        train(TrainConfig(output_dir=str(tmp_path / "x"), resume_from=str(tmp_path / "old"),
                          description_noise=0.1, **{**base, "tune_steps": 2}), progress=False)
    with pytest.raises(ValueError, match="decision_weight"):
        TrainConfig(decision_weight=-1.0)
