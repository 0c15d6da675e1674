"""The fault benchmark end to end (dleaf/faults/run.py, grid.py, report.py, scripts/fault_benchmark.py): a tiny run
that reports and resumes, a cut run, the configuration's errors, the script's input checks."""

import json
import re

import pytest

from dleaf.eval import compare
from dleaf.faults import FaultConfig, grid, measures, run


# ------------------------------------------------------------------------------------------------ end to end
def test_a_tiny_benchmark_runs_reports_and_resumes(tiny_organism, tmp_path):
    model, processor = tiny_organism
    faults = [FaultConfig("diffuse", "all", strength=s, positions="random", fraction=0.5) for s in (0.5, 1.0)]
    faults.append(FaultConfig("drift", [1], positions="from", start=1))
    cfg = grid.FaultBenchConfig(faults=faults, splits=["adversarial"], limit=2, max_new_tokens=6, batch_size=2,
                              model="tiny", n_resamples=200)
    said = []
    report = run.run_benchmark(model, processor, tmp_path, cfg, say=said.append)
    assert len(said) == (1 + len(faults)) * len(cfg.methods) + 1  # every run folder, then the diagnosis
    assert said[-1] == "adversarial / the signal diagnosis on the unfaulted replies"
    for name in ("report.json", "faults.md", "flags_diffuse_adversarial.png", "flags_drift_adversarial.png",
                 "repair_strength.png"):
        assert (tmp_path / name).is_file()
    sec = report["splits"]["adversarial"]
    assert set(sec["faults"]) == {f.label() for f in faults}
    # random layers ran at D-LEAF's measured flag rate on the same fault
    for fault in faults:
        dleaf_dir = grid.run_dir_of(tmp_path, "adversarial", fault, "dleaf")
        rate = measures.measured_flag_rate(dleaf_dir)
        cfg_random = json.loads((grid.run_dir_of(tmp_path, "adversarial", fault, "random_layers") / "config.json")
                                .read_text())
        assert cfg_random["knobs"]["random_rate"] == pytest.approx(rate, abs=1e-6)
        assert cfg_random["fault"] == fault.record()
        rows = [json.loads(x) for x in (dleaf_dir / "generations.jsonl").read_text().splitlines()]
        loc = sec["faults"][fault.label()]["methods"]["dleaf"]["localization"]
        assert loc["flag_rate"]["value"] == pytest.approx(rate)
        assert loc["cells"] == sum(r["cells"]["rows"] for r in rows) * 3
    # the run folders are harness runs: the comparison table reads them
    table = compare.comparison_table([grid.run_dir_of(tmp_path, "adversarial", None, "greedy"),
                                      grid.run_dir_of(tmp_path, "adversarial", faults[0], "greedy")], paired=True,
                                     n_resamples=100)
    assert "diffuse" in table or "greedy" in table
    md = (tmp_path / "faults.md").read_text()
    assert all(f.label() in md for f in faults) and "Can LIAE see a diffuse fault?" in md
    assert sec["diagnosis"]["n_replies"] == 2 and set(sec["diagnosis"]["variants"]) == {"mixed", "mean_head"}
    # run again: nothing left to generate, the same report
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("generations.jsonl")}
    said.clear()
    again = run.run_benchmark(model, processor, tmp_path, cfg, say=said.append)
    assert said == [] and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("generations.jsonl")} == stamp
    assert json.dumps(again, sort_keys=True) == json.dumps(report, sort_keys=True)


def test_a_cut_run_resumes_without_duplicates(tiny_organism, tmp_path):
    model, processor = tiny_organism
    bench = grid.FaultBenchConfig(faults=[FaultConfig("swap", "all")], splits=["indist"], limit=3,
                                max_new_tokens=4).load_benchmark("indist")
    fault = FaultConfig("swap", "all")
    method = grid.METHODS["dleaf"]
    whole = run.run_cell(model, processor, bench, tmp_path / "a", method, fault, model_name="tiny", limit=3,
                         max_new_tokens=4, batch_size=2)
    lines = (tmp_path / "a" / "generations.jsonl").read_text().splitlines()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "b" / "generations.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # killed mid-line
    resumed = run.run_cell(model, processor, bench, tmp_path / "b", method, fault, model_name="tiny", limit=3,
                           max_new_tokens=4, batch_size=2)
    assert (tmp_path / "b" / "generations.jsonl").read_text().splitlines() == lines
    assert resumed["sections"] == whole["sections"]
    with pytest.raises(Exception, match="different run"):
        run.run_cell(model, processor, bench, tmp_path / "a", method, FaultConfig("swap", "all", strength=0.5),
                     model_name="tiny", limit=3, max_new_tokens=4)
    with pytest.raises(Exception, match="differs in model_weights_sha256"):  # other weights under the same name
        run.run_cell(model, processor, bench, tmp_path / "a", method, fault, model_name="tiny", limit=3,
                     max_new_tokens=4, model_weights="0123456789abcdef")


