"""Smoke tests of the performance benchmark (tiny shapes, one repeat, a few tokens). No timing assertions: speed is
measured by scripts/bench.py, never by tests."""

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from dleaf import bench, engine
from dleaf.organism import build, world
from margins import GREEDY_GAP, assert_greedy_gap

TINY_ORGANISM = dict(text_hidden=32, text_layers=3, text_heads=4, text_intermediate=64)
TINY_LLAVA = bench.LlavaShape(image_size=56, text_hidden=32, text_layers=4, text_heads=4, text_intermediate=64)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and on a shared CPU extra threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_cfg(**kw):
    base = dict(batch_sizes=(1, 2), new_tokens=2, repeats=1, warmup=0, memory=False, score_batch_sizes=(1,),
                score_tokens=3, score_repeats=1, check_tokens=3, paired_steps=2, paired_warmup=1, llava_shape=TINY_LLAVA,
                organism_shape=TINY_ORGANISM)
    return bench.BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def padded(make_batch):
    """A tiny organism and a left-padded batch of three different prompts."""
    shape = build.OrganismShape(**TINY_ORGANISM)
    processor = build.build_processor(shape)
    model = build.build_model(processor.tokenizer, shape, seed=0).eval()
    prompts = [world.CAPTION_PROMPTS[0], world.QUESTION_TEMPLATE.format(obj="fork"), world.CAPTION_PROMPTS[1]]
    batch = make_batch(processor, world.scenes("adversarial", 3), prompts)
    assert (batch["attention_mask"] == 0).any()
    return model, batch


# every configuration but the compiled one, whose first call compiles for tens of seconds (tested in test_engine)
UNCOMPILED = tuple(c for c in bench.CONFIGS if c != "dleaf_compiled")


def row_config(raw: dict) -> str:
    """The configuration of a paired row: the one of its three timed decodings that is not a baseline."""
    (config,) = set(raw) - set(bench.BASELINES)
    return config


