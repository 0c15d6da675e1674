"""The localizers that can act at the first generated token without headroom below the signal's maximum
(dleaf/methods/localizers/prompt_threshold.py, calibrated.py): the prompt threshold equals one computed by hand from
the model's own eager attention; a flag at the first token changes a yes/no answer's logits; flags agree between
step-by-step decoding and teacher-forced scoring (decisions away from ties); a calibration file of another model
is refused; the calibrated localizer at percentile 100 on its calibration replies is plain decoding bit for bit."""

import json
import math

import numpy as np
import pytest
import torch

from dleaf import engine
from dleaf.io import InputError
from dleaf.methods.localizers import localizer_names
from dleaf.methods.localizers.calibrated import SignalRecorder, calibration_from_signals, load_calibration
from dleaf.organism import world
from margins import FLAG_MARGIN, assert_margin

GREEDY = dict(max_new_tokens=6, do_sample=False, num_beams=1)
STRONG = {"dleaf": dict(gamma=1.0, head_selection="all_but_best"), "pai": dict(alpha=0.9, layer_start=0),
          "spin": dict(keep_ratio=0.5, scale=0.0)}
ZERO = {"dleaf": dict(gamma=0.0), "pai": dict(alpha=0.0, layer_start=0), "spin": dict(scale=1.0)}


def _generate(model, batch, method=None, **knobs):
    with torch.no_grad(), engine.attached(model, method, **knobs) as iv:
        return model.generate(**batch, **GREEDY, output_scores=True, return_dict_in_generate=True,
                              **engine.generation_kwargs(iv, batch))


def _hand_signal(attn, image, signal):
    """(Q,) the layer signal of one sample's attention ``attn`` (H, Q, K), computed from the formulas: LIAE = the
    entropy of the head-mean image profile over log |I| (profile = a row's image weights over their sum), or minus
    the head-mean image mass."""
    a = attn.double()[:, :, image]  # (H, Q, I)
    if signal == "mass_deficit":
        return -a.sum(-1).mean(0)
    p = (a / a.sum(-1, keepdim=True)).mean(0)  # (Q, I)
    h = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1)
    return h / math.log(int(image.sum()))


def _spy(iv, seen, margins=None):
    """Wrap the attached method's localizer so that every active cell's flag (and, with ``margins``, its signal and
    threshold) is kept per (sample, position, layer)."""
    from dleaf.methods.localizers.prompt_threshold import row_signal

    loc = iv.method.localizer
    flags = loc.flags

    def spy(call, rows=None):
        out = flags(call, rows)
        pos = call.positions()
        signal = row_signal(rows, call.image, loc.knobs) if margins is not None else None
        for b in range(out.shape[0]):
            for q in range(out.shape[1]):
                if pos[b, q] >= 0 and call.active[b, q]:
                    seen[(b, int(pos[b, q]), call.layer)] = bool(out[b, q])
                    if margins is not None:
                        margins[(b, int(pos[b, q]), call.layer)] = (float(signal[b, q]),
                                                                     float(loc.tau[call.layer, b]))
        return out

    loc.flags = spy
    return loc


@pytest.mark.parametrize("signal", ["liae", "mass_deficit"])
@torch.no_grad()
def test_prompt_threshold_equals_the_hand_computation_from_the_prompt_rows(sharp_organism_batch, signal):
    """tau = mean + kappa * sd (population) of the signal at each sample's text rows after its image, before its
    last prompt row, from the model's own eager attention; position 0 is flagged where its signal exceeds tau."""
    model, _, _, _, batch = sharp_organism_batch
    kappa = 0.5
    out = model(**batch, output_attentions=True)
    image = batch["input_ids"] == model.config.image_token_id
    B, T = batch["input_ids"].shape
    expected_tau, expected_flag, cells = {}, {}, []
    for b in range(B):
        last_image = int(image[b].nonzero().max())
        rows = list(range(last_image + 1, T - 1))
        assert len(rows) >= 2
        for layer, attn in enumerate(out.attentions):
            s = _hand_signal(attn[b], image[b], signal)
            vals = s[rows].numpy()
            tau = float(vals.mean() + kappa * vals.std())
            expected_tau[(b, layer)] = tau
            expected_flag[(b, layer)] = bool(s[-1] > tau)
            cells.append(((b, 0, layer), float(s[-1]), tau, bool(s[-1] > tau)))
    assert_margin(cells, FLAG_MARGIN, "prompt-threshold flags at position 0")
    with engine.attached(model, "dleaf", gamma=0.0, localization="prompt_threshold", kappa=kappa,
                         layer_signal=signal) as iv:
        seen = {}
        loc = _spy(iv, seen)
        model(**batch)
        for (b, layer), tau in expected_tau.items():
            assert abs(float(loc.tau[layer, b]) - tau) < 1e-6
            assert seen[(b, 0, layer)] == expected_flag[(b, layer)]


