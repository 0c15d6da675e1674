"""dpo_link.train: TRL + PEFT training on the organism's pairs, logged rewards against an independent computation,
resume, LoRA targets, the model card."""

import json
import math
from pathlib import Path

import pytest
import torch

from dpo_link import pairs, validate
from dpo_link.collate import VisionPreferenceCollator
from dpo_link.train import ScriptArguments, build_trainer, lora_config, run


def _configs(output_dir, max_steps=4, **dpo):
    from trl import DPOConfig, ModelConfig

    options = dict(max_steps=max_steps, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                   learning_rate=1e-2, use_cpu=True, bf16=False, report_to="none",
                   logging_steps=2, save_steps=2, max_length=256, disable_tqdm=True, seed=0)
    ta = DPOConfig(output_dir=str(output_dir), **{**options, **dpo})
    ma = ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, attn_implementation="eager")
    return ta, ma


def _tiny(tiny_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager"),
            AutoProcessor.from_pretrained(tiny_dir))


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


def test_lora_targets_only_the_language_model(tiny_dir):
    from peft import get_peft_model

    _, ma = _configs("unused")
    ma.lora_target_modules = ["q_proj", "v_proj"]
    model, _ = _tiny(tiny_dir)
    peft_model = get_peft_model(model, lora_config(ma))
    wrapped = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert wrapped and all("language_model" in n for n in wrapped)
    assert len(wrapped) == 2 * 2


def test_the_organism_is_recorded_by_its_repository_path(tiny_dir):
    from peft import get_peft_model

    from dleaf import models
    from dpo_link.train import load_model

    entry = models.registered()["organism"]
    models.register("organism", tiny_dir, "eager")  # the tiny model stands in for the committed organism
    try:
        ta, ma = _configs("unused")
        ma.model_name_or_path = None
        model, proc = load_model(ma, ta)
    finally:
        models.register("organism", entry.path, entry.attn_implementation, entry.description)
    assert model.config.text_config.num_hidden_layers == 2
    peft_model = get_peft_model(model, lora_config(ma))
    assert peft_model.peft_config["default"].base_model_name_or_path == "data/organism"
    assert proc.tokenizer.padding_side == "left"
    # a checkpoint folder given by its absolute path is recorded without this machine's path
    ma.model_name_or_path = str(Path(tiny_dir).resolve())
    model, _ = load_model(ma, ta)
    recorded = get_peft_model(model, lora_config(ma)).peft_config["default"].base_model_name_or_path
    assert not Path(recorded).is_absolute() and recorded.endswith(Path(tiny_dir).name)


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
    assert record["eval_by_task"]["all"]["loss"] == pytest.approx(record["eval_after"]["loss"], abs=2e-6)
    assert json.loads((out / "dpo_run.json").read_text())["config"]["dpo"]["beta"] == 0.1
    from dpo_link.rewards import checkpoint_fingerprint

    assert record["base_model"]["fingerprint"] == checkpoint_fingerprint(tiny_dir) is not None
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


def _plain_rewards(peft_model, batch, beta, magnitude=False):
    """(chosen, rejected) beta * (log pi_theta - log pi_0) of a collated batch from plain forward passes (no engine),
    float64 log-softmax, the reply's tokens picked by the completion mask. With ``magnitude``, also each reward's
    beta * (sum |log pi_theta| + sum |log pi_0|) over its tokens (the scale float32 rounding acts on)."""
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}

    def logps():
        logp = torch.log_softmax(peft_model(**inputs).logits[:, :-1].double(), -1)
        token = logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0] * batch["completion_mask"][:, 1:]
        return token.sum(1), token.abs().sum(1)

    with torch.no_grad():
        (policy, p_abs) = logps()
        with peft_model.disable_adapter():
            (reference, r_abs) = logps()
    rewards = (beta * (policy - reference)).chunk(2)
    return (*rewards, float(beta * (p_abs + r_abs).max())) if magnitude else rewards