def test_json_has_every_configuration_and_the_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.run_benchmark(_tiny_cfg(batch_sizes=(1,), configs=UNCOMPILED), out, log=lambda *_: None)
    on_disk = json.loads(out.read_text())
    assert on_disk["models"].keys() == result["models"].keys() == set(bench.MODELS)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file
    for name, entry in on_disk["models"].items():
        assert entry["loop_equals_generate"] is True
        assert set(entry["ops_per_step"]) == set(UNCOMPILED) and entry["cost_model"]["step_macs"] > 0
        assert entry["description"]["image_tokens"] > 0
        assert set(entry["decoding"]) == {"1"}
        for batch in entry["decoding"].values():
            assert set(batch["configs"]) == set(UNCOMPILED)
            for config, row in batch["configs"].items():
                for base in bench.BASELINES:
                    for metric in ("decode", "e2e"):
                        assert math.isfinite(row[f"{metric}_ratio_to_{base}"]) and row[f"{metric}_ratio_to_{base}"] > 0
                assert row["repeats"] == 1
            assert batch["configs"]["plain_eager"]["decode_ratio_to_plain_eager"] == 1.0
        score = entry["scoring"]["1"]
        assert score["speedup"] > 0 and score["max_abs_logprob_diff"] < 1e-4  # one pass == step by step
        paired = entry["paired"]["1"]
        assert set(paired) == set(UNCOMPILED) - set(bench.BASELINES)
        for row in paired.values():  # the ratios are those of the medians of the raw per-step times
            raw = row["raw_s"]
            assert all(len(raw[k]) == 2 for k in raw)
            for base in bench.BASELINES:
                assert row[f"ratio_to_{base}"] == pytest.approx(statistics.median(raw[base])
                                                                / statistics.median(raw[row_config(raw)]))
        cached = score["cached"]
        assert cached["speedup"] > 0 and cached["prompt_cache_s"] > 0
        assert cached["max_abs_logprob_diff"] < 1e-4 and cached["max_abs_diff_to_one_pass"] < 1e-4
    assert on_disk["models"]["llava_shaped"]["description"]["image_tokens"] == (56 // 14) ** 2
    assert "plain_eager" in bench.format_report(on_disk) and "| dleaf |" in bench.markdown_tables(on_disk)
    assert "after a cached prompt" in bench.format_report(on_disk) and "PromptCache" in bench.markdown_tables(on_disk)


@torch.no_grad()
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_manual_loop_equals_generate_for_plain_greedy(padded, attention):
    model, batch = padded
    bench.set_text_attention(model, attention)
    chosen_from = []
    ours, times = bench.greedy_loop(model, [batch], 5, lambda logits: chosen_from.append(logits[0]) or logits[0])
    assert_greedy_gap(chosen_from, GREEDY_GAP)  # generate computes the logits otherwise: no choice may be a tie
    assert torch.equal(ours, bench.generate_tokens(model, batch, 5))
    assert set(times) == {"prefill_s", "decode_s"}


@torch.no_grad()
def test_contrastive_baseline_with_alpha_zero_equals_plain_greedy(padded):
    model, batch = padded
    bench.set_text_attention(model, "sdpa")
    plain, _ = bench.greedy_loop(model, [batch], 5)
    noised = {**batch, "pixel_values": bench.noised_pixels(batch["pixel_values"], 500)}
    zero, _ = bench.greedy_loop(model, [batch, noised], 5, bench.contrastive_logits(alpha=0.0, beta=0.1))
    assert torch.equal(zero, plain)
    strong, _ = bench.greedy_loop(model, [batch, noised], 5, bench.contrastive_logits(alpha=5.0, beta=0.0))
    assert strong.shape == plain.shape


@torch.no_grad()
@pytest.mark.parametrize("config", ["dleaf", "dleaf_range", "pai", "spin", "vcd"])
def test_paired_stepper_decodes_what_the_uninterrupted_loop_decodes(padded, config):
    """The paired comparison attaches a method only while it steps; its decoding must be the loop's, with the
    method's running state carried across the turns."""
    model, batch = padded
    cfg = _tiny_cfg()
    expected, _ = bench.run_config(model, batch, config, cfg, new_tokens=6)
    stepper = bench.Stepper(model, batch, config, cfg)
    other = bench.Stepper(model, batch, "plain_sdpa", cfg)  # another decoding takes turns with it
    for _ in range(5):
        stepper.step(), other.step()
    assert torch.equal(torch.stack(stepper.tokens, dim=1), expected)
    if config.startswith("dleaf"):
        count = stepper.iv.running_statistics()["count"]  # (L, B): active positions folded into the statistics
        watched = sorted(stepper.iv.watched)
        assert (count[watched] == 6).all() and not engine.attached_interventions()  # detached between turns


def test_memory_rows_and_ratios():
    cfg = _tiny_cfg(models=("organism",), batch_sizes=(1,))
    mem = {c: bench.memory_child({"model": "organism", "batch": 1, "config": c, "cfg": cfg.to_dict()})
           for c in ("plain_eager", "plain_sdpa", "dleaf")}
    mem = bench.memory_ratios(mem)
    for row in mem.values():
        assert row["peak_mb"] >= row["baseline_mb"] > 0 and row["extra_mb"] >= 0
        assert {f"peak_ratio_to_{b}" for b in bench.BASELINES} <= row.keys()
    assert mem["plain_eager"]["peak_ratio_to_plain_eager"] == 1.0
    # the subprocess path (one fresh process) reports the same fields
    sub = bench.measure_memory_cpu("organism", 1, "dleaf", cfg)
    assert sub.keys() == mem["dleaf"].keys() - {f"{k}_ratio_to_{b}" for k in ("peak", "extra") for b in bench.BASELINES}


def test_bad_configuration_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown configuration"):
        bench.BenchConfig(configs=("plain_eager", "plain_sdpa", "opera"))
    with pytest.raises(ValueError, match="plain_sdpa"):
        bench.BenchConfig(configs=("plain_eager", "dleaf"))


def test_cli_runs_and_writes_json(tmp_path):
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "b.json"
    script.main(["--models", "organism", "--batch_sizes", "1", "--new_tokens", "2", "--repeats", "1", "--warmup", "0",
                 "--no_memory", "--score_models", "", "--configs", "plain_eager,plain_sdpa,dleaf_range",
                 "--organism_shape", "text_hidden=32", "--organism_shape", "text_layers=3",
                 "--organism_shape", "text_heads=4", "--out", str(out)])
    rows = json.loads(out.read_text())["models"]["organism"]["decoding"]["1"]["configs"]
    assert set(rows) == {"plain_eager", "plain_sdpa", "dleaf_range"}


def test_each_configuration_plans_one_setting():
    """A configuration is a :class:`dleaf.settings.Setting` (labelled with its name) plus the engine's options and the
    attention implementation; method_of is the same plan as a tuple."""
    cfg = bench.BenchConfig(dleaf_range=(0.5, 1.0))
    plain = bench.plan_of("plain_sdpa", 8, cfg)
    assert (plain.attention, plain.setting.attaches, plain.options) == ("sdpa", False, {})
    assert bench.plan_of("plain_eager", 8, cfg).attention == "eager"
    ranged = bench.plan_of("dleaf_range", 8, cfg)
    assert ranged.setting.method == "dleaf" and ranged.setting.label == "dleaf_range"
    assert ranged.setting.knob_dict == {"layer_start": 4, "layer_end": 8} and ranged.options == {"unwatched": "sdpa"}
    # a range starting past a one-layer model's last layer starts at its last layer
    assert bench.plan_of("dleaf_range", 1, cfg).setting.knob_dict == {"layer_start": 0, "layer_end": 1}
    assert bench.plan_of("dleaf_compiled", 8, cfg).options == {"unwatched": "sdpa", "compile": True}
    vcd = bench.plan_of("vcd", 8, cfg)
    assert vcd.attention == "sdpa" and vcd.setting.knob_dict["alpha"] == cfg.vcd_alpha
    assert bench.plan_of("pai", 8, cfg).attention == "eager"
    assert bench.method_of("dleaf_range", 8, cfg) == ("eager", "dleaf", {"layer_start": 4, "layer_end": 8,
                                                                           "unwatched": "sdpa"})
    assert bench.method_of("plain_sdpa", 8, cfg) == ("sdpa", None, {})
    with pytest.raises(ValueError, match="unknown configuration"):
        bench.plan_of("opera", 8, cfg)
