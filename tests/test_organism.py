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
        cfg = TrainConfig(output_dir=str(out), text_steps=3, align_steps=2, joint_steps=3, refine_steps=2, batch_size=4, warmup=2,
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
    assert set(log_a["stages"]) == {"text", "align", "joint", "refine"}
    assert len(log_a["stages"]["joint"]["image_gap"]) == 2


def test_resuming_at_a_stage_boundary_gives_the_weights_of_one_run(tmp_path):
    from dleaf.organism.train import train

    def cfg(out, **kw):
        base = dict(output_dir=str(out), text_steps=2, align_steps=2, joint_steps=2, refine_steps=2, batch_size=4,
                    warmup=1, log_every=1, probe_every=2, text_layers=2, text_heads=2, text_hidden=32,
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
