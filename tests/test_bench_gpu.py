"""The GPU measurement's plumbing, tested on a CPU: presets (``llava7b``, ``tiny``), the dtype and device of the model
and inputs, the equivalence checks (gamma 0 = plain decoding, the compiled step = the eager step), the paired ratios'
bootstrap interval, the summary of a run a time limit cut short, and ``scripts/gpu_check.sh`` rehearsed with the
tiny preset. No timing assertions."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dleaf import bench
from dleaf.bench import summary

ROOT = Path(__file__).resolve().parents[1]
# the tiny preset without the compiled configuration (its first call compiles for tens of seconds; the rehearsal
# below and the engine's tests cover it)
FAST = tuple(c for c in bench.GPU_CONFIGS if c != "dleaf_compiled")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _script():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _parse(argv):
    script = _script()
    ap = script.build_parser()
    bench.apply_preset_defaults(ap, argv)
    return ap.parse_args(argv)


def test_presets_set_every_field_through_a_flag_and_flags_win():
    for name in bench.PRESETS:
        args = _parse(["--preset", name])
        for field, value in bench.PRESETS[name].items():
            if field == "llava_shape":
                assert bench.preset_llava_shape(name) == value
            elif field == "memory":
                assert args.no_memory is (not value)
            else:
                assert getattr(args, field) == value, field
    args = _parse(["--preset", "llava7b", "--device", "cpu", "--batch_sizes", "1", "--dtype", "float32"])
    assert (args.device, args.batch_sizes, args.dtype, args.new_tokens) == ("cpu", (1,), "float32", 64)
    # a later --preset wins, as argparse's own last-flag-wins
    assert _parse(["--preset", "llava7b", "--preset", "tiny"]).new_tokens == bench.PRESETS["tiny"]["new_tokens"]
    assert _parse([]).device == "cpu" and _parse([]).dtype == "float32"  # no preset: the old defaults
    with pytest.raises(SystemExit):
        _parse(["--preset", "opera"])
    with pytest.raises(ValueError, match="unknown preset"):
        bench.preset("opera")


def test_llava7b_preset_is_llava_1_5_7b_shaped():
    cfg = bench.preset("llava7b")
    assert (cfg.device, cfg.dtype, cfg.batch_sizes, cfg.new_tokens) == ("cuda", "bfloat16", (1, 8), 64)
    assert cfg.paired_warmup + cfg.paired_steps == cfg.new_tokens - 1  # the paired steps are the 63 cached steps
    assert set(cfg.configs) == {"plain_sdpa", "plain_eager", "dleaf", "dleaf_sdpa", "dleaf_compiled", "pai", "spin",
                                "vcd"}
    assert bench.plan_of("dleaf", 32, cfg).options == {}  # every layer watched, eager
    assert bench.plan_of("dleaf_sdpa", 32, cfg).options == {"unwatched": "sdpa"}
    assert bench.plan_of("dleaf_compiled", 32, cfg).options == {"unwatched": "sdpa", "compile": True}
    shape = cfg.llava_shape
    assert (shape.text_layers, shape.text_heads, shape.text_hidden, shape.text_intermediate, shape.vocab_size,
            shape.image_tokens) == (32, 32, 4096, 11008, 32000, 576)
    # built on the meta device: no memory, but every parameter's shape (LLaVA-1.5-7B: about 6.7 B in the decoder)
    model, processor = bench.build_llava_shaped(shape, device="meta", dtype=torch.bfloat16)
    text = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n)
    assert 6.7e9 < text < 6.8e9 and next(model.parameters()).dtype == torch.bfloat16
    from PIL import Image

    batch = bench.models.caption_batch(processor, [Image.new("RGB", (336, 336))], "Describe this image.")
    assert 600 <= batch["input_ids"].shape[1] <= 700


def test_dtype_reaches_the_weights_and_the_pixels():
    cfg = bench.preset("tiny", dtype="bfloat16", new_tokens=3)
    model, inputs, desc = bench.build_model_and_inputs("llava_shaped", cfg, [1, 2])
    assert desc["dtype"] == "bfloat16" and desc["device"] == "cpu" and desc["vocab"] == 256
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert inputs[2]["pixel_values"].dtype == torch.bfloat16 and inputs[2]["input_ids"].dtype == torch.long
    for config in ("plain_eager", "dleaf", "vcd"):
        tokens, _ = bench.run_config(model, inputs[2], config, cfg)
        assert tokens.shape == (2, 3)
    with pytest.raises(ValueError, match="unknown dtype"):
        bench.BenchConfig(dtype="int8")


def test_equivalence_checks_pass_and_catch_a_difference():
    cfg = bench.preset("tiny", configs=FAST)
    model, inputs, _ = bench.build_model_and_inputs("llava_shaped", cfg, [2])
    checks = bench.equivalence_checks(model, inputs[2], cfg, log=lambda *_: None)
    assert set(checks) == {"gamma0_dleaf_vs_plain_eager", "gamma0_dleaf_sdpa_vs_plain_sdpa", "all_passed"}
    exact = checks["gamma0_dleaf_vs_plain_eager"]
    assert exact["bit_exact"] and exact["argmax_equal"] and exact["passed"] and checks["all_passed"]
    assert exact["steps"] == cfg.check_steps and exact["batch"] == 2
    # the same comparison fails for a method that changes the logits: D-LEAF fusing everywhere at full strength
    tokens, ref = bench.forced_logits(model, inputs[2], bench.plan_of("plain_eager", 4, cfg), cfg.check_steps)
    strong = bench.with_knobs(bench.plan_of("dleaf", 4, cfg), gamma=1.0, localization="everywhere")
    _, other = bench.forced_logits(model, inputs[2], strong, cfg.check_steps, tokens)
    row = bench.compare(ref, tokens, other, rtol=1e-6)
    assert not row["bit_exact"] and not row["passed"] and row["max_abs_logit_diff"] > 0
    # teacher forcing: the forced decoding follows the given tokens whatever it would choose
    forced, _ = bench.forced_logits(model, inputs[2], strong, cfg.check_steps, tokens.flip(0))
    assert torch.equal(forced, tokens.flip(0))


def test_bootstrap_interval_of_the_paired_ratio():
    base = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98]
    config = [2 * b for b in base]  # exactly twice as slow at every step: the interval collapses on 0.5
    assert bench.bootstrap_ratio(config, base, 500) == pytest.approx([0.5, 0.5])
    noisy = [b * f for b, f in zip(config, (1.0, 1.3, 0.8, 1.1, 0.9, 1.2, 1.0, 0.95))]
    lo, hi = bench.bootstrap_ratio(noisy, base, 500, seed=1)
    point = bench.measure.median(base) / bench.measure.median(noisy)
    assert lo <= point <= hi and lo < hi
    assert bench.bootstrap_ratio(noisy, base, 500, seed=1) == [lo, hi]  # seeded
    assert bench.bootstrap_ratio(noisy, base, 0) is None and bench.bootstrap_ratio([1.0], [1.0], 100) is None


def _partial_result(checks_pass=True):
    cfg = bench.preset("tiny").to_dict()
    row = {"steps": 4, "batch": 1, "max_abs_logit_diff": 0.0, "logit_scale": 1.0, "tolerance": 1e-4,
           "bit_exact": True, "argmax_equal": True, "argmax_agreement": 1.0, "passed": checks_pass}
    return {"bench_config": cfg, "environment": {"torch": torch.__version__}, "models": {"llava_shaped": {
        "description": {"name": "llava_shaped", "source": "random", "layers": 4, "heads": 4, "hidden": 32,
                        "image_tokens": 16, "prompt_tokens": 56, "dtype": "float32", "device": "cpu"},
        "loop_equals_generate": True,
        "checks": {"gamma0_dleaf_vs_plain_eager": row, "all_passed": checks_pass},
        "ops_per_step": {"plain_eager": 10},
    }}}


@pytest.mark.parametrize("case", ["cut_short", "failed_check", "failed_status"])
def test_summary_of_a_run_that_did_not_pass(tmp_path, case):
    result = _partial_result(checks_pass=case != "failed_check")
    if case != "cut_short":
        entry = result["models"]["llava_shaped"]
        entry.update(paired={}, decoding={}, scoring={})
    (tmp_path / "bench.json").write_text(json.dumps(result))
    status = 130 if case == "failed_status" else 0
    assert summary.main([str(tmp_path), "--bench_status", str(status)]) == 1
    text = (tmp_path / "checks.md").read_text()
    assert "NOT passed" in text and "Equivalence checks" in (tmp_path / "bench.md").read_text()
    if case == "cut_short":
        assert "missing paired, decoding, scoring" in text
    entry = result["models"]["llava_shaped"]
    entry.update(paired={}, decoding={}, scoring={})
    result["models"]["llava_shaped"]["checks"]["gamma0_dleaf_vs_plain_eager"]["passed"] = True
    (tmp_path / "bench.json").write_text(json.dumps(result))
    assert summary.main([str(tmp_path)]) == 0
    assert summary.main([str(tmp_path / "nothing")]) == 1  # no bench.json


STUB = """#!/usr/bin/env bash
# stands in for python: records each call's arguments, fails the benchmark with $STUB_STATUS
echo "$*" >> "$STUB_LOG"
case "$1" in scripts/bench.py) exit "${STUB_STATUS:-0}" ;; esac
exit 0
"""


@pytest.mark.parametrize("case", ["defaults", "output_dir", "output_dir=", "failed"])
def test_gpu_check_script_runs_the_preset_then_the_summary(tmp_path, case):
    """The shell part of scripts/gpu_check.sh, with a stub interpreter: the benchmark is called with the GPU preset
    first and the given flags after it (a later flag wins), the output folder is --output_dir when given, else
    $OUT, and the summary receives the benchmark's exit status."""
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls"
    extra = {"defaults": [], "output_dir": ["--output_dir", "elsewhere"], "output_dir=": ["--output-dir=other"],
             "failed": ["--device", "cpu", "--preset", "tiny"]}[case]
    env = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path / "out"), "STUB_LOG": str(log),
           "STUB_STATUS": "3" if case == "failed" else "0"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *extra], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr  # the stub's summary passes
    bench_call, summary_call = log.read_text().splitlines()
    out = {"defaults": str(tmp_path / "out"), "failed": str(tmp_path / "out"), "output_dir": "elsewhere",
           "output_dir=": "other"}[case]
    assert bench_call == " ".join(["scripts/bench.py", "--preset", "llava7b", "--device", "cuda", "--dtype",
                                   "bfloat16", "--output_dir", out, *extra])
    status = "3" if case == "failed" else "0"
    assert summary_call == f"-m dleaf.bench.summary {out} --bench_status {status}"
    assert f"exited with status {status}" in proc.stderr


