"""DPO baseline: preference pairs, input validation, TRL + PEFT training, rewards, resume, the script and recipes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dleaf import metrics
from dleaf.organism import build, world
from dleaf.organism.profile import VOCAB
from dpo_link import pairs, rewards, validate
from dpo_link.collate import VisionPreferenceCollator
from dpo_link.train import ScriptArguments, build_trainer, lora_config, run

ROOT = Path(__file__).resolve().parents[1]
TINY = build.OrganismShape(text_hidden=32, text_layers=2, text_heads=4, text_intermediate=64)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random organism saved like a checkpoint (so scripts can load it by path)."""
    path = tmp_path_factory.mktemp("tiny_organism")
    proc = build.build_processor(TINY)
    model = build.build_model(proc.tokenizer, TINY, seed=0)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def processor():
    return build.build_processor(TINY)


@pytest.fixture(scope="module")
def small_pairs():
    return pairs.organism_pairs(pairs.OrganismPairConfig(n=40, question_fraction=0.3))


def _configs(output_dir, max_steps=4, **dpo):
    from trl import DPOConfig, ModelConfig

    options = dict(max_steps=max_steps, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                   learning_rate=1e-2, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
                   logging_steps=2, save_steps=2, max_length=256, disable_tqdm=True, seed=0)
    ta = DPOConfig(output_dir=str(output_dir), **{**options, **dpo})
    ma = ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, attn_implementation="eager")
    return ta, ma


def _tiny(tiny_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager"),
            AutoProcessor.from_pretrained(tiny_dir))


# --------------------------------------------------------------------------------------------- pairs
def test_ground_truth_pairs_against_the_world(small_pairs):
    captions = questions = 0
    for row in small_pairs:
        scene = world.sample_scene(row["scene_seed"], row["scene_kind"])
        assert list(scene.objects) == row["objects"]
        assert list(row["images"][0].getdata()) == list(world.render(scene).getdata())
        assert row["prompt"][0]["content"][0]["type"] == "image"
        chosen, rejected = pairs.message_text(row["chosen"]), pairs.message_text(row["rejected"])
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
    out = pairs.inject_objects(scene, desc, ["knife"], __import__("numpy").random.default_rng(0))
    words = [w for w in out.split() if w in world.THEME_OF]
    assert words == ["fork", "knife", "ball"]
    assert "there is also a knife" in out
    with pytest.raises(ValueError, match="is in the scene"):
        pairs.inject_objects(scene, desc, ["fork"], __import__("numpy").random.default_rng(0))


def test_rank_replies_prefers_fewest_hallucinations():
    cands = {"greedy": ("a fork . a knife .", 1, 1), "dleaf": ("a fork .", 0, 1)}
    assert pairs.rank_replies(cands) == ("dleaf", "greedy")
    assert pairs.rank_replies({"greedy": ("x", 1, 1), "dleaf": ("y", 1, 1)}) is None  # no preference
    assert pairs.rank_replies({"greedy": ("x", 2, 1), "dleaf": ("y", 1, 1)}, min_margin=2) is None
    # ties in hallucinations broken by grounded objects
    assert pairs.rank_replies({"a": ("x", 1, 2), "b": ("y", 2, 3), "c": ("z", 2, 1)}) == ("a", "c")


def test_self_generated_pairs_rank_decoders(monkeypatch, processor):
    scenes = world.scenes("adversarial", 3, world_seed=pairs.TRAIN_WORLD_SEED)
    good = [world.describe(s) for s in scenes]
    bad = [pairs.inject_objects(s, d, pairs.absent_partners(s)[:1], __import__("numpy").random.default_rng(0))
           for s, d in zip(scenes, good)]
    fake = {"greedy": bad, "dleaf": good}
    monkeypatch.setattr(pairs, "generate_replies", lambda m, p, sc, pr, d, *a, **k: fake[d.name][:len(sc)])
    ds = pairs.self_generated_pairs(torch.nn.Linear(1, 1), processor, scenes)
    assert len(ds) == 3
    assert set(ds["chosen_source"]) == {"dleaf"} and set(ds["rejected_source"]) == {"greedy"}
    assert ds["chosen_hallucinations"] == [0, 0, 0] and ds["rejected_hallucinations"] == [1, 1, 1]
    assert [pairs.message_text(c) for c in ds["chosen"]] == good