@torch.no_grad()
def test_a_first_token_prompt_threshold_flag_changes_a_yes_no_answers_logits(tiny, make_batch):
    """A low threshold flags position 0 (the prefill's last row, whose logits give the answer), which a running
    threshold cannot; a threshold no signal reaches leaves the logits bit for bit."""
    model, processor, scenes, _, _ = tiny
    batch = make_batch(processor, scenes[:1], [world.QUESTION_TEMPLATE.format(obj="fork")])
    plain = model(**batch).logits[:, -1]
    for method in ("dleaf", "pai", "spin"):
        with engine.attached(model, method, localization="prompt_threshold", **STRONG[method]) as iv:
            loc = iv.method.localizer
            loc.kappa = -1e6  # tau far below every signal: every active row is flagged
            assert not torch.equal(model(**batch).logits[:, -1], plain), method
            loc.kappa = 1e6
            assert torch.equal(model(**batch).logits[:, -1], plain), method


@pytest.fixture()
def tiny(organism_batch):
    return organism_batch


def _teacher_forced(model, batch, n_new=6):
    one = {k: v[:1] for k, v in batch.items()}
    keep = one["attention_mask"][0].bool()
    one = {k: (v[:, keep] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}
    seq = model.generate(**one, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)
    return one, dict(one, input_ids=seq, attention_mask=torch.ones_like(seq)), one["input_ids"].shape[1]


@pytest.mark.parametrize("signal", ["liae", "mass_deficit"])
@torch.no_grad()
def test_prompt_threshold_flags_agree_in_decoding_and_teacher_forced_scoring(sharp_organism_batch, signal):
    model, _, _, _, batch = sharp_organism_batch
    one, full, start = _teacher_forced(model, batch)
    knobs = dict(gamma=0.0, localization="prompt_threshold", kappa=0.0, layer_signal=signal)
    decoded, scored, margins = {}, {}, {}
    with engine.attached(model, "dleaf", **knobs) as iv:
        loc = _spy(iv, decoded, margins)
        model.generate(**one, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert_margin([(k, s, t, decoded[k]) for k, (s, t) in margins.items()], FLAG_MARGIN, "prompt-threshold flags")
    with engine.attached(model, "dleaf", **knobs) as iv:
        _spy(iv, scored)
        with iv.scoring(response_start=torch.tensor([start])):
            model(**full)
    assert {k: v for k, v in scored.items() if k[1] < 5} == decoded
    assert any(decoded.values()) and not all(decoded.values())
    assert any(v for k, v in decoded.items() if k[1] == 0)  # a first-token flag
    del loc


def _record(model, batch, **knobs):
    recorder = SignalRecorder()
    with torch.no_grad(), engine.attached(model, "dleaf", gamma=0.0, localization="calibrated",
                                          calibration=recorder, **knobs) as iv:
        out = model.generate(**batch, **GREEDY, output_scores=True, return_dict_in_generate=True,
                             **engine.generation_kwargs(iv, batch))
    B = batch["input_ids"].shape[0]
    return recorder.signals([GREEDY["max_new_tokens"]] * B), out


@pytest.mark.parametrize("method", ["dleaf", "pai", "spin"])
def test_calibrated_at_percentile_100_on_its_replies_is_plain_decoding_bit_for_bit(tiny, tmp_path, method):
    model, _, _, _, batch = tiny
    signals, recorded = _record(model, batch)
    plain = _generate(model, batch)
    assert torch.equal(recorded.sequences, plain.sequences)  # recording flags nothing
    assert all(torch.equal(a, b) for a, b in zip(recorded.scores, plain.scores))
    B, L = batch["input_ids"].shape[0], model.config.text_config.num_hidden_layers
    assert sorted(signals) == list(range(L)) and all(len(v) == B * GREEDY["max_new_tokens"] for v in signals.values())
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(calibration_from_signals(signals, model, {"layer_signal": "liae",
                                                                         "liae_variant": "mixed",
                                                                         "liae_normalize": True})))
    out = _generate(model, batch, method, localization="calibrated", calibration=str(path), percentile=100,
                    **STRONG[method])
    assert torch.equal(out.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, plain.scores))
    low = _generate(model, batch, method, localization="calibrated", calibration=str(path), percentile=0,
                    **STRONG[method])
    assert not all(torch.equal(a, b) for a, b in zip(low.scores, plain.scores))


