"""The command line as a new user meets it, each fault as a tester reproduced it: a failed DPO run that poisoned its
folder, a study that checked its adapter only after four evaluations, tracebacks from the parsers (an unknown flag, a
recipe with a typo, an empty or malformed recipe, a single preference file whose default split could never match),
and the smaller ones (run_dleaf writing nothing for PAI, train_dpo's 947-line --help, two flags for one concept,
silent phases, library deprecation warnings). Each refusal is checked the same way: exit status 2, one ``error:``
line, no traceback, no work done first; then the corrected command, into the same folder, succeeds. Scripts run
in-process through their ``main`` (as ``python scripts/X.py`` runs it), on tiny models and the smallest limits."""

import json
import runpy
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

from dleaf import cli

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "scripts" / "recipes" / "dpo_organism.yaml"
#: the smallest DPO run on the tiny model: 4 training pairs, 2 held-out ones, one step
DPO_SMALL = ["--n_train_pairs", "4", "--n_eval_pairs", "2", "--self_generated_scenes", "0", "--max_steps", "1",
             "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--save_steps", "1",
             "--disable_tqdm", "true"]


def script(name):
    return runpy.run_path(str(ROOT / "scripts" / name), run_name="script")


def call(name, *args):
    """Run ``scripts/<name>`` in-process as its ``__main__`` block does; returns the exit status."""
    main = script(name)["main"]
    try:
        return cli.main(lambda argv: main(argv) and 0 if name == "bench.py" else main(argv), [str(a) for a in args])
    except SystemExit as e:
        return e.code


def refused(capsys, code, *words):
    """Exit status 2 and exactly one ``error:`` line holding ``words``, without a traceback; returns the line."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, err
    for w in words:
        assert str(w) in errors[0], errors[0]
    return errors[0]


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@contextmanager
def no_work(*targets):
    """Inside the block, loading a model (and each ``(module, name)`` of ``targets``) fails the test: the input
    was not checked first."""
    from dleaf import models

    def fail(*a, **k):
        raise AssertionError("work started before the input was checked")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load", fail)
        for module, name in targets:
            mp.setattr(module, name, fail)
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random organism saved like a checkpoint (two decoder layers)."""
    from dleaf.organism import build

    shape = build.OrganismShape(text_hidden=32, text_layers=2, text_heads=4, text_intermediate=64)
    processor = build.build_processor(shape)
    path = tmp_path_factory.mktemp("tiny")
    build.build_model(processor.tokenizer, shape, seed=0).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_dir):
    """A random LoRA adapter on the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                   ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Six held-out organism preference pairs in one parquet file (no splits: the file is the data)."""
    from dpo_link import pairs
    from dpo_link.data import preference_dataset

    path = tmp_path_factory.mktemp("pairs") / "heldout.parquet"
    preference_dataset(pairs.organism_examples(pairs.OrganismPairConfig(n=6, world_seed=pairs.EVAL_WORLD_SEED))
                       ).to_parquet(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# 4. A failed run poisons nothing; bad training options and a folder that is not an adapter are refused up front
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, flag", [
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--max_steps", "0"], "--max_steps"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs"),
    (["--beta", "0"], "--beta"),
    (["--beta", "-0.1"], "--beta"),
    (["--warmup_steps", "-1"], "--warmup_steps"),
    (["--save_steps", "0"], "--save_steps"),
    (["--logging_steps", "0"], "--logging_steps"),
    (["--weight_decay", "-1"], "--weight_decay"),
    (["--max_length", "0"], "--max_length"),
    (["--n_train_pairs", "0"], "--n_train_pairs"),
    (["--n_eval_pairs", "0"], "--n_eval_pairs"),
    (["--self_generated_scenes", "-1"], "--self_generated_scenes"),
    (["--question_fraction", "1.5"], "--question_fraction"),
    (["--eval_dataset", "split", "--eval_fraction", "1"], "--eval_fraction"),
    (["--dataset_limit", "0"], "--dataset_limit"),
    (["--lora_r", "0"], "--lora_r"),
    (["--lora_dropout", "1"], "--lora_dropout"),
])
def test_bad_training_options_are_refused_before_the_model_loads(bad, flag, tmp_path, tiny_dir, capsys):
    out = tmp_path / "dpo"
    with no_work():
        code = call("train_dpo.py", "--config", RECIPE, "--model", tiny_dir, "--output_dir", out, *DPO_SMALL, *bad)
    refused(capsys, code, flag.lstrip("-"))  # the flag, or the recipe key of its name (TRL's own checks)
    assert files_in(out) == []


