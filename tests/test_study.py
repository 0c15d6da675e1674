"""Tests for dleaf.study: the claims table by hand, bad configurations, the organism study end to end (slow), and
the real-checkpoint path on a saved tiny model with COCO and POPE fixtures, an adapter and preference pairs."""

import json
import sys
from pathlib import Path

import pytest

from dleaf import study as dstudy

ROOT = Path(__file__).resolve().parents[1]


def _metrics(chair_g, chair_d, acc_g, acc_d):
    cap = lambda c: {"sections": {"adversarial": {"kind": "caption", "chair_s": c, "recall": 0.5}}}
    pope = lambda a: {"sections": {"adversarial/adversarial": {"kind": "yesno", "accuracy": a, "f1": a}}}
    return {("organism_caption", "greedy"): cap(chair_g), ("organism_caption", "dleaf"): cap(chair_d),
            ("organism_pope", "greedy"): pope(acc_g), ("organism_pope", "dleaf"): pope(acc_d)}


def test_claims_table_computes_relative_chair_and_pope_changes():
    rows, md = dstudy.claims_table(_metrics(0.40, 0.20, 0.80, 0.85), {"dleaf_over_greedy_throughput": 0.97,
                                                                        "batch": 8}, None)
    assert "-50.0% relative" not in md and "+50.0% relative" in md  # (0.40 - 0.20) / 0.40
    assert [r["agrees"] for r in rows] == [True, True, True]
    rows, md = dstudy.claims_table(_metrics(0.40, 0.40, 0.80, 0.80), {"dleaf_over_greedy_throughput": 0.5,
                                                                        "batch": 8}, None)
    assert [r["agrees"] for r in rows] == [False, False, False] and "+0.0% relative" in md
    assert "accuracy +0.0 points" in md


def test_study_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_images"):
        dstudy.StudyConfig(n_images=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            dstudy.StudyConfig(seed=bad)


def test_the_seed_reaches_the_overhead_interval_and_the_correspondence_suite(tiny_organism, monkeypatch, tmp_path):
    import runpy

    import numpy as np

    from dleaf import bench

    model, processor = tiny_organism
    rng = np.random.default_rng(0)
    greedy, steered = list(0.01 + 0.002 * rng.random(30)), list(0.011 + 0.002 * rng.random(30))

    def bench_paired(model, inputs, cfg, log=None):
        (n,) = inputs
        return {str(n): {"dleaf": {"raw_s": {"plain_eager": greedy, "plain_sdpa": greedy, "dleaf": steered}}}}

    monkeypatch.setattr(bench, "bench_paired", bench_paired)
    runs = {s: dstudy.measure_overhead(dstudy.StudyConfig(timing_steps=30, timing_batch=2, seed=s), model, processor)
            for s in (0, 1)}
    assert runs[0]["interval"] != runs[1]["interval"]  # the bootstrap draws follow the seed
    assert dstudy.measure_overhead(dstudy.StudyConfig(timing_steps=30, timing_batch=2, seed=0), model,
                                   processor)["interval"] == runs[0]["interval"]
    seen = {}
    import dpo_link.suite

    monkeypatch.setattr(dpo_link.suite, "study_step", lambda out, **kw: seen.update(kw))
    step = runpy.run_path(str(ROOT / "scripts" / "study.py"), run_name="script")["correspondence_suite"]()
    step(tmp_path, dstudy.StudyConfig(seed=7))
    assert seen["seed"] == 7


def test_study_config_names_what_a_real_checkpoint_needs(tmp_path):
    with pytest.raises(ValueError, match="coco_images, coco_instances, pope_images, pope_files"):
        dstudy.StudyConfig(model="llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ValueError, match="coco_images given, but the study's model is the organism"):
        dstudy.StudyConfig(coco_images="val2014")
    full = dict(model="m", coco_images="i", coco_instances="a.json", pope_files=("p.json",), pope_images="i")
    with pytest.raises(ValueError, match="preference_data"):
        dstudy.StudyConfig(**full, adapter=str(tmp_path))
    with pytest.raises(ValueError, match="adapter_config.json"):
        dstudy.StudyConfig(**full, adapter=str(tmp_path), correspondence=False)
    cfg = dstudy.StudyConfig(**full)  # no adapter: no DPO rows
    assert [s.label for s in cfg.settings] == ["greedy", "pai", "spin", "dleaf"] and cfg.images is None
    assert cfg.benchmarks == ("coco_chair", "pope_file")
    assert [s.label for s in dstudy.StudyConfig().settings] == ["greedy", "pai", "spin", "dleaf", "dleaf_learned",
                                                                "dpo", "dleaf_dpo"]
    assert dstudy.StudyConfig().settings[4].knob_dict == {}  # the organism's shipped detector, by default
    det = _tiny_detector(tmp_path)
    with_det = dstudy.StudyConfig(**full, detector=str(det))
    assert [s.label for s in with_det.settings] == ["greedy", "pai", "spin", "dleaf", "dleaf_learned"]
    assert with_det.settings[4].method == "dleaf_learned" and with_det.settings[4].knob_dict == {"detector": str(det)}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="--detector: .*bad.json.*not a version-1 detector file"):
        dstudy.StudyConfig(**full, detector=str(tmp_path / "bad.json"))


def _tiny_detector(tmp_path, model=None):
    """A detector file for the tiny organism (coefficients fitted on random features: only its identity matters)."""
    import numpy as np

    from dleaf import detect
    from tiny_organisms import build_tiny_organism

    model = model if model is not None else build_tiny_organism(0)[0]
    heads = model.config.text_config.num_attention_heads
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, len(detect.feature_names([0], heads))))
    return detect.fit(x, (x[:, 0] > 1).astype(int), [0], heads, detect.model_identity(model)).save(
        tmp_path / "tiny_detector.json")