def test_gpu_check_rehearsal_in_process_without_compiling(tmp_path):
    """What the prepared command runs, in this process, on the tiny preset without the compiled configuration
    (fast): every phase, then the summary that passes."""
    out = tmp_path / "gpu"
    _script().main(["--preset", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--configs", ",".join(FAST),
                    "--batch_sizes", "2", "--score_batch_sizes", "2", "--output_dir", str(out)])
    assert summary.main([str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    entry = result["models"]["llava_shaped"]
    assert result["bench_config"]["dtype"] == "bfloat16" and entry["description"]["dtype"] == "bfloat16"
    assert entry["checks"]["all_passed"] and entry["loop_equals_generate"]
    rows = entry["paired"]["2"]
    assert set(rows) == set(FAST) - set(bench.BASELINES)
    for row in rows.values():
        lo, hi = row["ratio_ci_to_plain_eager"]
        assert lo <= hi and len(row["raw_s"]["plain_eager"]) == bench.PRESETS["tiny"]["paired_steps"]
    assert set(entry["decoding"]["2"]["configs"]) == set(FAST)
    assert "Overall: passed." in (out / "checks.md").read_text()
    assert "| dleaf |" in (out / "bench.md").read_text() and "95% CI" in (out / "bench.md").read_text()


@pytest.mark.slow
def test_gpu_check_rehearsal(tmp_path):
    """``bash scripts/gpu_check.sh --device cpu --preset tiny``: the whole prepared command, the compiled
    configuration and both compiled-step checks included (about a minute on a shared CPU, most of it compiling)."""
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--preset", "tiny",
                           "--threads", "1", "--output_dir", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Overall: passed." in proc.stdout and "Overall: passed." in (out / "checks.md").read_text()
    result = json.loads((out / "bench.json").read_text())
    assert result["bench_config"]["dtype"] == "bfloat16"  # the script's own --dtype, kept beside --preset tiny
    entry = result["models"]["llava_shaped"]
    assert set(entry["checks"]) == {"gamma0_dleaf_vs_plain_eager", "gamma0_dleaf_sdpa_vs_plain_sdpa",
                                    "compiled_vs_eager_step", "compiled_vs_eager_step_fusing", "all_passed"}
    assert entry["checks"]["compiled_vs_eager_step_fusing"]["corrections_made"]  # the fusion was compared
    assert entry["checks"]["gamma0_dleaf_vs_plain_eager"]["bit_exact"]
    assert set(entry["paired"]) == {"1", "8"} and "dleaf_compiled" in entry["paired"]["8"]


def test_loop_against_generate_reports_where_they_part(monkeypatch):
    """A difference from generate is reported with the step and the loop's top-2 gap there; the summary accepts it
    only as a tie within the dtype's rounding."""
    cfg = bench.preset("tiny", new_tokens=3)
    model, inputs, _ = bench.build_model_and_inputs("llava_shaped", cfg, [1])
    row = bench.loop_vs_generate(model, inputs[1], cfg)
    assert row == {"equal": True, "first_difference": None, "gap_at_difference": None, "tie": False}
    real = bench.measure.generate_tokens

    def off_by_one(model, inputs, n):
        tokens = real(model, inputs, n).clone()
        tokens[:, 2] = (tokens[:, 2] + 1) % 256
        return tokens

    monkeypatch.setattr(bench.measure, "generate_tokens", off_by_one)
    row = bench.loop_vs_generate(model, inputs[1], cfg)
    assert not row["equal"] and row["first_difference"] == 2 and row["gap_at_difference"] >= 0
    assert isinstance(row["tie"], bool)
    result = _partial_result()
    result["models"]["llava_shaped"].update(loop_equals_generate=False, loop_vs_generate={**row, "tie": False})
    (name, check, passed, detail), = [r for r in summary.check_rows(result) if r[1] == "loop_equals_generate"]
    assert not passed and "part at step 2" in detail and "no tie" in detail
    result["models"]["llava_shaped"]["loop_vs_generate"]["tie"] = True
    assert [r for r in summary.check_rows(result) if r[1] == "loop_equals_generate"][0][2]