def test_a_failed_dpo_run_leaves_nothing_that_blocks_the_corrected_one(tmp_path, tiny_dir, capsys):
    """`--learning_rate -1` used to fail in the optimiser after the model loaded, leaving a dpo_recipe.json that made
    the corrected command fail ("another recipe"). Now it is refused first; and a recipe record left by a run that
    stopped before its first checkpoint (no results) does not block the next run either."""
    from dpo_link import train

    out = tmp_path / "dpo"
    base = ["--config", RECIPE, "--model", tiny_dir, "--output_dir", out, *DPO_SMALL]
    with no_work():
        refused(capsys, call("train_dpo.py", *base, "--learning_rate", "-1"), "--learning_rate", "-1")
    assert files_in(out) == []
    # a run of another recipe that died in its first step left only its record
    out.mkdir()
    (out / train.RECIPE_FILE).write_text(json.dumps({"script": {}, "dpo": {"learning_rate": 0.5}, "model": {}}))
    assert call("train_dpo.py", *base, "--learning_rate", "1e-3") == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == f"outputs: {out}"
    assert "stopped before its first checkpoint" in captured.err
    assert (out / "dpo_run.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / train.RECIPE_FILE).read_text())["dpo"]["learning_rate"] == 1e-3


def test_a_recipe_record_without_results_does_not_block_and_one_with_results_does(tmp_path):
    from dpo_link import train

    out = tmp_path / "run"
    out.mkdir()
    (out / train.RECIPE_FILE).write_text(json.dumps({"script": {}, "dpo": {"beta": 0.5}, "model": {}}))
    recipe = {"script": {}, "dpo": {"beta": 0.1}, "model": {}}
    assert train.check_output_dir(out, recipe) is None  # starts afresh
    (out / "checkpoint-1").mkdir()
    with pytest.raises(cli.InputError, match="another recipe"):
        train.check_output_dir(out, recipe)


def test_the_study_refuses_a_folder_that_is_not_an_adapter_before_any_generation(tmp_path, tiny_dir, capsys,
                                                                                 monkeypatch):
    """docs/study.md promises the adapter is checked before any generation; it used to run four evaluations first."""
    from dleaf import study
    from dleaf.eval import runner

    out = tmp_path / "study"
    args = ["--limit", "1", "--no_correspondence", "--no_progress", "--output_dir", out]
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")  # the config without the weights
    for folder, words in ((tiny_dir, ("adapter_config.json",)), (half, ("adapter_model.safetensors",)),
                          (tmp_path / "none", ("adapter_config.json",))):
        with no_work((runner, "run_evaluation"), (study, "run_evaluations")):
            code = call("study.py", "--adapter", folder, *args)
        refused(capsys, code, "--adapter", folder, *words)
        assert files_in(out) == []
    fast = {"dleaf_over_greedy_throughput": 1.0, "interval": [1.0, 1.0], "batch": 2, "device": "cpu"}
    monkeypatch.setattr(study, "measure_overhead", lambda cfg, *a, **k: fast)  # the timing is tested elsewhere
    assert call("study.py", "--adapter", ROOT / "data" / "organism_dpo", *args) == 0  # the corrected command
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"outputs: {out}"
    assert (out / "report.md").is_file() and (out / "evals" / "organism_caption_dpo" / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# 5. The parsers' errors are one error: line
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_refuses_an_unknown_flag_and_bad_recipes_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    small = ["--benchmark", "organism_caption", "--splits", "adversarial", "--limit", "1", "--no_progress",
             "--output_dir", out]
    with no_work():
        refused(capsys, call("evaluate.py", *small, "--max_tokens", "8"), "--max_tokens 8", "--max_new_tokens")
        recipes = {"typo.yaml": ("benchmark: organism_caption\nmax_tokens: 1\n", ("max_tokens", "max_new_tokens")),
                   "empty.yaml": ("", ("empty",)),
                   "comments.yaml": ("# nothing but a comment\n", ("empty",)),
                   "malformed.yaml": ("benchmark: [organism_caption\nlimit: 1\n", ("not valid YAML", "line")),
                   "list.yaml": ("- benchmark\n- organism_caption\n", ("mapping",))}
        for name, (text, words) in recipes.items():
            (tmp_path / name).write_text(text)
            refused(capsys, call("evaluate.py", tmp_path / name), tmp_path / name, *words)
        refused(capsys, call("evaluate.py", tmp_path / "missing.yaml"), "not found", tmp_path / "missing.yaml")
    assert files_in(out) == []
    good = tmp_path / "good.yaml"
    good.write_text(f"benchmark: organism_caption\nsplits: [adversarial]\nlimit: 1\nmax_new_tokens: 2\n"
                    f"progress: false\noutput_dir: {out}\n")
    assert call("evaluate.py", good) == 0  # the corrected recipe, into the same folder
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"outputs: {out}"


def test_train_dpo_refuses_bad_recipes_in_one_line_and_takes_a_single_pairs_file(tmp_path, tiny_dir, pairs_file,
                                                                                  capsys):
    """An empty, comment-only, malformed or typo'd --config; a split that a saved DatasetDict lacks (named by its
    flag, before the model loads); then a single parquet file as --eval_dataset with the default --eval_split
    (the file is its own split; it used to fail after the model loaded, naming the Python argument split=)."""
    from datasets import DatasetDict, load_dataset

    out = tmp_path / "dpo"
    common = ["--model", tiny_dir, "--output_dir", out, *DPO_SMALL]
    recipes = {"empty.yaml": ("", ("empty",)), "comments.yaml": ("# only comments\n", ("empty",)),
               "malformed.yaml": ("beta: [0.1\nlearning_rate: 1\n", ("not valid YAML", "line")),
               "typo.yaml": (RECIPE.read_text() + "learning_rat: 0.1\n", ("learning_rat", "learning_rate")),
               "list.yaml": ("- beta\n", ("mapping",))}
    saved = tmp_path / "saved"
    DatasetDict({"train": load_dataset("parquet", data_files=str(pairs_file))["train"]}).save_to_disk(saved)
    with no_work():
        for name, (text, words) in recipes.items():
            (tmp_path / name).write_text(text)
            refused(capsys, call("train_dpo.py", "--config", tmp_path / name, *common), tmp_path / name, *words)
        refused(capsys, call("train_dpo.py", "--config", RECIPE, *common, "--eval_dataset", saved),
                "--eval_split", "test", "train")
        refused(capsys, call("train_dpo.py", "--config", RECIPE, *common, "--no_such_flag", "1"), "--no_such_flag")
    assert files_in(out) == []
    assert call("train_dpo.py", "--config", RECIPE, *common, "--eval_dataset", pairs_file) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"outputs: {out}"
    record = json.loads((out / "dpo_run.json").read_text())
    assert record["data"]["eval"]["rows"] == 6


def test_correspondence_takes_a_single_pairs_file_and_names_the_split_flag(tmp_path, tiny_dir, tiny_adapter,
                                                                            pairs_file, capsys):
    from datasets import DatasetDict, load_dataset

    out = tmp_path / "corr"
    saved = tmp_path / "saved"
    DatasetDict({"train": load_dataset("parquet", data_files=str(pairs_file))["train"]}).save_to_disk(saved)
    common = ["--model", tiny_dir, "--adapter", tiny_adapter, "--n_pairs", "3", "--batch_size", "3",
              "--n_resamples", "20", "--permutations", "20", "--gammas", "0,0.5", "--output_dir", out]
    with no_work():
        refused(capsys, call("correspondence.py", *common, "--dataset", saved), "--dataset_split", "test", "train")
    assert files_in(out) == []
    assert call("correspondence.py", *common, "--dataset", pairs_file) == 0  # the file is its own split
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"outputs: {out}"
    assert json.loads((out / "correspondence.json").read_text())["pairs_report"]["n_pairs"] == 3


def test_a_single_file_is_its_own_split(tmp_path):
    from dpo_link.data import check_dataset_path, load_preference_dataset

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(3)))
    for split in ("train", "test", "validation"):
        assert len(load_preference_dataset(path, split)) == 3
        assert check_dataset_path(path, split) == path
    saved = tmp_path / "saved"
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"x": 1}])}).save_to_disk(saved)
    with pytest.raises(ValueError, match="--eval_split"):
        check_dataset_path(saved, "test", "--eval_split")
    with pytest.raises(ValueError, match="holds the splits train; choose one with --eval_split"):
        load_preference_dataset(saved, "test", split_flag="--eval_split")