def test_claims_table_averages_pope_question_sets():
    pope = lambda a: {"sections": {"random": {"accuracy": a, "f1": a}, "adversarial": {"accuracy": a - 0.1,
                                                                                      "f1": a - 0.2}}}
    metrics = {("pope_file", "greedy"): pope(0.80), ("pope_file", "dleaf"): pope(0.83)}
    rows, md = dstudy.claims_table(metrics, None, None, ("coco_chair", "pope_file"), "m")
    assert "accuracy +3.0 points, F1 +3.0 points (mean of 2 question sets)" in md and rows[0]["agrees"]
    metrics[("pope_file", "dleaf_learned")] = pope(0.78)  # judged for the setting named by label
    rows, md = dstudy.claims_table(metrics, None, None, ("coco_chair", "pope_file"), "m", label="dleaf_learned")
    assert "accuracy -2.0 points, F1 -2.0 points (mean of 2 question sets)" in md and not rows[0]["agrees"]


@pytest.mark.slow
def test_study_runs_end_to_end_and_resumes(tmp_path):
    cfg = dstudy.StudyConfig(n_images=3, timing_steps=4, timing_warmup=1, timing_batch=2, correspondence=False)
    first = dstudy.run_study(tmp_path, cfg, progress=False, say=lambda m: None)
    assert len(first["metrics"]) == len(cfg.settings) * len(dstudy.BENCHMARKS) == 14
    assert [r["claim"] for r in first["claims_dleaf_learned"]] == [dstudy.CLAIMS["chair"], dstudy.CLAIMS["pope"]]
    assert "## The same claims for D-LEAF's fusion at a learned localization" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.md").is_file() and (tmp_path / "methods.png").stat().st_size > 1000
    (tmp_path / "report.json").unlink()
    second = dstudy.run_study(tmp_path, cfg, progress=False, say=lambda m: None)
    assert json.dumps(first["claims"]) == json.dumps(second["claims"])
    same = lambda x: json.dumps(x, sort_keys=True)  # NaN-safe: NaN != NaN, but serialises the same
    assert same(first["metrics"]) == same(second["metrics"])
    fresh = dstudy.run_study(tmp_path / "again", cfg, progress=False, say=lambda m: None)
    assert same(fresh["metrics"]["organism_caption/dleaf"]["sections"]) == \
        same(first["metrics"]["organism_caption/dleaf"]["sections"])  # seeded: a fresh run gives the same numbers


