"""Tests for dleaf.run and dleaf.trace_report (plain vs a method on one image, the trace export, summary and
figure) and scripts/run_dleaf.py."""

import json
from pathlib import Path

import pytest
import torch

from dleaf import engine, models, run, trace_report
from dleaf.organism import build, world

ROOT = Path(__file__).resolve().parents[1]


def test_parse_knobs_types_and_errors():
    assert run.parse_knobs("dleaf", ["gamma=0.3", "warmup=4", "liae_normalize=false", "layer_end=None",
                                     "threshold=best"]) == {
        "gamma": 0.3, "warmup": 4, "liae_normalize": False, "layer_end": None, "threshold": "best"}
    with pytest.raises(ValueError, match="no knob.*alpha"):
        run.parse_knobs("dleaf", ["alpha=1"])
    with pytest.raises(ValueError, match="name=value"):
        run.parse_knobs("pai", ["alpha"])
    with pytest.raises(ValueError, match="gamma"):
        run.parse_knobs("dleaf", ["gamma=3"])
    with pytest.raises(ValueError, match="warmup='two' must be an integer"):
        run.parse_knobs("dleaf", ["warmup=two"])
    with pytest.raises(ValueError, match="gamma='abc' must be a number"):
        run.parse_knobs("dleaf", ["gamma=abc"])


@torch.no_grad()
def test_trace_export_summary_and_figure(tmp_path):
    shape = build.OrganismShape(text_hidden=32, text_layers=3, text_heads=4, text_intermediate=64)
    processor = build.build_processor(shape)
    model = build.build_model(processor.tokenizer, shape, seed=0).eval()
    model.set_attn_implementation("eager")
    batch = models.model_inputs(processor, [world.CAPTION_PROMPTS[0]] * 2,
                                [world.render(s) for s in world.scenes("adversarial", 2)])
    with engine.attached(model, "dleaf", trace=True, gamma=1.0, warmup=1, kappa=0.0, layer_start=1) as iv:
        model.generate(**batch, max_new_tokens=7, do_sample=False)
    data = json.loads(trace_report.write_trace_json(iv.trace, tmp_path / "t.json", config=iv.config).read_text())
    assert data["num_layers"] == 3 and len(data["samples"]) == 2 and data["config"]["layer_start"] == 1
    first = data["samples"][0]
    assert len(first["positions"]) == 7  # the last prompt row and the rows of the first 6 generated tokens
    assert all(row[0] is None for row in first["signal"])  # layer 0 is not watched
    assert all(0 not in layers for layers in first["flagged_layers"])
    flagged = sum(len(x) for x in first["flagged_layers"])
    assert flagged == int(iv.trace.sample(0)["flag"].sum()) > 0
    text = trace_report.trace_summary(iv.trace, 0)
    assert "flag rate" in text and "L1" in text
    png = trace_report.plot_trace(iv.trace, tmp_path / "t.png", tokens=[str(i) for i in range(7)])
    assert png.stat().st_size > 1000
    marks = ["", "object", "hallucinated", "", "", "", ""]
    two = trace_report.plot_trace(iv.trace, tmp_path / "two.png", tokens=[str(i) for i in range(7)], marks=marks,
                                  plain=iv.trace, plain_tokens=[str(i) for i in range(7)], config=iv.config,
                                  title="tiny")
    assert two.stat().st_size > png.stat().st_size
    assert trace_report.signal_label(iv.config) == "LIAE / log |image tokens| (0: one image token, 1: uniform)"
    from dleaf.io import loads_strict

    loads_strict((tmp_path / "t.json").read_text())  # NaN (unwatched layer 0) written as null
    _check_trace_figure(iv, marks)


def _check_trace_figure(iv, marks):
    """The figure a user reads: the plain pass beside the method's, colorbars named with their units, integer ticks
    for counts, object and hallucinated words marked on the token axis."""
    import matplotlib.colors as mcolors

    tokens = [f"w{i}" for i in range(7)]
    fig = trace_report.trace_figure(iv.trace, tokens=tokens, marks=marks, plain=iv.trace, plain_tokens=tokens,
                                    plain_marks=marks, config=iv.config, title="organism, scene 3: dleaf")
    assert fig._suptitle.get_text() == "organism, scene 3: dleaf"
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["plain decoding (the method watching at zero strength): flags it would raise",
                      "with the method: flagged layers corrected", "mean IAF per head", "times corrected"]
    heats = [ax for ax in fig.axes if ax.get_title() in titles[:2]]
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels.count(trace_report.signal_label(iv.config)) == 2  # both heatmaps' colorbars, with the unit
    assert "IAF: image attention mass of the head's row (share)" in labels
    counts = fig.axes[labels.index("corrections (count of positions)")]
    ticks = [t for t in counts.get_yticks() if counts.get_ylim()[0] <= t <= counts.get_ylim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    for heat in heats:
        assert heat.get_ylabel() == "decoder layer"
        colours = [mcolors.to_hex(t.get_color()) for t in heat.get_xticklabels()]
        assert [t.get_text() for t in heat.get_xticklabels()] == tokens
        assert colours[1] == mcolors.to_hex("tab:blue") and colours[2] == mcolors.to_hex("red")
        assert colours[0] == colours[3] != colours[1]
        assert "red: hallucinated object word" in heat.get_xlabel()
    n_flags = int(iv.trace.sample(0)["flag"].sum())
    assert [len(ax.patches) for ax in heats] == [n_flags, n_flags]  # every flagged cell outlined, in both


def test_run_dleaf_script_on_the_organism(tmp_path, run_script):
    res = run_script("run_dleaf.py", "--knob", "gamma=0.9", "--max_new_tokens", "40", "--output_dir", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "plain greedy :" in res.stdout and "dleaf" in res.stdout and "flag rate" in res.stdout
    # the default scene is one where greedy decoding hallucinates (found by running it, not hard-coded)
    assert "the first scene where greedy decoding hallucinates" in res.stdout
    assert "plain greedy : hallucinated nothing" not in res.stdout
    assert (tmp_path / "trace.json").is_file() and (tmp_path / "trace.png").is_file()
    assert res.stdout.strip().splitlines()[-1] == f"outputs: {tmp_path}"


def test_run_dleaf_refuses_bad_input_before_loading(tmp_path, run_script):
    (tmp_path / "x.jpg").write_text("not an image")
    for args, message in ((["--image", tmp_path / "x.jpg"], "not an image file"),
                          (["--image", tmp_path / "none.png"], "not found"),
                          (["--knob", "gamma=abc"], "must be a number"),
                          (["--method", "greedy"], "nothing to compare"),
                          (["--model", "nowhere/at/all/"], "not found")):
        res = run_script("run_dleaf.py", *args)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and message in res.stderr, res.stderr
        assert "Loading weights" not in res.stderr
