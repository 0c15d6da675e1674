"""The scripts: train_dpo.py (recipes, flags, errors before training, multi-process launches) and
correspondence.py (errors before any model loads, the report, its last line)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_link.collate import VisionPreferenceCollator
from dpo_link.train import ScriptArguments

ROOT = Path(__file__).resolve().parents[2]


def _tiny(tiny_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager"),
            AutoProcessor.from_pretrained(tiny_dir))


def _parse(argv):
    from dpo_link.train import parser

    return parser().parse_args_and_config(args=argv)


def test_recipes_parse_and_flags_override():
    s, t, m = _parse(["--config", str(ROOT / "scripts/recipes/dpo_organism.yaml"), "--max-steps", "7",
                      "--output_dir", "runs/x", "--model", "organism"])
    assert s.dataset == "organism" and t.max_steps == 7 and t.output_dir == "runs/x"
    assert t.use_cpu and not t.bf16 and t.max_length == 256 and m.use_peft and m.model_name_or_path == "organism"
    assert not t.disable_tqdm  # progress bars on
    import dataclasses

    import yaml
    from trl import DPOConfig

    from dpo_link.train import ModelArguments

    known = {f.name for cls in (ScriptArguments, DPOConfig, ModelArguments) for f in dataclasses.fields(cls)}
    organism = yaml.safe_load((ROOT / "scripts/recipes/dpo_organism.yaml").read_text())
    assert set(organism) <= known and organism["output_dir"].split("/")[0] == "runs"
    gpu = yaml.safe_load((ROOT / "scripts/recipes/dpo_llava15_rlaifv.yaml").read_text())
    assert set(gpu) <= known, set(gpu) - known
    assert gpu["bf16"] and gpu["max_length"] is None and gpu["output_dir"].split("/")[0] == "runs"
    # bf16 needs a GPU to validate, so parse the GPU recipe here with the CPU switches flipped
    s, t, m = _parse(["--config", str(ROOT / "scripts/recipes/dpo_llava15_rlaifv.yaml"), "--bf16", "false",
                      "--use_cpu", "true"])
    assert s.column_map == ["question=prompt", "image=images"] and t.max_length is None and t.beta == 0.1
    assert m.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _script_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_script_reports_bad_input_as_errors(tmp_path, tiny_dir, capfd):
    """Bad data (found after the model loads: it needs the tokenizer) and bad options (found before) end with
    ``error: ...`` and exit status 2 and write nothing; a folder holding anything but this recipe's run is refused."""
    script = _load_script("train_dpo")
    recipe = ["--config", str(ROOT / "scripts/recipes/dpo_organism.yaml"), "--model", str(tiny_dir)]
    out = tmp_path / "s"
    code = script.cli.main(script.main, recipe + ["--output_dir", str(out), "--n_train_pairs", "4", "--n_eval_pairs",
                                                  "2", "--max_length", "30"])
    err = capfd.readouterr().err
    assert code == 2 and "error: max_length=30 would cut image tokens" in err and "Traceback" not in err
    assert not out.exists()
    taken = tmp_path / "adapter"
    taken.mkdir()
    (taken / "adapter_config.json").write_text("{}")
    for args, message in [(["--output_dir", str(taken)], "holds a trained adapter"),
                          (["--output_dir", str(out), "--dataset", str(tmp_path / "none.parquet")], "no dataset at"),
                          (["--output_dir", str(out), "--column_map", "question:prompt"], "look like old=new"),
                          (["--output_dir", str(out), "--threads", "0"], "--threads must be a positive"),
                          (["--output_dir", str(out), "--no_such_option", "1"], "no_such_option")]:
        try:
            code = script.cli.main(script.main, recipe + args)
        except SystemExit as e:  # argparse's own errors exit from inside the parser
            code = e.code
        err = capfd.readouterr().err
        assert code == 2 and message in err and err.lstrip().startswith("error:"), (args, err[-1500:])
        assert "Loading weights" not in err and "Traceback" not in err
    assert not out.exists()
    code = script.cli.main(script.main, ["--config", str(tmp_path / "missing.yaml")])
    assert code == 2 and "recipe file not found" in capfd.readouterr().err


