"""The organism's training recipes beyond the committed one: named presets, the vision tower's own attention,
finer patches, and mid-stage checkpoints that resume to the weights of an uninterrupted run."""

import json
import runpy
from pathlib import Path

import pytest
import torch

from dleaf.organism import build, world
from dleaf.organism.train import (PRESETS, TRAIN_STATE, TrainConfig, partial_checkpoint, preset_config,
                                  stage_checkpoint, train)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(text_steps=2, align_steps=2, joint_steps=5, refine_steps=0, tune_steps=0, batch_size=4, warmup=1,
            log_every=1, probe_every=2, text_layers=2, text_heads=2, text_hidden=32, text_intermediate=64,
            vision_hidden=16, vision_layers=1, vision_heads=2, threads=1)


def _parse(argv):
    return runpy.run_path(str(ROOT / "scripts" / "train_organism.py"), run_name="script")["parse_config"](argv)


def test_the_preset_replaces_defaults_and_explicit_flags_still_win():
    config, preset = _parse(["--preset", "llava_like", "--text_layers", "4", "--weight_decay", "0.05"])
    assert preset == "llava_like"
    assert (config.patch, config.vision_attention, config.text_hidden) == (4, True, 128)
    assert (config.text_layers, config.weight_decay) == (4, 0.05)  # given explicitly
    assert config.output_dir == PRESETS["llava_like"]["output_dir"]
    plain, none = _parse([])
    assert none is None and plain == TrainConfig()  # without a preset: the committed organism's recipe
    assert preset_config("llava_like", text_layers=4, weight_decay=0.05) == config
    with pytest.raises(ValueError, match="unknown preset 'llava'.*llava_like"):
        preset_config("llava")


def test_the_preset_builds_144_image_tokens_that_fit_the_context():
    shape = preset_config("llava_like").shape
    processor = build.build_processor(shape)
    assert shape.patch == 4 and shape.vision_attention
    assert processor.tokenizer.model_max_length == shape.max_positions == 320
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image in detail ."}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = processor(text=[text], images=[world.render(world.scenes("train", 1, 0)[0])], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids["input_ids"] == image_id).sum()) == 144
    # the prompt and the longest reply a caption protocol allows (64 new tokens) fit in the positions
    assert ids["input_ids"].shape[1] + 64 + 1 <= shape.max_positions


def test_max_positions_must_leave_room_for_the_image_tokens_and_a_reply():
    with pytest.raises(ValueError, match=r"144 image tokens \(patch 4\).*max_positions >= 264"):
        TrainConfig(patch=4, max_positions=256)
    TrainConfig(patch=4, max_positions=264)
    with pytest.raises(ValueError, match=r"144 image tokens"):  # the shape checks it, for any model built from it
        build.OrganismShape(patch=4)
    assert build.OrganismShape(patch=4, max_positions=264).n_image_tokens == 144
    with pytest.raises(ValueError, match="patch 3 must divide"):
        TrainConfig(patch=3)
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=-1)
    with pytest.raises(ValueError, match="vision_attention must be a bool"):
        build.OrganismShape(vision_attention=1)