def test_logged_rewards_equal_an_independent_computation(tmp_path, tiny_dir, small_pairs):
    model, proc = _tiny(tiny_dir)
    ta, ma = _configs(tmp_path / "r", max_steps=2, beta=0.5, save_strategy="no")
    eval_rows = small_pairs.select(range(8))  # one eval batch of 8
    trainer = build_trainer(model, proc, small_pairs.select(range(8, 40)), eval_rows, ta, ma, ScriptArguments())
    trainer.train()
    logged = trainer.evaluate()
    peft_model = trainer.model.eval()
    batch = VisionPreferenceCollator(processor=proc, max_length=256)(list(eval_rows))
    chosen, rejected, scale = _plain_rewards(peft_model, batch, beta=0.5, magnitude=True)
    # TRL sums float32 log-probabilities: its rounding, which differs between CPU kernels (measured 1.3e-6 here,
    # 2.9e-6 with ATEN_CPU_CAPABILITY=default), is a few float32 epsilons of the summed magnitudes; 4 epsilons of the
    # largest reward's scale (here about 1.4e-4, the rewards about 0.55) bound it with a wide margin
    tol = 4 * torch.finfo(torch.float32).eps * scale
    assert 1e-7 < tol < 2e-4
    assert logged["eval_rewards/chosen"] == pytest.approx(float(chosen.mean()), abs=tol)
    assert logged["eval_rewards/rejected"] == pytest.approx(float(rejected.mean()), abs=tol)
    assert logged["eval_rewards/margins"] == pytest.approx(float((chosen - rejected).mean()), abs=2 * tol)
    # the accuracy counts chosen > rejected, computed here and by TRL within tol: no pair may be within 1e-4 of a tie
    assert float((chosen - rejected).abs().min()) > max(1e-4, 10 * tol)
    assert logged["eval_rewards/accuracies"] == pytest.approx(float((chosen > rejected).double().mean()))
    loss = float(torch.nn.functional.softplus(-(chosen - rejected)).mean())
    assert logged["eval_loss"] == pytest.approx(loss, abs=2 * tol)
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
    with pytest.raises(ValueError, match="no checkpoint"):
        run(ScriptArguments(), *_configs(tmp_path / "empty", resume_from_checkpoint="last"), model=model,
            processor=proc)




def test_output_folders_that_are_not_a_resumable_run_of_the_same_recipe_are_refused(tmp_path, tiny_dir):
    """Before any model loads: a folder with other files (such as a committed adapter) or a run of another recipe
    is refused; an interrupted run of the same recipe resumes from its last checkpoint by itself; a finished run is
    not trained again."""
    from dpo_link.train import check_inputs

    args = ScriptArguments(n_train_pairs=8, eval_dataset="none")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a trained adapter, not a DPO run to resume"):
        check_inputs(args, *_configs(adapter), model_given=True)
    out = tmp_path / "run"
    model, proc = _tiny(tiny_dir)
    ta, ma = _configs(out, max_steps=2, save_steps=1)
    run(args, ta, ma, model=model, processor=proc)
    assert (out / "dpo_recipe.json").is_file() and (out / "checkpoint-2").is_dir()
    with pytest.raises(ValueError, match="another recipe.*learning_rate"):
        check_inputs(args, *_configs(out, max_steps=2, learning_rate=0.5), model_given=True)
    with pytest.raises(ValueError, match="already holds this run, trained to step 2"):
        check_inputs(args, *_configs(out, max_steps=2), model_given=True)
    assert Path(check_inputs(args, *_configs(out, max_steps=3), model_given=True)).name == "checkpoint-2"
    model, proc = _tiny(tiny_dir)
    messages = []
    record = run(args, *_configs(out, max_steps=3, save_steps=1), model=model, processor=proc,
                 progress=messages.append)
    assert record["train"]["resumed_from"] == "checkpoint-2" and record["train"]["global_step"] == 3
    assert messages == [f"resuming from checkpoint-2 of {out}"]


def test_an_interrupted_run_leaves_no_generic_model_card(tmp_path, tiny_dir, small_pairs):
    """TRL writes its generic card ("a fine-tuned version of ...") into the output folder with every checkpoint; the
    trainer built here does not, so a run stopped after a checkpoint leaves only the checkpoint."""
    model, proc = _tiny(tiny_dir)
    out = tmp_path / "stopped"
    ta, ma = _configs(out, max_steps=2, save_steps=1, save_strategy="steps")
    trainer = build_trainer(model, proc, small_pairs.select(range(8)), None, ta, ma, ScriptArguments())
    trainer.train()  # the run's own card and record are written by run() after this; an interruption stops here
    assert (out / "checkpoint-1").is_dir() and not (out / "README.md").exists()
    # (a checkpoint folder is a PEFT save and holds PEFT's own adapter card, which names no base model either way)


def test_a_run_on_the_recipes_options_raises_no_future_warning(tmp_path, tiny_dir, recwarn):
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "scripts/recipes/dpo_organism.yaml").read_text())
    assert recipe["output_dir"].startswith("runs/") and "gradient_checkpointing" not in recipe
    assert "disable_tqdm" not in recipe  # progress bars on
    model, proc = _tiny(tiny_dir)
    ta, ma = _configs(tmp_path / "w", max_steps=1, save_strategy="no",
                      activation_checkpointing=recipe["activation_checkpointing"])
    run(ScriptArguments(n_train_pairs=4, eval_dataset="none"), ta, ma, model=model, processor=proc)
    future = [str(w.message) for w in recwarn.list if issubclass(w.category, FutureWarning)]
    assert not future, future
