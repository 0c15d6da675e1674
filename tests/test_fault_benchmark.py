"""The fault-injection benchmark (dleaf/fault_benchmark.py, scripts/fault_benchmark.py): its statistics against
independent computations (loops over hand-made replies and scores), the row-change record against output_attentions,
and a tiny end-to-end run that resumes."""

import json
import math

import numpy as np
import pytest
import torch

from dleaf import engine, metrics
from dleaf import fault_benchmark as fb
from dleaf.eval import compare
from dleaf.faults import FaultConfig


# ------------------------------------------------------------------------------------------------ statistics
def _score(i, grounded, hallucinated, n_truth):
    return {"id": str(i), "section": "s", "kind": "caption", "n_words": 10, "grounded": sorted(grounded),
            "hallucinated": sorted(hallucinated), "n_truth": n_truth,
            "n_mentions": len(grounded) + len(hallucinated), "n_hallucinated_mentions": len(hallucinated)}


def test_repair_counts_on_a_hand_example():
    base = [_score(0, {"cat", "dog"}, set(), 2), _score(1, {"car"}, {"bus"}, 2), _score(2, {"cup"}, set(), 1)]
    faulted = [_score(0, {"cat"}, {"fox"}, 2), _score(1, set(), {"bus", "van"}, 2), _score(2, {"cup"}, set(), 1)]
    method = [_score(0, {"cat", "dog"}, {"fox"}, 2), _score(1, set(), {"bus"}, 2), _score(2, set(), {"pig"}, 1)]
    c = fb.repair_counts(base, faulted, method)
    # image 0: lost dog (restored), added fox (kept); image 1: lost car (not restored), added van (removed);
    # image 2: nothing lost or added, but the method drops cup and names pig
    assert c["lost"].tolist() == [1, 1, 0] and c["restored"].tolist() == [1, 0, 0]
    assert c["added"].tolist() == [1, 1, 0] and c["removed"].tolist() == [0, 1, 0]
    assert c["new_lost"].tolist() == [0, 0, 1] and c["new_hallucinated"].tolist() == [0, 0, 1]
    r = fb.repair(base, faulted, method, n_resamples=200)
    assert r["restored"]["value"] == 0.5 and r["removed"]["value"] == 0.5
    assert r["n_lost"] == 2 and r["n_added"] == 2


def test_error_kinds_add_up_to_chair_counts():
    vocab = metrics.ObjectVocabulary.from_categories(["cat", "dog", "car", "bus"])
    captions = ["a cat and a bus .", "a dog .", "a car , a bus and a cat .", "nothing ."]
    truths = [{"cat", "dog"}, {"dog"}, {"car"}, {"bus"}]
    res = metrics.chair(captions, truths, vocab)
    scores = [_score(i, pc.mentioned - pc.hallucinated, pc.hallucinated, len(t))
              for i, (pc, t) in enumerate(zip(res.per_caption, truths))]
    kinds = np.array([fb.error_kinds(s) for s in scores])
    assert kinds[:, 0].sum() == res.n_additions and kinds[:, 1].sum() == res.n_substitutions
    assert res.n_additions == 2 and res.n_substitutions == 1  # the example exercises both


def test_ratio_intervals():
    num, den = np.array([1, 0, 2, 1, 3.0]), np.array([2, 1, 2, 4, 3.0])
    r = fb.ratio_interval(num, den, n_resamples=500)
    assert r["value"] == pytest.approx(7 / 12) and r["low"] <= r["value"] <= r["high"]
    flat = fb.ratio_interval(np.ones(6), 2 * np.ones(6), n_resamples=200)
    assert flat["value"] == flat["low"] == flat["high"] == 0.5
    assert math.isnan(fb.ratio_interval(np.zeros(3), np.zeros(3))["value"])
    d = fb.ratio_difference(num, den, num, 2 * den, n_resamples=300)
    assert d["diff"] == pytest.approx(7 / 24) and d["low"] <= d["diff"] <= d["high"]


def _row(n, flags, margin=None, change=None):
    cells = {"rows": n, "flags": flags}
    if margin is not None:
        cells["margin"] = margin
    if change is not None:
        cells["change"] = change
    return {"id": "x", "cells": cells}