def _image_features(model, processor, scenes):
    pix = processor.image_processor([world.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pix)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    return feats.reshape(len(scenes), -1, feats.shape[-1])


def test_with_vision_attention_every_image_token_reads_other_patches():
    shape = build.OrganismShape(patch=4, vision_attention=True, max_positions=320)
    processor = build.build_processor(shape)
    model = build.build_model(processor.tokenizer, shape, seed=1)
    scene = world.Scene(("fork", "cow", "ball"), (0, 4, 8), 3)
    knocked = world.Scene(("cow", "ball"), (4, 8), 3)  # the fork's cell left empty, same background
    feats = _image_features(model, processor, [scene, knocked])
    assert feats.shape[1] == 144
    change = (feats[0] - feats[1]).abs().amax(-1)
    own = set(scene.patches_of("fork", 4))
    assert len(own) == 16
    far = [i for i in range(144) if i not in own]
    # the knocked-out object's cell changes tokens far outside it (the patch-local organism changes none: see
    # test_organism.py), by a margin far above float32 rounding
    assert float(change[far].min()) > 1e-4
    assert all(proj.weight.abs().sum() > 0 for proj in build.vision_attention_outputs(model))


def test_training_keeps_the_vision_attention_trainable_when_it_is_on(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "va"), patch=4, vision_attention=True, max_positions=320,
                      **{**TINY, "joint_steps": 2})
    train(cfg, progress=False)
    model, _ = build.load_organism(tmp_path / "va")
    fresh = build.build_model(build.build_processor(cfg.shape).tokenizer, cfg.shape, seed=0)
    for trained, init in zip(build.vision_attention_outputs(model), build.vision_attention_outputs(fresh)):
        # not zeroed (as the patch-local organism's are) and moved from the initialisation by align and joint
        assert float(trained.weight.detach().abs().min()) > 0 and not torch.equal(trained.weight, init.weight)


def _same_weights(a, b):
    sa, sb = build.load_organism(a)[0].state_dict(), build.load_organism(b)[0].state_dict()
    assert list(sa) == list(sb)
    for name, p in sa.items():
        assert torch.equal(p, sb[name]), name


def test_a_mid_stage_checkpoint_resumes_to_the_weights_of_one_run(tmp_path):
    whole = train(TrainConfig(output_dir=str(tmp_path / "whole"), **TINY), progress=False)
    assert not partial_checkpoint(tmp_path / "whole").exists()  # a finished run leaves no partial checkpoint
    # a run stopped after 4 of the joint stage's 5 steps: its last mid-stage checkpoint is at step 2
    stopped = TrainConfig(output_dir=str(tmp_path / "stopped"), checkpoint_every=2, **TINY)
    import dleaf.organism.train as T

    real_save = T.save

    def save_then_stop(model, processor, out, log, train_state=None):
        real_save(model, processor, out, log, train_state)
        if (log.get("in_progress") or {}).get("step") == 4:  # killed right after the step-4 checkpoint
            raise KeyboardInterrupt

    T.save = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(stopped, progress=False)
    finally:
        T.save = real_save
    part = partial_checkpoint(tmp_path / "stopped")
    assert part == tmp_path / "stopped.partial" and (part / TRAIN_STATE).is_file()
    log = json.loads((part / "training_log.json").read_text())
    assert log["in_progress"]["stage"] == "joint" and log["in_progress"]["step"] == 4
    assert list(log["stages"]) == ["text", "align"]
    resumed = train(TrainConfig(output_dir=str(tmp_path / "resumed"), checkpoint_every=2, resume_from=str(part),
                                **TINY), progress=False)
    assert resumed["resumed_from"]["in_progress"] == {"stage": "joint", "step": 4}
    assert resumed["stages"]["joint"]["loss_last"] == whole["stages"]["joint"]["loss_last"]
    assert resumed["stages"]["joint"]["image_gap"] == whole["stages"]["joint"]["image_gap"]
    _same_weights(tmp_path / "whole", tmp_path / "resumed")
    assert not partial_checkpoint(tmp_path / "resumed").exists()
    # a mid-stage checkpoint is refused under other settings of its stage in progress, naming them
    with pytest.raises(ValueError, match="joint_lr=0.0002 there but 0.001 here"):
        train(TrainConfig(output_dir=str(tmp_path / "x"), resume_from=str(part), joint_lr=1e-3, **TINY),
              progress=False)
    with pytest.raises(ValueError, match="patch=8 there but 4 here"):
        train(TrainConfig(output_dir=str(tmp_path / "x"), resume_from=str(part), patch=4, max_positions=320,
                          **TINY), progress=False)
    (part / TRAIN_STATE).unlink()
    with pytest.raises(FileNotFoundError, match="mid-stage checkpoint without its train_state.pt"):
        train(TrainConfig(output_dir=str(tmp_path / "x"), resume_from=str(part), **TINY), progress=False)
    assert stage_checkpoint(tmp_path / "whole", "text").is_dir()