def test_calibrated_flags_rows_above_the_layer_percentile(sharp_organism_batch):
    """The flags are the rows whose signal is strictly above the file's per-layer percentile, checked against the
    recorded signals (numpy's percentile of the calibration replies), at the first token too."""
    model, _, _, _, batch = sharp_organism_batch
    signals, _ = _record(model, batch, layer_signal="mass_deficit")
    cal = calibration_from_signals(signals, model, {"layer_signal": "mass_deficit", "liae_variant": "mixed",
                                                    "liae_normalize": True})
    rec = SignalRecorder()
    seen = {}
    with torch.no_grad(), engine.attached(model, "dleaf", gamma=0.0, localization="calibrated", calibration=cal,
                                          percentile=50) as iv:
        _spy(iv, seen)
        model.generate(**batch, **GREEDY)
    with torch.no_grad(), engine.attached(model, "dleaf", gamma=0.0, localization="calibrated", calibration=rec,
                                          layer_signal="mass_deficit") as iv:
        model.generate(**batch, **GREEDY)
    cells = []
    for layer, sample, pos, sig in rec.rows:
        tau = float(np.percentile(signals[layer], 50))
        for s, p, v in zip(sample, pos, sig):
            if p >= 0 and p < GREEDY["max_new_tokens"]:
                assert seen[(int(s), int(p), layer)] == bool(v > tau)
                cells.append(((int(s), int(p), layer), float(v), tau, bool(v > tau)))
    assert any(c[3] for c in cells) and not all(c[3] for c in cells)
    assert any(c[3] for c in cells if c[0][1] == 0)  # a first-token flag


def test_a_calibration_file_of_another_model_is_refused(tiny, tmp_path):
    from dleaf.organism import build

    model, processor, _, _, batch = tiny
    shape = build.OrganismShape(text_hidden=32, text_layers=2, text_heads=4, text_intermediate=64)
    other = build.build_model(processor.tokenizer, shape, seed=0).eval()
    other.set_attn_implementation("eager")
    signals = {layer: np.linspace(0, 1, 11) for layer in range(2)}
    path = tmp_path / "other.json"
    path.write_text(json.dumps(calibration_from_signals(signals, other, {"layer_signal": "liae",
                                                                         "liae_variant": "mixed",
                                                                         "liae_normalize": True})))
    assert load_calibration(str(path), other)["model"]["num_layers"] == 2
    with pytest.raises(InputError, match=r"other\.json belongs to model .*2 layers.*not to the attached model"):
        with engine.attached(model, "dleaf", localization="calibrated", calibration=str(path)):
            pass
    # a file of the same shape but another configuration is refused too
    data = json.loads(path.read_text())
    signals = {layer: np.linspace(0, 1, 11) for layer in range(3)}
    mine = calibration_from_signals(signals, model, data["signal"])
    mine["model"]["config_hash"] = "0" * 64
    with pytest.raises(InputError, match="belongs to model"):
        with engine.attached(model, "spin", localization="calibrated", calibration=mine):
            pass
    with pytest.raises(InputError, match="needs calibration"):
        with engine.attached(model, "pai", localization="calibrated"):
            pass
    good = calibration_from_signals(signals, model, data["signal"])
    with pytest.raises(InputError, match="percentile 42.3 is not in"):
        with engine.attached(model, "dleaf", localization="calibrated", calibration=good, percentile=42.3):
            pass
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="bad.json is not a version-1 localizer calibration file"):
        load_calibration(str(tmp_path / "bad.json"))