def test_localization_counts_against_a_loop():
    L = 3
    fault = FaultConfig("diffuse", [1, 2], positions="from", start=2)
    rng = np.random.default_rng(0)
    rows, want = [], {"cells": 0, "faulted": 0, "flagged": 0, "hits": 0}
    pos, neg = [], []
    for n in (4, 6, 3):
        flags = rng.random((n, L)) < 0.4
        margin = rng.normal(size=(n, L))
        margin[0] = np.nan  # no threshold yet
        rows.append(_row(n, [int(sum(1 << j for j in range(L) if f[j])) for f in flags],
                         [[None if np.isnan(v) else float(v) for v in r] for r in margin]))
        for k in range(n):
            for j in range(1, L):  # the method watches layers 1 and 2
                faulted = k >= 2 and j in (1, 2)
                want["cells"] += 1
                want["faulted"] += faulted
                want["flagged"] += bool(flags[k, j])
                want["hits"] += faulted and bool(flags[k, j])
                if not np.isnan(margin[k, j]):
                    (pos if faulted else neg).append(margin[k, j])
    a = fb.localization_arrays(rows, fault, [1, 2], L)
    for k, v in want.items():
        assert a[k].sum() == v
    assert sorted(a["margin_faulted"].tolist()) == sorted(pos)
    assert sorted(a["margin_clean"].tolist()) == sorted(neg)
    config = {"method": "dleaf", "knobs": {"layer_start": 1}, "decoding": {"strategy": "greedy"}}
    loc = fb.localization(rows, config, fault, L, flags=True, n_resamples=200)
    assert loc["precision"]["value"] == pytest.approx(want["hits"] / want["flagged"])
    assert loc["recall"]["value"] == pytest.approx(want["hits"] / want["faulted"])
    from dleaf import premise

    assert loc["auroc"]["value"] == pytest.approx(premise.auroc(pos, neg))


def test_change_share_against_a_loop():
    rows = [_row(2, [0, 0], change={"faulted": [0.0, 1.0, 0.5], "clean": [2.0, 0.0, 0.5]}),
            _row(3, [0, 0, 0], change={"faulted": [0.0, 0.0, 3.0], "clean": [1.0, 1.0, None]})]
    ch = fb.change_arrays(rows, 3)
    assert ch["faulted"].tolist() == [1.5, 3.0] and ch["total"].tolist() == [4.0, 5.0]
    assert ch["layer"].tolist() == [3.0, 2.0, 4.0]


# ------------------------------------------------------------------------------------------------ row changes
@torch.no_grad()
@pytest.mark.parametrize("method,knobs,layer", [("pai", dict(alpha=0.8, layer_start=1), 1),
                                                ("no_localization", dict(gamma=0.6, layer_start=2), 2)])
def test_row_change_record_equals_output_attentions(organism_batch, method, knobs, layer):
    """The recorded change at the first layer a method acts on equals sum_h |a_method - a_plain|_1 from the model's
    own attention weights (that layer's input is the plain model's)."""
    model, _, _, _, batch = organism_batch
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    n = batch["input_ids"].shape[1]
    full = {**batch, "input_ids": out,
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(out[:, n:])], 1)}
    plain = model(**full, output_attentions=True).attentions
    with engine.attached(model, method, **knobs) as iv:
        rec = fb.RowChangeRecorder(iv)
        with iv.scoring(response_start=torch.full((out.shape[0],), n)):
            used = model(**full, output_attentions=True).attentions
    T = out.shape[1] - n + 1
    for b in range(out.shape[0]):
        got = rec.sample(b, T)
        for k in range(T):
            t = n - 1 + k
            want = float((used[layer][b, :, t].double() - plain[layer][b, :, t].double()).abs().sum())
            assert got[k, layer] == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert got[:, :layer].sum() == 0
    assert got[:, layer].sum() > 0


# ------------------------------------------------------------------------------------------------ end to end
def test_a_tiny_benchmark_runs_reports_and_resumes(tiny_organism, tmp_path):
    model, processor = tiny_organism
    faults = [FaultConfig("diffuse", "all", strength=s, positions="random", fraction=0.5) for s in (0.5, 1.0)]
    faults.append(FaultConfig("drift", [1], positions="from", start=1))
    cfg = fb.FaultBenchConfig(faults=faults, splits=["adversarial"], limit=2, max_new_tokens=6, batch_size=2,
                              model="tiny", n_resamples=200)
    said = []
    report = fb.run_benchmark(model, processor, tmp_path, cfg, say=said.append)
    assert len(said) == (1 + len(faults)) * len(cfg.methods)
    for name in ("report.json", "faults.md", "flags_diffuse_adversarial.png", "flags_drift_adversarial.png",
                 "repair_strength.png"):
        assert (tmp_path / name).is_file()
    sec = report["splits"]["adversarial"]
    assert set(sec["faults"]) == {f.label() for f in faults}
    # random layers ran at D-LEAF's measured flag rate on the same fault
    for fault in faults:
        dleaf_dir = fb.run_dir_of(tmp_path, "adversarial", fault, "dleaf")
        rate = fb.measured_flag_rate(dleaf_dir)
        cfg_random = json.loads((fb.run_dir_of(tmp_path, "adversarial", fault, "random_layers") / "config.json")
                                .read_text())
        assert cfg_random["knobs"]["random_rate"] == pytest.approx(rate, abs=1e-6)
        assert cfg_random["fault"] == fault.record()
        rows = [json.loads(x) for x in (dleaf_dir / "generations.jsonl").read_text().splitlines()]
        loc = sec["faults"][fault.label()]["methods"]["dleaf"]["localization"]
        assert loc["flag_rate"]["value"] == pytest.approx(rate)
        assert loc["cells"] == sum(r["cells"]["rows"] for r in rows) * 3
    # the run folders are harness runs: the comparison table reads them
    table = compare.comparison_table([fb.run_dir_of(tmp_path, "adversarial", None, "greedy"),
                                      fb.run_dir_of(tmp_path, "adversarial", faults[0], "greedy")], paired=True,
                                     n_resamples=100)
    assert "diffuse" in table or "greedy" in table
    md = (tmp_path / "faults.md").read_text()
    assert all(f.label() in md for f in faults)
    # run again: nothing left to generate, the same report
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("generations.jsonl")}
    said.clear()
    again = fb.run_benchmark(model, processor, tmp_path, cfg, say=said.append)
    assert said == [] and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("generations.jsonl")} == stamp
    assert json.dumps(again, sort_keys=True) == json.dumps(report, sort_keys=True)