@pytest.fixture()
def real_target(tmp_path, tiny_organism, write_coco, write_pope):
    """A saved tiny checkpoint folder, a LoRA adapter trained on it (random weights), COCO and POPE fixtures, and
    preference pairs on disk: everything the real-checkpoint study reads."""
    from datasets import DatasetDict
    from peft import LoraConfig, get_peft_model

    from dpo_link import pairs
    from dpo_link.data import preference_dataset

    model, processor = tiny_organism
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    lora = get_peft_model(type(model).from_pretrained(ckpt),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    rows = pairs.organism_examples(pairs.OrganismPairConfig(n=6, world_seed=pairs.EVAL_WORLD_SEED))
    DatasetDict({"test": preference_dataset(rows)}).save_to_disk(tmp_path / "prefs")
    img_dir, inst, caps = write_coco(tmp_path)
    pope, pope_dir = write_pope(tmp_path)
    return dict(model=str(ckpt), adapter=str(tmp_path / "adapter"), coco_images=str(img_dir),
                coco_instances=str(inst), coco_captions=str(caps), pope_files=(str(pope),), pope_images=str(pope_dir),
                preference_data=str(tmp_path / "prefs"))


@pytest.mark.slow
def test_study_on_a_real_checkpoint_folder(tmp_path, real_target):
    """The GPU command's code path, on a saved tiny model: COCO CHAIR and POPE files through the harness, the DPO
    rows from the adapter, the correspondence suite on pairs from disk, the report; then a resume."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import study as study_script

    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--no_progress", "--limit", "2", "--n_pairs", "4", "--batch_size", "2",
            "--model", real_target["model"], "--adapter", real_target["adapter"],
            "--coco_images", real_target["coco_images"], "--coco_instances", real_target["coco_instances"],
            "--coco_captions", real_target["coco_captions"], "--pope_files", *real_target["pope_files"],
            "--pope_images", real_target["pope_images"], "--preference_data", real_target["preference_data"]]
    study_script.main(argv)
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["metrics"]) == sorted(f"{b}/{s.label}" for b in ("coco_chair", "pope_file")
                                               for s in dstudy.SETTINGS)
    assert report["metrics"]["coco_chair/dpo"]["run"]["adapter"] == real_target["adapter"]
    assert report["metrics"]["coco_chair/greedy"]["sections"]["val2014"]["n_captions"] == 2
    assert report["metrics"]["pope_file/greedy"]["sections"]["coco_pope_random"]["n"] == 2
    assert report["correspondence"]["summary"].endswith("on 4 held-out pairs")
    assert (out / "correspondence" / "correspondence.json").is_file()
    md = (out / "report.md").read_text()
    assert f"# The study on {real_target['model']}" in md and "| 53% relative CHAIR" in md
    before = (out / "evals" / "coco_chair_dleaf" / "generations.jsonl").read_bytes()
    (out / "report.json").unlink()
    study_script.main(argv)  # resumes: nothing is generated again
    assert (out / "evals" / "coco_chair_dleaf" / "generations.jsonl").read_bytes() == before
    assert json.loads((out / "report.json").read_text())["claims"] == report["claims"]


def test_every_study_setting_runs_its_own_method_and_adapter(tmp_path, tiny_organism, monkeypatch):
    from dleaf import generation
    from dleaf.eval import runner

    model, processor = tiny_organism
    loaded, seen = [], []
    from dleaf import eval as harness

    def load(args):
        loaded.append(args.adapter)
        return model, processor

    monkeypatch.setattr(runner, "load_model", load)
    monkeypatch.setattr(harness, "load_model", load)
    original = generation.generate

    def spy(model, processor, items, setting, *a, **k):
        seen.append((items[0].id.split("/")[0] if items else None, setting.method))
        return original(model, processor, items, setting, *a, **k)

    monkeypatch.setattr(runner, "generate", spy)
    cfg = dstudy.StudyConfig(n_images=1, correspondence=False, batch_size=2,
                             detector=str(_tiny_detector(tmp_path, model)))
    assert "dleaf_learned" in [s.label for s in cfg.settings]
    dstudy.run_evaluations(tmp_path, cfg, progress=False, say=lambda m: None)
    expected = {s.label: (s.method, dstudy.uses_adapter(s)) for s in cfg.settings}
    assert sorted(m for _, m in seen) == sorted(m for m, _ in expected.values() for _ in cfg.benchmarks)
    for bench in cfg.benchmarks:
        for label, (method, adapter) in expected.items():
            config = json.loads((tmp_path / "evals" / f"{bench}_{label}" / "config.json").read_text())
            assert config["method"] == method, (bench, label)
            assert bool(config["adapter"]) == adapter and (not adapter or config["adapter"] == cfg.adapter_path)
    # the adapter settings load the model with the adapter; the others share the base model loaded once
    n_adapter = sum(dstudy.uses_adapter(s) for s in cfg.settings) * len(cfg.benchmarks)
    assert loaded.count(cfg.adapter_path) == n_adapter == 4 and loaded.count(None) == 1


def test_overhead_is_measured_in_paired_steps_with_an_interval(tiny_organism):
    model, processor = tiny_organism
    cfg = dstudy.StudyConfig(timing_steps=6, timing_warmup=1, timing_batch=2)
    before = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    res = dstudy.measure_overhead(cfg, model, processor)
    assert (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation) == before
    lo, hi = res["interval"]
    assert 0 < lo <= res["dleaf_over_greedy_throughput"] <= hi
    assert res["dleaf_over_greedy_throughput"] == pytest.approx(res["greedy_step_ms"] / res["dleaf_step_ms"])
    assert (res["steps"], res["batch"], res["baseline"]) == (6, 2, "plain_eager")
    rows, md = dstudy.claims_table({}, res, None)
    assert f"[{lo:.2f}, {hi:.2f}]" in md and "measured in pairs of steps" in md


def test_the_overhead_verdict_does_not_depend_on_machine_load(tiny_organism, monkeypatch):
    """Load that hits both decodings of a pair alike (the paired per-step design) leaves the ratio and the verdict
    unchanged: the same code on a quiet and on a busy machine gives the same answer."""
    import numpy as np

    from dleaf import bench

    model, processor = tiny_organism
    rng = np.random.default_rng(0)
    loads = {"quiet": np.ones(40), "busy": rng.uniform(1.0, 8.0, 40)}

    def fake_paired(load):
        def bench_paired(model, inputs, cfg, log=None):
            (n,) = inputs
            greedy, steered = 0.010 * load, 0.0105 * load
            return {str(n): {"dleaf": {"raw_s": {"plain_eager": list(greedy), "plain_sdpa": list(greedy),
                                                 "dleaf": list(steered)}}}}
        return bench_paired

    verdicts = {}
    for name, load in loads.items():
        monkeypatch.setattr(bench, "bench_paired", fake_paired(load))
        res = dstudy.measure_overhead(dstudy.StudyConfig(timing_steps=40, timing_batch=2), model, processor)
        assert res["dleaf_over_greedy_throughput"] == pytest.approx(1 / 1.05)
        lo, hi = res["interval"]
        assert lo <= res["dleaf_over_greedy_throughput"] <= hi
        verdicts[name] = dstudy.claims_table({}, res, None)[0][0]["agrees"]
    assert verdicts == {"quiet": True, "busy": True}


def test_another_model_of_the_organisms_world_is_studied_on_the_organisms_benchmarks(tmp_path, tiny_organism):
    """A folder trained on the world (its tokenizer's vocabulary is the world's) runs the organism's benchmarks
    without COCO inputs, with no DPO rows (the shipped adapter was trained on the organism alone) and no learned
    rows unless a detector is given; with COCO and POPE inputs the same folder is studied as a real checkpoint; a
    folder whose vocabulary differs by one word is no world model."""
    from dleaf.organism.build import is_world_checkpoint

    model, processor = tiny_organism
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    assert is_world_checkpoint(ckpt) and is_world_checkpoint("organism") and is_world_checkpoint("organism_control")
    cfg = dstudy.StudyConfig(model=str(ckpt))
    assert cfg.organism and not cfg.shipped_organism and cfg.benchmarks == dstudy.ORGANISM_BENCHMARKS
    assert cfg.images == 300 and cfg.adapter_path is None and cfg.detector_path is None
    assert [s.label for s in cfg.settings] == ["greedy", "pai", "spin", "dleaf"]
    det = _tiny_detector(tmp_path, model)
    learned = dstudy.StudyConfig(model=str(ckpt), detector=str(det)).settings[4]
    assert learned.label == "dleaf_learned" and learned.knob_dict == {"detector": str(det)}
    assert dstudy.StudyConfig(model="organism_control").organism  # no COCO inputs asked for
    with pytest.raises(ValueError, match="preference_data given, but the study's model is '.*ckpt', a model of the "
                                         "organism's world"):
        dstudy.StudyConfig(model=str(ckpt), preference_data="p")
    real = dstudy.StudyConfig(model=str(ckpt), coco_images="i", coco_instances="a.json", pope_files=("p.json",),
                              pope_images="i")
    assert not real.organism and real.benchmarks == ("coco_chair", "pope_file")
    other = tmp_path / "other"
    other.mkdir()
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    word = next(w for w in spec["model"]["vocab"] if w.isalpha())
    spec["model"]["vocab"][word + "x"] = spec["model"]["vocab"].pop(word)
    (other / "tokenizer.json").write_text(json.dumps(spec))
    assert not is_world_checkpoint(other) and not is_world_checkpoint(tmp_path / "nothing_here")
    assert not is_world_checkpoint("llava-hf/llava-1.5-7b-hf")


def test_a_detector_of_another_model_is_refused_before_the_study_generates(tmp_path, tiny_organism):
    """The shipped organism detector given for another model: an input error naming --detector, raised after the
    model loads and before any setting writes a caption."""
    from dleaf.io import InputError

    model, processor = tiny_organism
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    cfg = dstudy.StudyConfig(model=str(ckpt), detector="organism", n_images=2, correspondence=False)
    with pytest.raises(InputError, match="--detector organism: this detector was fitted on model"):
        dstudy.run_study(tmp_path / "run", cfg, progress=False, say=lambda m: None)
    assert not (tmp_path / "run" / "evals").exists()