def test_both_localizers_are_registered_and_run_under_beam_search_and_without_cache(tiny, tmp_path):
    model, _, _, _, batch = tiny
    assert {"prompt_threshold", "calibrated"} <= set(localizer_names())
    signals, _ = _record(model, batch)
    cal = calibration_from_signals(signals, model, {"layer_signal": "liae", "liae_variant": "mixed",
                                                    "liae_normalize": True})
    for knobs in (dict(localization="prompt_threshold", kappa=0.0),
                  dict(localization="calibrated", calibration=cal, percentile=50)):
        cached = _generate(model, batch, "dleaf", **STRONG["dleaf"], **knobs)
        with torch.no_grad(), engine.attached(model, "dleaf", **STRONG["dleaf"], **knobs) as iv:
            replay = model.generate(**batch, **GREEDY, use_cache=False, output_scores=True,
                                    return_dict_in_generate=True, **engine.generation_kwargs(iv, batch))
        assert torch.equal(cached.sequences, replay.sequences)
        plain = _generate(model, batch)
        assert not all(torch.equal(a, b) for a, b in zip(cached.scores, plain.scores))  # the flags act
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cached.scores, replay.scores))
        with torch.no_grad(), engine.attached(model, "dleaf", **STRONG["dleaf"], **knobs) as iv:
            beams = model.generate(**batch, max_new_tokens=4, do_sample=False, num_beams=2,
                                   **engine.generation_kwargs(iv, batch))
        assert beams.shape[0] == batch["input_ids"].shape[0]
    for method in ("pai", "spin"):  # PAI and SPIN take both (prompt_threshold at D-LEAF's default kappa, 1)
        for knobs in (dict(localization="prompt_threshold"), dict(localization="calibrated", calibration=cal)):
            assert _generate(model, batch, method, **STRONG[method], **knobs).sequences.shape[0] == 3


def test_the_calibration_script_writes_a_file_that_another_model_refuses(tiny, tmp_path):
    """scripts/calibrate_localizer.py on the committed organism (6 layers, 6 heads): the file records the model and
    per-layer percentiles of every reply row's signal; attached to the tiny organism (3 layers) it is refused."""
    import runpy
    from pathlib import Path

    from dleaf.methods.localizers.calibrated import PERCENTILES

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "calibrate_localizer.py"),
                            run_name="script")
    assert script["main"](["--n_images", "3", "--signal", "mass_deficit", "--output_dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["model"]["num_layers"] == 6 and data["model"]["num_heads"] == 6
    assert data["signal"]["layer_signal"] == "mass_deficit" and data["percentiles"] == list(PERCENTILES)
    assert len(set(data["n_rows"])) == 1 and data["n_rows"][0] > 3  # every reply row, in every layer
    for values in data["values"]:
        assert values == sorted(values) and -1 <= values[0] <= values[-1] <= 0
    model = tiny[0]
    with pytest.raises(InputError, match=r"calibration\.json belongs to model .*6 layers, 6 heads.*3 layers"):
        with engine.attached(model, "dleaf", localization="calibrated", calibration=str(tmp_path / "calibration.json")):
            pass


@torch.no_grad()
def test_prompt_threshold_refuses_prompt_rows_computed_by_the_fast_kernel(tiny):
    """With unwatched="sdpa" on a padded batch the engine hands the method only the prefill's last row, so the
    prompt's rows (the threshold's sample) are not there: refused, with the remedy."""
    model, _, _, _, batch = tiny
    with engine.attached(model, "dleaf", localization="prompt_threshold", unwatched="sdpa"):
        with pytest.raises(ValueError, match="unwatched='eager'"):
            model(**batch)