def test_a_cut_run_resumes_without_duplicates(tiny_organism, tmp_path):
    model, processor = tiny_organism
    bench = fb.FaultBenchConfig(faults=[FaultConfig("swap", "all")], splits=["indist"], limit=3,
                                max_new_tokens=4).load_benchmark("indist")
    fault = FaultConfig("swap", "all")
    method = fb.METHODS["dleaf"]
    whole = fb.run_cell(model, processor, bench, tmp_path / "a", method, fault, model_name="tiny", limit=3,
                        max_new_tokens=4, batch_size=2)
    lines = (tmp_path / "a" / "generations.jsonl").read_text().splitlines()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "b" / "generations.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # killed mid-line
    resumed = fb.run_cell(model, processor, bench, tmp_path / "b", method, fault, model_name="tiny", limit=3,
                          max_new_tokens=4, batch_size=2)
    assert (tmp_path / "b" / "generations.jsonl").read_text().splitlines() == lines
    assert resumed["sections"] == whole["sections"]
    with pytest.raises(Exception, match="different run"):
        fb.run_cell(model, processor, bench, tmp_path / "a", method, FaultConfig("swap", "all", strength=0.5),
                    model_name="tiny", limit=3, max_new_tokens=4)


def test_benchmark_configuration_errors():
    with pytest.raises(ValueError, match="unknown method"):
        fb.FaultBenchConfig(methods=["greedy", "magic"])
    with pytest.raises(ValueError, match="must include greedy"):
        fb.FaultBenchConfig(methods=["dleaf"])
    with pytest.raises(ValueError, match="include dleaf"):
        fb.FaultBenchConfig(methods=["greedy", "random_layers"])
    with pytest.raises(ValueError, match="same fault twice"):
        fb.FaultBenchConfig(faults=[FaultConfig(), FaultConfig()])
    with pytest.raises(ValueError, match="--limit"):
        fb.FaultBenchConfig(limit=0)
    grid = fb.default_grid()
    assert len(grid) >= 12 and {f.kind for f in grid} >= {"diffuse", "drift"}
    assert len({fb.fault_slug(f) for f in grid}) == len(grid)  # every fault has its own folder


def test_grid_file(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("- {kind: drift, layers: [1, 2], strength: 0.5}\n- {kind: swap, heads: [0, 1]}\n")
    assert fb.read_grid(path) == [FaultConfig("drift", [1, 2], strength=0.5), FaultConfig("swap", heads=[0, 1])]
    path.write_text("- {kind: drift, level: 3}\n")
    with pytest.raises(ValueError, match="entry 0: a fault has no field"):
        fb.read_grid(path)


@pytest.mark.parametrize("args,match", [
    (["--splits", "nowhere"], "unknown split"),
    (["--methods", "dleaf"], "must include greedy"),
    (["--limit", "0"], "--limit must be a positive"),
    (["--faults", "99"], "the grid has faults 1 to"),
    (["--grid_file", "missing.yaml"], "fault grid file not found"),
    (["--model", "no/such/folder/x"], "model folder not found"),
])
def test_script_refuses_bad_inputs_before_loading_a_model(run_script, tmp_path, args, match):
    res = run_script("fault_benchmark.py", "--output_dir", str(tmp_path / "out"), *args)
    assert res.returncode == 2 and f"error: " in res.stderr and __import__("re").search(match, res.stderr)
    assert not (tmp_path / "out").exists()


def test_script_lists_the_grid(run_script):
    res = run_script("fault_benchmark.py", "--list")
    assert res.returncode == 0 and "diffuse L0 h1 s1 p~0.5" in res.stdout and "method dleaf" in res.stdout


@pytest.mark.slow
def test_script_end_to_end_on_the_organism(run_script, tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("- {kind: diffuse, layers: all, positions: random, fraction: 0.5}\n")
    out = tmp_path / "out"
    res = run_script("fault_benchmark.py", "--output_dir", str(out), "--grid_file", str(grid), "--limit", "2",
                     "--max_new_tokens", "12", "--n_resamples", "100", "--no_progress", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == f"outputs: {out / 'faults.md'}, {out / 'report.json'}"
    report = json.loads((out / "report.json").read_text())
    assert set(report["splits"]) == {"adversarial", "indist"}