def test_self_generated_pairs_join_the_organism_data(monkeypatch, processor):
    from dpo_link.train import build_datasets

    def fake(model, proc, scenes, prompt, decoder, *a, **k):
        good = [world.describe(s) for s in scenes]
        if decoder.name == "dleaf":
            return good
        rng = __import__("numpy").random.default_rng(0)
        return [pairs.inject_objects(s, d, pairs.absent_partners(s)[:1], rng) for s, d in zip(scenes, good)]

    monkeypatch.setattr(pairs, "generate_replies", fake)
    train, held_out, info = build_datasets(
        ScriptArguments(n_train_pairs=6, n_eval_pairs=3, self_generated_scenes=4, dleaf_knobs='{"gamma": 0.7}'),
        torch.nn.Linear(1, 1), processor)
    assert len(train) == 10 and len(held_out) == 3
    assert sorted(train["source"]) == ["ground_truth"] * 6 + ["self_generated"] * 4
    assert info["self_generated"]["pairs"] == 4 and info["self_generated"]["decoders"][1]["knobs"] == {"gamma": 0.7}
    validate.validate_preference_dataset(train, processor, 256)


def test_generate_replies_runs_greedy_and_dleaf(tiny_dir):
    model, proc = _tiny(tiny_dir)
    model.eval()
    scenes = world.scenes("adversarial", 2)
    for dec in (pairs.Decoder("greedy"), pairs.Decoder("dleaf", "dleaf", {"gamma": 0.5})):
        replies = pairs.generate_replies(model, proc, scenes, world.CAPTION_PROMPTS[0], dec, max_new_tokens=4)
        assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_load_user_dataset_from_disk(tmp_path, small_pairs, processor):
    small_pairs.save_to_disk(tmp_path / "trl")
    ds = pairs.load_preference_dataset(tmp_path / "trl")
    assert ds.column_names == small_pairs.column_names and len(ds) == len(small_pairs)
    validate.validate_preference_dataset(ds, processor, 256)
    # an RLAIF-V style export: plain strings, one image column, other column names
    from datasets import Dataset, DatasetDict

    rows = [{"question": world.CAPTION_PROMPTS[0], "image": r["images"][0],
             "chosen": pairs.message_text(r["chosen"]), "rejected": pairs.message_text(r["rejected"]),
             "ds_name": "organism"} for r in small_pairs.select(range(4))]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(tmp_path / "rlaifv")
    ds = pairs.load_preference_dataset(tmp_path / "rlaifv", "train", {"question": "prompt"})
    assert ds[0]["prompt"][0]["content"][0]["type"] == "image" and len(ds[0]["images"]) == 1
    assert ds[0]["chosen"] == pairs.assistant_reply(rows[0]["chosen"])
    validate.validate_preference_dataset(ds, processor, None)
    Dataset.from_list(rows).to_parquet(tmp_path / "x.parquet")
    ds = pairs.load_preference_dataset(tmp_path / "x.parquet", column_map={"question": "prompt", "image": "images"})
    assert len(ds) == 4
    with pytest.raises(ValueError, match="splits"):
        pairs.load_preference_dataset(tmp_path / "rlaifv", "test")
    with pytest.raises(ValueError, match="does not have"):
        pairs.load_preference_dataset(tmp_path / "trl", column_map={"question": "prompt"})
    with pytest.raises(FileNotFoundError):
        pairs.load_preference_dataset(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------- validation
def test_missing_column_is_named(small_pairs, processor):
    with pytest.raises(validate.PreferenceDataError, match="missing column.*'rejected'"):
        validate.validate_preference_dataset(small_pairs.remove_columns("rejected"), processor, 256, "train dataset")
    with pytest.raises(validate.PreferenceDataError, match="'images'"):
        validate.validate_preference_dataset(small_pairs.remove_columns("images"), processor, 256)


def test_prompt_without_image_is_caught(small_pairs, processor):
    ds = small_pairs.select(range(4)).map(lambda r, i: {"images": [] if i == 2 else r["images"]}, with_indices=True)
    with pytest.raises(validate.PreferenceDataError, match=r"row\(s\) 2 .*prompt without an image"):
        validate.validate_preference_dataset(ds, processor, 256)
    text_only = small_pairs.select(range(3)).map(
        lambda r: {"prompt": [{"role": "user", "content": [{"type": "text", "text": "describe ."}]}]})
    with pytest.raises(validate.PreferenceDataError, match="prompt without an image"):
        validate.validate_preference_dataset(text_only, processor, 256)


def test_identical_chosen_and_rejected_are_caught(small_pairs, processor):
    ds = small_pairs.select(range(5)).map(lambda r, i: {"rejected": r["chosen"] if i in (1, 3) else r["rejected"]},
                                          with_indices=True)
    with pytest.raises(validate.PreferenceDataError, match=r"row\(s\) 1, 3 .*identical chosen and rejected"):
        validate.validate_preference_dataset(ds, processor, 256)


def test_max_length_that_cuts_image_tokens_is_caught(small_pairs, processor):
    report = validate.measure_lengths(small_pairs, processor)
    assert report.image_tokens_per_image == 36 and report.add_bos
    with pytest.raises(validate.PreferenceDataError, match="would cut image tokens"):
        validate.check_max_length(report, report.max_image_end - 1)
    with pytest.raises(validate.PreferenceDataError, match="no completion token"):
        validate.check_max_length(report, report.max_prompt)
    validate.check_max_length(report, report.max_total)
    validate.check_max_length(report, None)


def test_measured_lengths_equal_the_collator(small_pairs, processor):
    report = validate.measure_lengths(small_pairs, processor)
    batch = VisionPreferenceCollator(processor=processor, max_length=None)(list(small_pairs))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int(batch["attention_mask"].sum(1).max()) == report.max_total
    last_image = max(int(torch.nonzero(row == image_id).max()) + 1 for row in batch["input_ids"])
    assert last_image == report.max_image_end
    first_completion = batch["completion_mask"].float().argmax(1)
    assert int(first_completion.max()) == report.max_prompt


def test_collator_restores_bos_like_inference(small_pairs, processor):
    from dleaf.organism.chat import user_turn

    row = small_pairs[0]
    batch = VisionPreferenceCollator(processor=processor)([row])
    text = processor.apply_chat_template(user_turn(row["prompt"][0]["content"][1]["text"]),
                                         add_generation_prompt=True, tokenize=False)
    ref = processor(text=[text], images=row["images"], return_tensors="pt")["input_ids"][0]
    assert batch["input_ids"][0, :len(ref)].tolist() == ref.tolist()
    reply = processor.tokenizer(pairs.message_text(row["chosen"]) + " </s>", add_special_tokens=False)["input_ids"]
    completion = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
    assert completion == reply


def test_bad_max_length_fails_before_training(tmp_path, tiny_dir):
    model, proc = _tiny(tiny_dir)
    ta, ma = _configs(tmp_path / "out", max_length=40)
    with pytest.raises(validate.PreferenceDataError, match="max_length=40 would cut image tokens"):
        run(ScriptArguments(n_train_pairs=8, n_eval_pairs=4), ta, ma, model=model, processor=proc)
    assert not (tmp_path / "out").exists()


def test_cpu_with_bf16_is_refused(tmp_path, tiny_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    model, proc = _tiny(tiny_dir)
    ta, ma = _configs(tmp_path / "out")
    ta.bf16 = True
    with pytest.raises(ValueError, match="--bf16 false"):
        run(ScriptArguments(n_train_pairs=8, n_eval_pairs=4), ta, ma, model=model, processor=proc)


# ------------------------------------------------------------------------------------------ training
def test_lora_targets_only_the_language_model(tiny_dir):
    from peft import get_peft_model

    _, ma = _configs("unused")
    ma.lora_target_modules = ["q_proj", "v_proj"]
    model, _ = _tiny(tiny_dir)
    peft_model = get_peft_model(model, lora_config(ma))
    wrapped = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert wrapped and all("language_model" in n for n in wrapped)
    assert len(wrapped) == 2 * TINY.text_layers


def test_the_organism_is_recorded_by_its_repository_path(monkeypatch, tiny_dir):
    from peft import get_peft_model

    from dpo_link.train import load_model

    monkeypatch.setattr(build, "ORGANISM_DIR", Path(tiny_dir))
    ta, ma = _configs("unused")
    ma.model_name_or_path = None
    model, proc = load_model(ma, ta)
    peft_model = get_peft_model(model, lora_config(ma))
    assert peft_model.peft_config["default"].base_model_name_or_path == "data/organism"
    assert proc.tokenizer.padding_side == "left"


def test_tiny_dpo_run_saves_a_loadable_adapter_and_card(tmp_path, tiny_dir):
    from peft import PeftModel

    model, proc = _tiny(tiny_dir)
    out = tmp_path / "adapter"
    ta, ma = _configs(out, max_steps=3, save_strategy="no")
    record = run(ScriptArguments(n_train_pairs=12, n_eval_pairs=8), ta, ma, model=model, processor=proc)
    assert record["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert record["train"]["global_step"] == 3
    assert record["eval_after"]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    for f in ("adapter_model.safetensors", "adapter_config.json", "README.md", "dpo_run.json", "tokenizer.json"):
        assert (out / f).exists(), f
    card = (out / "README.md").read_text()
    assert "Held-out DPO metrics" in card and "beta" in card and "organism ground truth" in card
    assert record["eval_by_task"]["all"]["n"] == 8
    assert record["eval_by_task"]["all"]["loss"] == pytest.approx(record["eval_after"]["loss"], abs=1e-4)
    assert json.loads((out / "dpo_run.json").read_text())["config"]["dpo"]["beta"] == 0.1
    base, proc2 = _tiny(tiny_dir)
    assert proc2.tokenizer.padding_side == "left"
    loaded = PeftModel.from_pretrained(base, out).eval()
    batch = VisionPreferenceCollator(processor=proc2)([pairs.organism_examples(pairs.OrganismPairConfig(n=1))[0]])
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        tuned = loaded(**inputs).logits
        with loaded.disable_adapter():
            plain = loaded(**inputs).logits
    assert not torch.allclose(tuned, plain)


def test_logged_rewards_equal_an_independent_computation(tmp_path, tiny_dir, small_pairs):
    model, proc = _tiny(tiny_dir)
    ta, ma = _configs(tmp_path / "r", max_steps=2, beta=0.5, save_strategy="no")
    eval_rows = small_pairs.select(range(8))  # one eval batch of 8
    trainer = build_trainer(model, proc, small_pairs.select(range(8, 40)), eval_rows, ta, ma, ScriptArguments())
    trainer.train()
    logged = trainer.evaluate()
    peft_model = trainer.model.eval()
    batch = VisionPreferenceCollator(processor=proc, max_length=256)(list(eval_rows))
    chosen, rejected = rewards.implicit_rewards(peft_model, batch, beta=0.5)
    assert logged["eval_rewards/chosen"] == pytest.approx(float(chosen.mean()), abs=1e-4)
    assert logged["eval_rewards/rejected"] == pytest.approx(float(rejected.mean()), abs=1e-4)
    assert logged["eval_rewards/margins"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-4)
    assert logged["eval_rewards/accuracies"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert logged["eval_loss"] == pytest.approx(float(rewards.dpo_loss(chosen, rejected).mean()), abs=1e-4)
    assert float(chosen.abs().sum()) > 0


def test_resume_from_the_last_checkpoint(tmp_path, tiny_dir):
    out = tmp_path / "resume"
    model, proc = _tiny(tiny_dir)
    ta, ma = _configs(out, max_steps=2)
    args = ScriptArguments(n_train_pairs=8, eval_dataset="none")
    run(args, ta, ma, model=model, processor=proc)
    assert (out / "checkpoint-2").is_dir()
    model, proc = _tiny(tiny_dir)
    ta, ma = _configs(out, max_steps=4, resume_from_checkpoint="last")
    record = run(args, ta, ma, model=model, processor=proc)
    assert record["train"]["resumed_from"] == "checkpoint-2" and record["train"]["global_step"] == 4
    assert "resumed from checkpoint-2" in (out / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(ScriptArguments(), *_configs(tmp_path / "empty", resume_from_checkpoint="last"), model=model,
            processor=proc)


# ------------------------------------------------------------------------------------- script & recipes
def _parse(argv):
    from trl import DPOConfig, ModelConfig, TrlParser

    return TrlParser((ScriptArguments, DPOConfig, ModelConfig)).parse_args_and_config(args=argv)


def test_recipes_parse_and_flags_override():
    s, t, m = _parse(["--config", str(ROOT / "scripts/recipes/dpo_organism.yaml"), "--max_steps", "7",
                      "--output_dir", "runs/x"])
    assert s.dataset == "organism" and t.max_steps == 7 and t.output_dir == "runs/x"
    assert t.use_cpu and not t.bf16 and t.max_length == 256 and m.use_peft and m.model_name_or_path is None
    import dataclasses

    import yaml
    from trl import DPOConfig, ModelConfig

    gpu = yaml.safe_load((ROOT / "scripts/recipes/dpo_llava15_rlaifv.yaml").read_text())
    known = {f.name for cls in (ScriptArguments, DPOConfig, ModelConfig) for f in dataclasses.fields(cls)}
    assert set(gpu) <= known, set(gpu) - known
    assert gpu["bf16"] and gpu["max_length"] is None
    # bf16 needs a GPU to validate, so parse the GPU recipe here with the CPU switches flipped
    s, t, m = _parse(["--config", str(ROOT / "scripts/recipes/dpo_llava15_rlaifv.yaml"), "--bf16", "false",
                      "--use_cpu", "true"])
    assert s.column_map == "question:prompt,image:images" and t.max_length is None and t.beta == 0.1
    assert m.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _script_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_script_reports_bad_data_without_training(tmp_path, tiny_dir):
    out = tmp_path / "s"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/train_dpo.py"), "--config", str(ROOT / "scripts/recipes/dpo_organism.yaml"),
         "--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--n_train_pairs", "4",
         "--n_eval_pairs", "2", "--max_length", "30"], capture_output=True, text=True, env=_script_env(), cwd=ROOT,
        timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "would cut image tokens" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_accelerate_two_processes_train_a_loadable_adapter(tmp_path, tiny_dir):
    from peft import PeftModel

    out = tmp_path / "ddp"
    # accelerate's --cpu launcher fans out only through mpirun; --multi_gpu (torchrun) with no visible GPU runs two
    # CPU processes with the gloo backend
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "scripts/train_dpo.py"), "--config", str(ROOT / "scripts/recipes/dpo_organism.yaml"),
           "--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--n_train_pairs", "32",
           "--n_eval_pairs", "8", "--max_steps", "4", "--per_device_train_batch_size", "4",
           "--per_device_eval_batch_size", "4", "--save_steps", "4", "--learning_rate", "0.01"]
    env = dict(_script_env(), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("saved the adapter") == 1  # reported once, by rank 0
    record = json.loads((out / "dpo_run.json").read_text())
    assert record["config"]["processes"] == 2 and record["train"]["global_step"] == 4
    base, proc2 = _tiny(tiny_dir)
    loaded = PeftModel.from_pretrained(base, out).eval()
    batch = VisionPreferenceCollator(processor=proc2)([pairs.organism_examples(pairs.OrganismPairConfig(n=1))[0]])
    chosen, rejected = rewards.implicit_rewards(loaded, batch, beta=0.1)
    assert torch.isfinite(chosen).all() and float((chosen - rejected).abs().sum()) > 0


@pytest.mark.slow
def test_accelerate_cpu_flag_runs_one_process_and_says_so(tmp_path, tiny_dir):
    out = tmp_path / "cpu"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "scripts/train_dpo.py"),
           "--config", str(ROOT / "scripts/recipes/dpo_organism.yaml"), "--model_name_or_path", str(tiny_dir),
           "--output_dir", str(out), "--n_train_pairs", "8", "--eval_dataset", "none", "--max_steps", "1",
           "--per_device_train_batch_size", "4", "--save_steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_script_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "started a single process" in proc.stderr
    assert json.loads((out / "dpo_run.json").read_text())["config"]["processes"] == 1