# ---------------------------------------------------------------------------------------------------------------
# 6. The smaller ones
# ---------------------------------------------------------------------------------------------------------------


def test_run_dleaf_writes_its_outputs_for_a_method_without_a_trace(tmp_path, capsys):
    out = tmp_path / "pai"
    assert call("run_dleaf.py", "--method", "pai", "--scene", "0", "--max_new_tokens", "6", "--output_dir", out) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == f"outputs: {out}"
    assert "no files written" not in captured.out
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "pai" and result["replies"]["pai"] and result["replies"]["plain"]
    assert "pai" in (out / "summary.txt").read_text() and not (out / "trace.json").exists()


def test_train_dpo_help_is_short_and_leads_with_the_recipe(capsys):
    main = script("train_dpo.py")["main"]
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    short = capsys.readouterr().out
    assert len(short.splitlines()) < 200
    options = [ln.strip() for ln in short.split("\noptions:", 1)[1].splitlines() if ln.strip().startswith("-")]
    assert options[1].startswith("--config")  # after -h
    for flag in ("--help_all", "--model", "--output_dir", "--dataset", "--eval_dataset", "--eval_split", "--knob",
                 "--column_map", "--max_steps", "--learning_rate", "--per_device_train_batch_size", "--beta",
                 "--lora_r", "--use_cpu"):
        assert flag in short, flag
    assert "--adam_beta1" not in short
    with pytest.raises(SystemExit) as e:
        main(["--help_all"])
    assert e.value.code == 0
    full = capsys.readouterr().out
    assert "--adam_beta1" in full and "--config" in full and len(full.splitlines()) > 300


