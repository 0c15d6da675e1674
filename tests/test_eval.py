"""Tests for dleaf.eval (the evaluation harness; COCO CHAIR and POPE files are in test_eval_files.py): resume
after a kill, bad input refused before any model loads, sharded runs under accelerate launch, the method, knobs and
adapter really applied, per-item scores and paired comparisons, the comparison table."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dleaf import cli, generation
from dleaf import eval as ev
from dleaf.eval import coco
from margins import GREEDY_GAP, assert_greedy_gap

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_organism):
    return tiny_organism


def _args(tmp_path, name="run", **kw):
    base = dict(benchmark="organism_caption", output_dir=str(tmp_path / name), limit=3, max_new_tokens=6,
                batch_size=2, progress=False, splits=["indist", "adversarial"])
    base.update(kw)
    return ev.EvalArguments(**base)


@torch.no_grad()
def _assert_clear_greedy_choices(model, processor, args):
    """Runs that decode the same items in other batches (another process's shard, the rows a resumed run has left)
    pad them otherwise, so their logits differ by rounding: the files come out the same only where no greedy choice
    is within rounding of a tie. Each item of ``args``' benchmark, decoded alone, must choose every token by
    GREEDY_GAP."""
    from dleaf.models import model_inputs

    for item in ev.build_benchmark(args).items:
        inputs = model_inputs(processor, [item.prompt], [item.image()], model)
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        assert_greedy_gap(out.logits, GREEDY_GAP, what=f"greedy choices of {item.id}")


def _files(run_dir):
    return {f: (Path(run_dir) / f).read_bytes() for f in (ev.CONFIG, ev.GENERATIONS, ev.METRICS, ev.SCORES)}


# ----------------------------------------------------------------------------------------------------------------
# Protocols, rules, arguments
# ----------------------------------------------------------------------------------------------------------------


def test_protocol_files_load_and_are_recorded():
    for name in ev.benchmark_names():
        p = ev.load_protocol(name)
        assert p.benchmark == name and p.version >= 1 and len(p.sha256) == 64
        assert p.get("trailing_incomplete_sentence") in generation.SENTENCE_RULES
    with pytest.raises(ev.EvaluationInputError, match="protocol file not found"):
        ev.load_protocol("no_such_protocol")


def test_trailing_incomplete_sentence_rule():
    assert generation.apply_sentence_rule("a fork . a knife is on the", True, "drop") == "a fork ."
    assert generation.apply_sentence_rule("a fork . a knife is on the", False, "drop") == "a fork . a knife is on the"
    assert generation.apply_sentence_rule("no sentence end", True, "drop") == "no sentence end"
    assert generation.apply_sentence_rule("Done! And then", True, "keep") == "Done! And then"
    assert generation.apply_sentence_rule("Is it? yes", True, "drop") == "Is it?"


def test_unknown_benchmark_method_and_knob(tmp_path, tiny):
    with pytest.raises(ev.EvaluationInputError, match="unknown benchmark 'cocoa'"):
        ev.build_benchmark(ev.EvalArguments(benchmark="cocoa", output_dir=str(tmp_path)))
    with pytest.raises(ev.EvaluationInputError, match="unknown split 'train'"):
        ev.build_benchmark(_args(tmp_path, splits=["train"]))
    with pytest.raises(ValueError, match="no knob"):
        ev.run_evaluation(_args(tmp_path, method="dleaf", knobs=["gama=0.3"]), *tiny)
    with pytest.raises(ev.EvaluationInputError, match="decoding"):
        _args(tmp_path, decoding="nucleus")


# ----------------------------------------------------------------------------------------------------------------
# Runs: resume, bad files, methods, table
# ----------------------------------------------------------------------------------------------------------------


def test_resume_after_a_kill_gives_identical_files(tmp_path, tiny):
    model, processor = tiny
    full = ev.run_evaluation(_args(tmp_path, "full"), model, processor)
    assert full["sections"]["indist"]["n_captions"] == 3
    reference = _files(tmp_path / "full")
    rows = reference[ev.GENERATIONS].decode().splitlines(keepends=True)
    assert len(rows) == 6 and len({json.loads(r)["id"] for r in rows}) == 6

    # a kill in the middle of writing line 3: two whole lines and half a line on disk, no metrics yet
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ev.CONFIG).write_bytes(reference[ev.CONFIG])
    (killed / ev.GENERATIONS).write_text(rows[0] + rows[1] + rows[2][: len(rows[2]) // 2])
    ev.run_evaluation(_args(tmp_path, "killed"), model, processor)
    assert _files(killed) == reference

    # an exception out of generate after the first batch (two rows written), then a second run
    calls = {"n": 0}
    original = model.generate

    def dying_generate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*a, **k)

    model.generate = dying_generate
    try:
        with pytest.raises(KeyboardInterrupt):
            ev.run_evaluation(_args(tmp_path, "interrupted"), model, processor)
    finally:
        del model.generate
    assert len((tmp_path / "interrupted" / ev.GENERATIONS).read_text().splitlines()) == 2
    assert not (tmp_path / "interrupted" / ev.METRICS).exists()
    ev.run_evaluation(_args(tmp_path, "interrupted"), model, processor)
    assert _files(tmp_path / "interrupted") == reference

    # a run with nothing left to do rewrites nothing but metrics (same bytes)
    ev.run_evaluation(_args(tmp_path, "full"), model, processor)
    assert _files(tmp_path / "full") == reference


def test_bad_run_folder_input_loses_nothing(tmp_path, tiny):
    model, processor = tiny
    ev.run_evaluation(_args(tmp_path, "run"), model, processor)
    gen = tmp_path / "run" / ev.GENERATIONS
    lines = gen.read_text().splitlines(keepends=True)
    corrupt = lines[0] + "{not json\n" + "".join(lines[2:])
    gen.write_text(corrupt)
    with pytest.raises(ev.EvaluationInputError, match=r"generations\.jsonl, line 2"):
        ev.run_evaluation(_args(tmp_path, "run"), model, processor)
    assert gen.read_text() == corrupt
    gen.write_text("".join(lines))
    with pytest.raises(ev.EvaluationInputError, match="different run.*max_new_tokens"):
        ev.run_evaluation(_args(tmp_path, "run", max_new_tokens=7), model, processor)
    assert gen.read_text() == "".join(lines)
    foreign = json.dumps({"id": "replication/0", "text": "x"}) + "\n"
    gen.write_text("".join(lines) + foreign)
    with pytest.raises(ev.EvaluationInputError, match="line 7: id 'replication/0' is not an item"):
        ev.run_evaluation(_args(tmp_path, "run"), model, processor)


def test_organism_pope_methods_and_comparison_table(tmp_path, tiny):
    model, processor = tiny
    dirs = []
    for method, knobs in (("greedy", []), ("dleaf", ["gamma=0.3"]), ("pai", ["layer_start=1"]), ("spin", [])):
        args = _args(tmp_path, f"pope_{method}", benchmark="organism_pope", splits=["adversarial"],
                     negatives=["random", "adversarial"], limit=2, max_new_tokens=4, method=method, knobs=knobs)
        res = ev.run_evaluation(args, model, processor)
        assert list(res["sections"]) == ["adversarial/random", "adversarial/adversarial"]
        assert res["sections"]["adversarial/random"]["n"] == 4
        assert res["protocol"]["name"] == "organism_pope" and res["protocol"]["version"] == 2
        dirs.append(tmp_path / f"pope_{method}")
    ev.run_evaluation(_args(tmp_path, "captions"), model, processor)
    table = ev.comparison_table(dirs + [tmp_path / "captions"])
    assert "| run | method | section | protocol | n | CHAIR_s % |" in table
    assert "| accuracy % |" in table
    assert "| pope_dleaf | dleaf (gamma=0.3) | adversarial/random | organism_pope v2 * | 4 |" in table
    assert table.count("\n| captions | greedy |") == 2
    assert "Warning" not in table
    out = tmp_path / "table.md"
    sys_argv = ["--compare", *map(str, dirs), "--table_out", str(out)]
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import evaluate as script  # scripts/evaluate.py
    finally:
        sys.path.pop(0)
    assert cli.main(script.main, sys_argv) == 0
    assert out.read_text() == ev.comparison_table(dirs)
    assert cli.main(script.main, ["--benchmark", "nope", "--output_dir", str(tmp_path / "x")]) == 2


def test_sampling_is_independent_of_batching(tmp_path, tiny):
    model, processor = tiny
    a = ev.run_evaluation(_args(tmp_path, "s1", decoding="sample", seed=3, splits=["indist"]), model, processor)
    b = ev.run_evaluation(_args(tmp_path, "s2", decoding="sample", seed=3, splits=["indist"], batch_size=8),
                          model, processor)
    assert a["sections"] == b["sections"]
    assert (tmp_path / "s1" / ev.GENERATIONS).read_bytes() == (tmp_path / "s2" / ev.GENERATIONS).read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# accelerate launch: 2 processes == 1 process
# ----------------------------------------------------------------------------------------------------------------


def test_two_process_accelerate_run_equals_one_process(tmp_path, tiny):
    model, processor = tiny
    _assert_clear_greedy_choices(model, processor, ev.EvalArguments(benchmark="organism_caption", limit=3,
                                                                     max_new_tokens=6))
    ckpt = tmp_path / "tiny"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    common = ["scripts/evaluate.py", "--benchmark", "organism_caption", "--model", str(ckpt), "--limit", "3",
              "--max_new_tokens", "6", "--batch_size", "2", "--no_progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *common, "--output_dir", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    # accelerate 1.x starts a single process for "--cpu --num_processes 2"; two CPU processes need the multi-GPU
    # launcher with no GPU visible (docs/dpo.md)
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          *[a for a in common if a != "--no_progress"], "--output_dir", str(tmp_path / "two")],
                         cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[0/2]" in two.stderr and "[1/2]" in two.stderr  # two processes, each with its shard
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted([ev.CONFIG, ev.GENERATIONS, ev.METRICS, ev.SCORES])
    m = json.loads((tmp_path / "two" / ev.METRICS).read_text())
    assert set(m["sections"]) == {"indist", "adversarial", "replication"}
    assert not math.isnan(m["sections"]["indist"]["mean_length"])


def test_leftover_shards_are_merged_in_protocol_order(tmp_path, tiny):
    model, processor = tiny
    _assert_clear_greedy_choices(model, processor, _args(tmp_path))
    ev.run_evaluation(_args(tmp_path, "ref"), model, processor)
    reference = _files(tmp_path / "ref")
    rows = reference[ev.GENERATIONS].decode().splitlines(keepends=True)
    # a 2-process run killed before the merge: rank 0 wrote rows 0, 2 (and half of 4), rank 1 wrote row 1
    run = tmp_path / "shards"
    run.mkdir()
    (run / ev.CONFIG).write_bytes(reference[ev.CONFIG])
    (run / "generations.shard-0-of-2.jsonl").write_text(rows[0] + rows[2] + rows[4][:10])
    (run / "generations.shard-1-of-2.jsonl").write_text(rows[1])
    ev.run_evaluation(_args(tmp_path, "shards"), model, processor)
    assert _files(run) == reference
    assert not list(run.glob("generations.shard-*"))
    shutil.rmtree(run)


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_identical_files(tmp_path, tiny):
    import signal
    import time

    model, processor = tiny
    ckpt = tmp_path / "tiny"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    common = [sys.executable, "scripts/evaluate.py", "--benchmark", "organism_caption", "--model", str(ckpt),
              "--limit", "12", "--max_new_tokens", "12", "--batch_size", "1", "--no_progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([*common, "--output_dir", str(tmp_path / "ref")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    gen = tmp_path / "killed" / ev.GENERATIONS
    proc = subprocess.Popen([*common, "--output_dir", str(tmp_path / "killed")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not gen.exists() or len(gen.read_bytes().splitlines()) < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(gen.read_bytes().splitlines()) < 36 and not (tmp_path / "killed" / ev.METRICS).exists()
    again = subprocess.run([*common, "--output_dir", str(tmp_path / "killed")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _files(tmp_path / "killed") == _files(tmp_path / "ref")


# ----------------------------------------------------------------------------------------------------------------
# The method, its knobs and the adapter are really applied
# ----------------------------------------------------------------------------------------------------------------


def _texts(run_dir):
    return [json.loads(line)["raw"] for line in (Path(run_dir) / ev.GENERATIONS).read_text().splitlines()]


def test_method_and_knobs_change_the_generations(tmp_path, tiny):
    model, processor = tiny
    kw = dict(splits=["adversarial"], limit=4, max_new_tokens=8)
    ev.run_evaluation(_args(tmp_path, "greedy", **kw), model, processor)
    ev.run_evaluation(_args(tmp_path, "gamma0", method="dleaf", knobs=["gamma=0"], **kw), model, processor)
    ev.run_evaluation(_args(tmp_path, "spin", method="spin", knobs=["keep_ratio=0.25", "scale=0"], **kw), model,
                      processor)
    ev.run_evaluation(_args(tmp_path, "spin_default", method="spin", **kw), model, processor)
    greedy = _texts(tmp_path / "greedy")
    assert _texts(tmp_path / "gamma0") == greedy  # D-LEAF at zero strength decodes exactly like greedy ...
    assert _texts(tmp_path / "spin") != greedy  # ... a method with strength changes the replies ...
    assert _texts(tmp_path / "spin") != _texts(tmp_path / "spin_default")  # ... and so do its knobs
    config = json.loads((tmp_path / "spin" / ev.CONFIG).read_text())
    assert (config["method"], config["knobs"]) == ("spin", {"keep_ratio": 0.25, "scale": 0.0})
    # the command line reaches the run: repeated --knob, the --knobs form, dash aliases
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import evaluate as script
    finally:
        sys.path.pop(0)
    args = script.parse(["--benchmark", "organism_caption", "--method", "pai", "--knob", "alpha=5", "--knob",
                         "layer_start=0", "--output-dir", "x"])
    assert (args.method, args.knob_values(), args.output_dir) == ("pai", {"alpha": 5, "layer_start": 0}, "x")
    assert script.parse(["--knobs", "alpha=5", "layer_start=0"]).knobs == ["alpha=5", "layer_start=0"]


def test_an_adapter_changes_the_generations(tmp_path, tiny):
    from peft import LoraConfig, get_peft_model

    model, processor = tiny
    ckpt = tmp_path / "base"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    import copy

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    peft.save_pretrained(tmp_path / "lora")
    kw = dict(splits=["adversarial"], limit=4, max_new_tokens=8, model=str(ckpt))
    ev.run_evaluation(_args(tmp_path, "plain", **kw))
    ev.run_evaluation(_args(tmp_path, "adapted", adapter=str(tmp_path / "lora"), **kw))
    assert _texts(tmp_path / "adapted") != _texts(tmp_path / "plain")
    # the same replies as the PEFT model itself with the adapter merged
    merged = peft.merge_and_unload().eval()
    bench = ev.build_benchmark(_args(tmp_path, "x", **kw))
    mem = ev.evaluate(merged, processor, bench, max_new_tokens=8)
    assert [r["raw"] for r in mem["rows"]] == _texts(tmp_path / "adapted")
    assert json.loads((tmp_path / "adapted" / ev.CONFIG).read_text())["adapter"] == str(tmp_path / "lora")


# ----------------------------------------------------------------------------------------------------------------
# Every input checked before a model loads
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--knob", "gama=0.3", "--method", "dleaf"], "no knob.*gama"),
    (["--knob", "gamma=abc", "--method", "dleaf"], "gamma='abc' must be a number"),
    (["--knob", "gamma=1.5", "--method", "dleaf"], "gamma must lie in"),
    (["--knob", "gamma=0.3"], "method is greedy"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--limit", "0"], "--limit must be a positive integer"),
    (["--max_new_tokens", "-1"], "--max_new_tokens must be a positive integer"),
    (["--splits", "train"], "unknown split 'train'"),
    (["--coco_images", "x"], "--coco_images does not apply to benchmark organism_caption"),
    (["--model", "no/such/folder/"], "model folder not found"),
    (["--adapter", "nowhere"], "no adapter_config.json"),
    (["--decoding", "nucleus"], "unknown decoding"),
])
def test_bad_input_fails_before_any_model_loads(tmp_path, monkeypatch, capsys, extra, message):
    from dleaf import models

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load", no_loading)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import evaluate as script
    finally:
        sys.path.pop(0)
    code = cli.main(script.main, ["--benchmark", "organism_caption", "--output_dir", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and __import__("re").search(message, err), err
    assert "Traceback" not in err


def test_damaged_coco_image_is_refused_before_loading(tmp_path, write_coco):
    img_dir, inst, caps = write_coco(tmp_path)
    (img_dir / "COCO_val2014_000000000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ev.InputError, match="COCO_val2014_000000000001.jpg is not an image file"):
        coco.coco_chair_benchmark(ev.load_protocol("coco_chair"), img_dir, inst, caps, image_ids=[1, 2])


# ----------------------------------------------------------------------------------------------------------------
# Per-item scores, paired comparisons, resume message
# ----------------------------------------------------------------------------------------------------------------


def test_scores_and_paired_comparison_match_the_metrics(tmp_path, tiny, capsys):
    model, processor = tiny
    kw = dict(splits=["adversarial"], limit=6, max_new_tokens=10)
    a = ev.run_evaluation(_args(tmp_path, "a", **kw), model, processor)
    b = ev.run_evaluation(_args(tmp_path, "b", method="pai", knobs=["alpha=5"], **kw), model, processor)
    scores = ev.read_scores(tmp_path / "a")
    assert len(scores) == 6 and ev.caption_stats(scores)["chair_s"] == pytest.approx(
        a["sections"]["adversarial"]["chair_s"])
    assert ev.caption_stats(scores)["recall"] == pytest.approx(a["sections"]["adversarial"]["recall"], nan_ok=True)
    diff = ev.compare_runs(tmp_path / "a", tmp_path / "b", n_resamples=200)["adversarial"]
    for key in ("chair_s", "mean_length"):
        want = b["sections"]["adversarial"][key] - a["sections"]["adversarial"][key]
        assert diff[key]["diff"] == pytest.approx(want)
        assert diff[key]["low"] <= diff[key]["diff"] + 1e-12 and diff[key]["diff"] <= diff[key]["high"] + 1e-12
    table = ev.comparison_table([tmp_path / "a", tmp_path / "b"], paired=True, n_resamples=200)
    assert "difference from a on the same items" in table and " [" in table.splitlines()[3]
    # rerunning a finished run says so on stderr
    capsys.readouterr()
    ev.run_evaluation(_args(tmp_path, "a", **kw), model, processor)
    err = capsys.readouterr().err
    assert "resuming" in err and "6 of 6 done, nothing left to generate" in err


def test_every_json_the_harness_writes_is_strict(tmp_path, tiny):
    from dleaf.io import loads_strict

    model, processor = tiny
    ev.run_evaluation(_args(tmp_path, "r", splits=["adversarial"], limit=2, max_new_tokens=2), model, processor)
    m = loads_strict((tmp_path / "r" / ev.METRICS).read_text())
    assert m["sections"]["adversarial"]["n_captions"] == 2
    for name in (ev.CONFIG, ev.METRICS):
        loads_strict((tmp_path / "r" / name).read_text())
    for name in (ev.GENERATIONS, ev.SCORES):
        for line in (tmp_path / "r" / name).read_text().splitlines():
            loads_strict(line)


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_the_rerun_says_it_resumes(tmp_path, tiny):
    import signal
    import time

    model, processor = tiny
    ckpt = tmp_path / "tiny"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    common = [sys.executable, "scripts/evaluate.py", "--benchmark", "organism_caption", "--model", str(ckpt),
              "--limit", "12", "--max_new_tokens", "12", "--batch_size", "1", "--no_progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ref = subprocess.run([*common, "--output_dir", str(tmp_path / "ref")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    gen = tmp_path / "cut" / ev.GENERATIONS
    proc = subprocess.Popen([*common, "--output_dir", str(tmp_path / "cut")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and (not gen.exists() or len(gen.read_bytes().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; run the same command again to resume" in err and "Traceback" not in err
    again = subprocess.run([*common, "--output_dir", str(tmp_path / "cut")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "resuming" in again.stderr and "of 36 done" in again.stderr
    assert again.stdout.strip().splitlines()[-1] == f"outputs: {tmp_path / 'cut'}"
    assert _files(tmp_path / "cut") == _files(tmp_path / "ref")


def test_vcd_runs_through_the_harness(tiny):
    """VCD needs a logits processor in generate (dleaf.engine.generation_kwargs): through the one loop it changes
    the replies like any method."""
    model, processor = tiny
    bench = ev.load_benchmark("organism_caption", limit=4, splits=["adversarial"])
    greedy = [r["raw"] for r in ev.evaluate(model, processor, bench, max_new_tokens=8)["rows"]]
    vcd = ev.evaluate(model, processor, bench, generation_setting("vcd"), max_new_tokens=8)
    assert [r["raw"] for r in vcd["rows"]] != greedy
    assert set(vcd["sections"]) == {"adversarial"}


def generation_setting(method, **knobs):
    from dleaf.settings import Setting

    return Setting(method, knobs)