def test_benchmark_configuration_errors():
    with pytest.raises(ValueError, match="unknown method"):
        grid.FaultBenchConfig(methods=["greedy", "magic"])
    with pytest.raises(ValueError, match="must include greedy"):
        grid.FaultBenchConfig(methods=["dleaf"])
    with pytest.raises(ValueError, match="include dleaf"):
        grid.FaultBenchConfig(methods=["greedy", "random_layers"])
    with pytest.raises(ValueError, match="same fault twice"):
        grid.FaultBenchConfig(faults=[FaultConfig(), FaultConfig()])
    with pytest.raises(ValueError, match="--limit"):
        grid.FaultBenchConfig(limit=0)
    faults = grid.default_grid()
    assert len(faults) >= 12 and {f.kind for f in faults} >= {"diffuse", "drift"}
    assert len({grid.fault_slug(f) for f in faults}) == len(faults)  # every fault has its own folder


def test_grid_file(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("- {kind: drift, layers: [1, 2], strength: 0.5}\n- {kind: swap, heads: [0, 1]}\n")
    assert grid.read_grid(path) == [FaultConfig("drift", [1, 2], strength=0.5), FaultConfig("swap", heads=[0, 1])]
    path.write_text("- {kind: drift, level: 3}\n")
    with pytest.raises(ValueError, match="entry 0: a fault has no field"):
        grid.read_grid(path)


def _script():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import fault_benchmark as script
    finally:
        sys.path.pop(0)
    return script


@pytest.mark.parametrize("args,match", [
    (["--splits", "nowhere"], "unknown split"),
    (["--methods", "dleaf"], "must include greedy"),
    (["--limit", "0"], "--limit must be a positive"),
    (["--faults", "99"], "the grid has faults 1 to"),
    (["--grid_file", "missing.yaml"], "fault grid file not found"),
    (["--model", "no/such/folder/x"], "model folder not found"),
    (["--knob", "zzz=1"], "apply to none of the methods"),
    (["--knob", "gamma=abc"], "knob gamma='abc' must be a number"),
    (["--knob", "gamma"], "not of the form name=value"),
    (["--n_resamples", "5"], "at least 100"),
])
def test_script_refuses_bad_inputs_before_loading_a_model(tmp_path, monkeypatch, capsys, args, match):
    from dleaf import cli, models

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load", no_loading)
    code = cli.main(_script().main, ["--output_dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_script_lists_the_grid(capsys):
    assert _script().main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "diffuse L0 h1 s1 p~0.5" in out and "method dleaf" in out
    assert _script().main(["--list", "--faults", "2", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["  2  diffuse L3 h1 s1 p~0.5", "  1  diffuse L0 h1 s1 p~0.5"]


def test_knobs_go_to_every_method_that_has_them():
    cfg = grid.FaultBenchConfig(knobs={"gamma": 0.5, "layer_start": 1})
    assert cfg.method_knobs == {"greedy": {}, "dleaf": {"gamma": 0.5, "layer_start": 1},
                                "dleaf_mass": {"layer_signal": "mass_deficit", "gamma": 0.5, "layer_start": 1},
                                "random_layers": {"gamma": 0.5, "layer_start": 1}, "pai": {"layer_start": 1}}
    learned = grid.FaultBenchConfig(methods=["greedy", "dleaf_learned"], knobs={"gamma": 0.5})
    assert learned.method_knobs["dleaf_learned"] == {"gamma": 0.5}  # a knob overrides the name's default (gamma 1)
    assert "dleaf_learned" not in grid.DEFAULT_METHODS and "dleaf_learned" in grid.ROW_METHODS
    # a knob a method fixes itself is not overridden
    assert grid.FaultBenchConfig(knobs={"layer_signal": "liae"}).method_knobs["dleaf_mass"]["layer_signal"] == \
        "mass_deficit"
    with pytest.raises(ValueError, match="alpha apply to none"):
        grid.FaultBenchConfig(methods=["greedy", "dleaf"], knobs={"alpha": 1.0})


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