@pytest.mark.slow
def test_accelerate_two_processes_train_a_loadable_adapter(tmp_path, tiny_dir):
    import torch
    from peft import PeftModel

    from dpo_link import pairs
    from dpo_link.rewards import adapter_rewards

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
    chosen, rejected = adapter_rewards(loaded, batch, beta=0.1)
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


def _correspondence_script():
    return _load_script("correspondence")


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_dir, make_model, processor):
    import torch
    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    get_peft_model(make_model(processor), LoraConfig(target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False)).save_pretrained(path)
    return path


def test_correspondence_script_writes_the_report(tmp_path, tiny_dir, tiny_adapter, capsys):
    import re
    import time

    out = tmp_path / "report"
    script = _correspondence_script()
    t0 = time.time()
    rc = script.cli.main(script.main, [
        "--model", str(tiny_dir), "--adapter", str(tiny_adapter), "--n_pairs", "4", "--n_generations", "0",
         "--batch_size", "4", "--n_resamples", "20", "--permutations", "20", "--gammas", "0,0.5",
         "--knob", "kappa=0", "--output_dir", str(out)])
    assert rc == 0
    elapsed = time.time() - t0
    assert json.loads((out / "correspondence.json").read_text())["pairs_report"]["n_pairs"] == 4
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == f"outputs: {out}"
    took = int(re.search(r"the correspondence suite took (\d+) s", captured.err).group(1))
    assert abs(took - elapsed) <= 2  # the whole run, model loading and figures included


def test_correspondence_script_uses_the_adapter_it_is_given(tmp_path, tiny_adapter, monkeypatch, capsys):
    """--adapter on the organism replaces its committed adapter (the run is stopped before any model loads)."""
    from dleaf.resources import data_path
    from dpo_link import suite

    seen = []
    monkeypatch.setattr(suite, "run", lambda prep, progress=None: seen.append(prep))
    script = _correspondence_script()
    assert script.cli.main(script.main, ["--adapter", str(tiny_adapter), "--knob", "gamma=0.4",
                                         "--output_dir", str(tmp_path / "o")]) == 0
    (prep,) = seen
    assert prep.model == "organism" and prep.adapter == Path(tiny_adapter) and prep.config.gamma == 0.4
    assert script.cli.main(script.main, ["--output_dir", str(tmp_path / "o")]) == 0
    assert seen[1].adapter == data_path(suite.ORGANISM_ADAPTER)  # the committed one, without --adapter
    capsys.readouterr()


def test_the_study_scores_the_adapter_it_is_given(tmp_path, tiny_adapter, monkeypatch):
    """scripts/study.py --adapter on the organism: its correspondence step scores that adapter (the one its DPO rows
    use), not the committed one; without --adapter, the committed one."""
    from dleaf import study
    from dpo_link import suite

    seen = []
    monkeypatch.setattr(suite, "study_step", lambda out, **kw: seen.append(kw))
    step = _load_script("study").correspondence_suite()
    step(tmp_path, study.StudyConfig(adapter=str(tiny_adapter)))
    step(tmp_path, study.StudyConfig())
    assert seen[0]["model"] == "organism" and seen[0]["adapter"] == str(tiny_adapter)
    assert seen[0]["adapter"] == study.StudyConfig(adapter=str(tiny_adapter)).adapter_path
    assert seen[1]["adapter"] == study.StudyConfig().adapter_path


def test_correspondence_script_refuses_bad_input_before_loading(tmp_path, tiny_dir, tiny_adapter, capsys):
    script = _correspondence_script()
    common = ["--model", str(tiny_dir), "--output_dir", str(tmp_path / "o")]
    for extra, message in [(["--adapter", str(tiny_adapter), "--n_pairs", "2"], "n_pairs must be at least 3"),
                           (["--adapter", str(tmp_path / "missing")], "no PEFT adapter"),
                           (["--adapter", str(tiny_adapter), "--knob", "gamma=1.5"], "gamma"),
                           (["--adapter", str(tiny_adapter), "--knob", "gama=0.3"], "gama"),
                           (["--adapter", str(tiny_adapter), "--knob", "gamma=abc"], "must be a number"),
                           (["--adapter", str(tiny_adapter), "--gammas", "0,x"], "comma-separated numbers"),
                           (["--adapter", str(tiny_adapter), "--dataset", str(tmp_path / "d.csv")], "no dataset")]:
        assert script.cli.main(script.main, common + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "loading" not in err
    assert not (tmp_path / "o").exists()