def _parse(name, argv, capsys):
    args = script(name)["build_parser"]().parse_args([str(a) for a in argv])
    return args, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize("name, old, new, value, dest", [
    ("study.py", "--n_images", "--limit", "2", "limit"),
    ("study.py", "--pairs", "--n_pairs", "4", "n_pairs"),
    ("study.py", "--out", "--output_dir", "runs/s", "output_dir"),
    ("organism_grid.py", "--n_images", "--limit", "2", "limit"),
    ("profile_organism.py", "--n_images", "--limit", "2", "limit"),
    ("profile_organism.py", "--organism", "--model", "runs/o", "model"),
    ("run_dleaf.py", "--out", "--output_dir", "runs/r", "output_dir"),
])
def test_one_flag_per_concept_with_old_spellings_that_warn_once(name, old, new, value, dest, capsys):
    args, err = _parse(name, [new, value], capsys)
    assert err == [] and str(getattr(args, dest)) == value
    args, err = _parse(name, [old, value, old.replace("_", "-"), value], capsys)
    assert str(getattr(args, dest)) == value
    assert len(err) == 1 and err[0].startswith("warning: ") and old in err[0] and new in err[0], err


def test_one_knob_and_one_column_map_syntax(tmp_path, capsys, monkeypatch):
    """--knob name=value repeated and --column_map old=new repeated, in every script that takes them; the old
    spellings (train_dpo's --dleaf_knobs, comma-joined column maps) still work and warn once."""
    normalize = script("train_dpo.py")["normalize_argv"]
    argv = normalize(["--knob", "gamma=0.8", "--column_map", "question=prompt", "--knob", "threshold=best",
                      "--column_map", "image=images", "--max_steps", "1"])
    assert capsys.readouterr().err == ""
    from dpo_link.train import parser

    s, t, _ = parser().parse_args_into_dataclasses(argv + ["--use_cpu", "true", "--bf16", "false"])
    assert s.dleaf_knobs == ["gamma=0.8", "threshold=best"] and s.column_map == ["question=prompt", "image=images"]
    old = normalize(["--dleaf_knobs", "gamma=0.8", "threshold=best", "--column_map", "question=prompt,image=images"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(err) == 2 and all(ln.startswith("warning: ") for ln in err), err
    assert "--knob" in err[0] and "--column_map question=prompt --column_map image=images" in err[1]
    s, _, _ = parser().parse_args_into_dataclasses(old + ["--use_cpu", "true", "--bf16", "false"])
    assert s.dleaf_knobs == ["gamma=0.8", "threshold=best"] and s.column_map == ["question=prompt", "image=images"]
    for name in ("study.py", "correspondence.py"):
        args, err = _parse(name, ["--column_map", "question=prompt", "--column_map", "image=images"], capsys)
        assert list(args.column_map) == ["question=prompt", "image=images"] and err == []
    from dpo_link import suite

    seen = []
    monkeypatch.setattr(suite, "run", lambda prep, progress=None: seen.append(prep))
    monkeypatch.setattr(suite, "prepare", lambda out, **kw: kw)
    assert call("correspondence.py", "--column_map", "question=prompt,image=images", "--output_dir",
                tmp_path / "c") == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: ")]
    assert len(err) == 1 and seen[0]["column_map"] == ["question=prompt", "image=images"]


def test_bench_writes_into_its_output_dir(tmp_path, capsys):
    """--output_dir like every script (bench.json and bench.md there); the old --out FILE still works and warns."""
    args, err = _parse("bench.py", ["--out", "runs/b/x.json"], capsys)
    assert args.out == "runs/b/x.json" and len(err) == 1 and "--output_dir" in err[0] and "--out" in err[0]
    out = tmp_path / "bench"
    small = ["--models", "organism", "--batch_sizes", "1", "--new_tokens", "2", "--repeats", "1", "--warmup", "0",
             "--no_memory", "--score_models", "", "--configs", "plain_eager,plain_sdpa,dleaf_range",
             "--organism_shape", "text_hidden=32", "--organism_shape", "text_layers=2",
             "--organism_shape", "text_heads=4", "--paired_steps", "0"]
    assert call("bench.py", *small, "--output_dir", out) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"outputs: {out}"
    assert json.loads((out / "bench.json").read_text())["models"]["organism"]
    assert (out / "bench.md").is_file()


def test_the_study_says_what_its_overhead_and_correspondence_phases_do(tiny_organism, tmp_path, monkeypatch):
    from dleaf import study
    from dpo_link import suite

    model, processor = tiny_organism
    lines = []
    study.measure_overhead(study.StudyConfig(timing_steps=3, timing_warmup=0, timing_batch=2), model, processor,
                           say=lines.append)
    assert 2 <= len(lines) <= 6 and any("3 paired steps" in ln for ln in lines), lines
    seen = []

    def run_suite(out, progress=None, **inputs):
        for k in range(3):
            progress(f"phase {k}")
        raise StopIteration  # enough: the progress reached the study's say

    monkeypatch.setattr(suite, "run_suite", run_suite)
    step = script("study.py")["correspondence_suite"]()
    with pytest.raises(StopIteration):
        step(tmp_path, study.StudyConfig(), say=seen.append)
    assert seen == ["phase 0", "phase 1", "phase 2"]


def test_premise_scoring_says_how_far_it_is_on_stderr(tiny_organism, tmp_path, capsys):
    model, processor = tiny_organism
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    run = tmp_path / "run"
    assert call("evaluate.py", "--benchmark", "organism_caption", "--model", tmp_path / "m", "--splits",
                "adversarial", "--limit", "6", "--max_new_tokens", "12", "--no_progress", "--output_dir", run) == 0
    capsys.readouterr()
    assert call("premise_check.py", "--run_dir", run, "--n_bootstrap", "20", "--batch_size", "1",
                "--output_dir", tmp_path / "out") == 0
    captured = capsys.readouterr()
    progress = [ln for ln in captured.err.splitlines() if ln.startswith("[premise]")]
    assert 2 <= len(progress) <= 12 and any("6/6" in ln for ln in progress), captured.err
    assert "[premise]" not in captured.out


def test_the_entry_point_keeps_known_library_warnings_out(recwarn):
    def noisy(argv):
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
                      "`is_activation_checkpointing` instead.", FutureWarning)
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6. Use "
                      "`activation_checkpointing` instead.", FutureWarning)
        warnings.warn("Could not find a config file in tmp/tiny - will assume that the vocabulary was not "
                      "modified.", UserWarning)
        warnings.warn("something the user should see", UserWarning)

    assert cli.main(noisy, []) == 0
    assert [str(w.message) for w in recwarn.list] == ["something the user should see"]
    recwarn.clear()
    noisy([])  # the library itself filters nothing
    assert len(recwarn.list) == 4


def test_a_run_with_an_adapter_shows_no_library_deprecation_warning(tmp_path, capsys, recwarn):
    """Merging an adapter made transformers warn that `is_gradient_checkpointing` is deprecated (PEFT calls the old
    name), on every run with --adapter; the scripts' entry point keeps it out of the user's output."""
    assert call("evaluate.py", "--benchmark", "organism_caption", "--splits", "adversarial", "--limit", "1",
                "--max_new_tokens", "1", "--adapter", ROOT / "data" / "organism_dpo", "--no_progress",
                "--output_dir", tmp_path / "run") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"outputs: {tmp_path / 'run'}"
    assert [str(w.message) for w in recwarn.list if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
