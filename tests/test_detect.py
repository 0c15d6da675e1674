"""Tests for dleaf.detect and the ``learned`` localizer: the detector's features against explicit loops over the
model's attention weights and against the premise records; the JSON round trip; another model's file refused; the
localizer's flags equal the detector's teacher-forced probabilities in greedy decoding, sampling and teacher-forced
scoring (fixtures away from ties)."""

import json
import math

import numpy as np
import pytest
import torch

from dleaf import detect, detect_study, engine, models, premise_check
from dleaf.organism import world
from dleaf.organism.benchmarks import VOCAB


@pytest.fixture(scope="module")
def sharp():
    from tiny_organisms import SHARPEN, build_tiny_organism

    return build_tiny_organism(0, SHARPEN)


def _captions(n=3):
    scenes = world.scenes("adversarial", n)
    replies = [world.describe(s, seed=i) for i, s in enumerate(scenes)]
    if n > 1:
        partner = next(iter(world.PARTNERS[scenes[1].objects[0]]))
        replies[1] += f" there is also a {partner} ."
    return scenes, [world.render(s) for s in scenes], replies, world.CAPTION_PROMPTS[0]


@torch.no_grad()
def test_features_equal_explicit_loops_and_the_premise_records(sharp):
    model, processor = sharp
    scenes, images, replies, prompt = _captions()
    recs = detect.row_features(model, processor, images, [prompt] * 3, replies, batch_size=2)
    prem = premise_check.reply_records(model, processor, images, [prompt] * 3, replies, [s.objects for s in scenes],
                                       VOCAB, batch_size=2)["rows"]
    tok = processor.tokenizer
    H = model.config.text_config.num_attention_heads
    L = model.config.text_config.num_hidden_layers
    names = detect.feature_names(range(L), H)
    k = 0
    for i, (image, reply) in enumerate(zip(images, replies)):
        ids = models.model_inputs(processor, [prompt], [image])
        reply_ids = tok(reply, add_special_tokens=False)["input_ids"]
        assert recs[i]["token_ids"] == reply_ids
        full = torch.cat([ids["input_ids"], torch.tensor([reply_ids])], 1)
        res = model(input_ids=full, pixel_values=ids["pixel_values"], output_attentions=True)
        n = ids["input_ids"].shape[1]
        img = [c for c in range(full.shape[1]) if int(full[0, c]) == model.config.image_token_id]
        for j in range(len(reply_ids)):
            want = []
            for att in res.attentions:
                row = att[0, :, n + j - 1].double()
                masses = [sum(float(row[h, c]) for c in img) for h in range(H)]
                mixed = [sum(float(row[h, c]) / masses[h] for h in range(H)) / H for c in img]
                liae = -sum(p * math.log(p) for p in mixed if p > 0)
                focus = []
                for h in range(H):
                    ps = [float(row[h, c]) / masses[h] for c in img]
                    ent = -sum(p * math.log(p) for p in ps if p > 0)
                    focus.append(masses[h] * (1 - ent / math.log(len(img))))
                want += [liae, sum(masses) / H, *masses, *focus]
            got = recs[i]["features"][j]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), names
            # the premise records' per-layer LIAE and head-mean mass at the same row
            per = 2 + 2 * H
            assert prem["liae"][k] == pytest.approx([got[l * per] for l in range(L)], rel=1e-6, abs=1e-7)
            assert prem["mass"][k] == pytest.approx([got[l * per + 1] for l in range(L)], rel=1e-6, abs=1e-7)
            k += 1
    assert k == len(prem["kind"])


def _fitted(model, processor, layers, n=4, seed=0):
    """A detector fitted on random labels of a few captions' rows of ``model`` (only its shape matters here)."""
    scenes, images, replies, prompt = _captions(n)
    recs = detect.row_features(model, processor, images, [prompt] * n, replies, layers=layers)
    x = np.concatenate([r["features"] for r in recs])
    y = (np.random.default_rng(seed).random(len(x)) < 0.3).astype(int)
    return detect.fit(x, y, layers, model.config.text_config.num_attention_heads, detect.model_identity(model)), x


def test_json_round_trip_and_scoring(sharp, tmp_path):
    model, processor = sharp
    det, x = _fitted(model, processor, [0, 1])
    path = det.save(tmp_path / "det.json")
    data = json.loads(path.read_text())
    assert data["feature_names"] == detect.feature_names([0, 1], 4) and data["model"] == detect.model_identity(model)
    back = detect.Detector.load(path)
    assert np.array_equal(back.probability(x), det.probability(x))
    assert torch.allclose(back.torch_probability(torch.as_tensor(x)), torch.as_tensor(det.probability(x)),
                          rtol=1e-12, atol=1e-14)
    scenes, images, replies, prompt = _captions(1)
    out = detect.score(model, processor, images[0], replies[0], path, prompt)
    assert [t["token_id"] for t in out] == processor.tokenizer(replies[0], add_special_tokens=False)["input_ids"]
    assert np.allclose([t["probability"] for t in out], det.probability(x[:len(out)]))
    bad = dict(data, coef=data["coef"][:-1])
    with pytest.raises(ValueError, match="coefficients"):
        detect.Detector.from_json(bad)
    with pytest.raises(ValueError, match="detector file"):
        detect.Detector.from_json({"version": 99})


def test_another_models_file_is_refused(sharp, tiny_organism_factory, tmp_path):
    model, processor = sharp
    det, _ = _fitted(model, processor, [0])
    path = det.save(tmp_path / "det.json")
    other = tiny_organism_factory(1)
    with pytest.raises(ValueError, match="fitted on model"):
        det.check_model(other)
    scenes, images, replies, prompt = _captions(1)
    with pytest.raises(ValueError, match="fitted on model"):
        detect.score(other, processor, images[0], replies[0], path, prompt)
    with pytest.raises(ValueError, match="fitted on model"):
        with engine.attached(other, "dleaf", localization="learned", detector=str(path)):
            pass
    with pytest.raises(ValueError, match="needs detector"):
        with engine.attached(model, "dleaf", localization="learned"):
            pass


def _threshold_between(p, lo=0.6, hi=0.9):
    """A threshold in the widest gap between sorted probabilities within their [lo, hi] quantiles, and the gap."""
    q = np.sort(p)
    a, b = int(lo * len(q)), int(hi * len(q))
    gaps = np.diff(q[a:b])
    g = int(np.argmax(gaps))
    return float((q[a + g] + q[a + g + 1]) / 2), float(gaps[g] / 2)


GREEDY = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)


@torch.no_grad()
@pytest.mark.parametrize("layers", [[0], [0, 1]])
def test_learned_flags_are_the_teacher_forced_probabilities(sharp, make_batch, tmp_path, layers):
    """Greedy decoding at gamma 1 with the learned localizer: the flags in its trace are, at every generated row,
    the detector's probability on teacher-forced features of the decoded tokens above the threshold, in the layers
    from the detector's last layer on; and decoding with the oracle at exactly those rows gives the same tokens."""
    model, processor = sharp
    det, _ = _fitted(model, processor, layers)
    scenes = world.scenes("adversarial", 3)
    prompt = world.CAPTION_PROMPTS[0]
    batch = make_batch(processor, scenes, [prompt] * 3)
    plain = model.generate(**batch, **GREEDY)
    start = batch["input_ids"].shape[1]
    recs = detect.row_features(model, processor, [world.render(s) for s in scenes], [prompt] * 3,
                               [processor.tokenizer.decode(r) for r in plain[:, start:]], layers=layers)
    p0 = np.concatenate([det.probability(r["features"]) for r in recs])
    thr, margin = _threshold_between(p0)
    assert margin > 1e-4  # away from ties
    path = det.save(tmp_path / "det.json")
    with engine.attached(model, "dleaf", gamma=1.0, localization="learned", detector=str(path),
                         detector_threshold=thr, trace=True) as iv:
        out = model.generate(**batch, **GREEDY)
    gen = out[:, start:]
    # the row predicting generated token p is position p: its features are those of the reply up to token p - 1
    texts = [processor.tokenizer.decode(r) for r in gen]
    recs = detect.row_features(model, processor, [world.render(s) for s in scenes], [prompt] * 3, texts,
                               layers=layers)
    last = max(layers)
    flags = {}
    n_flags = 0
    for b, r in enumerate(recs):
        assert r["token_ids"] == gen[b].tolist()
        p = det.probability(r["features"])
        assert np.min(np.abs(p - thr)) > 1e-5
        want = p > thr
        f = iv.trace.sample(b)["flag"][:len(p)]
        assert not f[:, :last].any()
        assert (f[:, last:] == torch.as_tensor(want)[:, None]).all()
        flags[str(b)] = {"rows": {int(j): list(range(last, 3)) for j in np.flatnonzero(want)}}
        n_flags += int(want.sum())
    assert 0 < n_flags < gen.numel()
    if layers == [0]:
        assert not torch.equal(out, plain)  # the correction acted
    with engine.attached(model, "dleaf", gamma=1.0, localization="oracle", flags=flags):
        ref = model.generate(**batch, **GREEDY)
    assert torch.equal(ref, out)
    # teacher-forced scoring of the decoded replies: the same logits as the oracle at the same rows
    full = {"input_ids": out, "attention_mask": torch.ones_like(out), "pixel_values": batch["pixel_values"]}
    full["attention_mask"][:, :start] = batch["attention_mask"]
    with engine.attached(model, "dleaf", gamma=1.0, localization="learned", detector=str(path),
                         detector_threshold=thr) as iv:
        a, _ = engine.response_logprobs(model, full, torch.tensor([start] * 3), iv)
    with engine.attached(model, "dleaf", gamma=1.0, localization="oracle", flags=flags) as iv:
        b_, _ = engine.response_logprobs(model, full, torch.tensor([start] * 3), iv)
    assert torch.allclose(a, b_, atol=1e-5)


@torch.no_grad()
def test_learned_under_sampling_and_beam_search_equals_the_oracle_at_its_rows(sharp, make_batch, tmp_path):
    model, processor = sharp
    det, _ = _fitted(model, processor, [0])
    scenes = world.scenes("adversarial", 2)
    prompt = world.CAPTION_PROMPTS[0]
    batch = make_batch(processor, scenes, [prompt] * 2)
    start = batch["input_ids"].shape[1]
    plain = model.generate(**batch, **GREEDY)
    recs = detect.row_features(model, processor, [world.render(s) for s in scenes], [prompt] * 2,
                               [processor.tokenizer.decode(r) for r in plain[:, start:]], layers=[0])
    thr, margin = _threshold_between(np.concatenate([det.probability(r["features"]) for r in recs]))
    assert margin > 1e-4
    path = det.save(tmp_path / "det.json")
    for kw in (dict(do_sample=True, top_k=0), dict(num_beams=2, do_sample=False)):
        torch.manual_seed(0)
        with engine.attached(model, "dleaf", gamma=1.0, localization="learned", detector=str(path),
                             detector_threshold=thr):
            out = model.generate(**batch, max_new_tokens=10, min_new_tokens=10, **kw)
        gen = out[:, start:]
        recs = detect.row_features(model, processor, [world.render(s) for s in scenes], [prompt] * 2,
                                   [processor.tokenizer.decode(r) for r in gen], layers=[0])
        flags = {str(b): {"rows": {int(j): "all" for j in np.flatnonzero(det.probability(r["features"]) > thr)}}
                 for b, r in enumerate(recs)}
        if "num_beams" in kw:  # the returned beams' own rows: teacher-forced under both localizers
            full = {"input_ids": out, "attention_mask": torch.ones_like(out), "pixel_values": batch["pixel_values"]}
            full["attention_mask"][:, :start] = batch["attention_mask"]
            with engine.attached(model, "dleaf", gamma=1.0, localization="learned", detector=str(path),
                                 detector_threshold=thr) as iv:
                a, _ = engine.response_logprobs(model, full, torch.tensor([start] * 2), iv)
            with engine.attached(model, "dleaf", gamma=1.0, localization="oracle", flags=flags) as iv:
                b_, _ = engine.response_logprobs(model, full, torch.tensor([start] * 2), iv)
            assert torch.allclose(a, b_, atol=1e-5)
            continue
        torch.manual_seed(0)
        with engine.attached(model, "dleaf", gamma=1.0, localization="oracle", flags=flags):
            ref = model.generate(**batch, max_new_tokens=10, min_new_tokens=10, **kw)
        assert torch.equal(ref, out)


def test_reliability_and_grouped_bootstrap_on_a_hand_made_case():
    p = np.array([0.1, 0.1, 0.9, 0.9])
    y = np.array([0, 0, 1, 1])
    r = detect.reliability(p, y, n_bins=2)
    assert r["ece"] == pytest.approx(0.1) and r["brier"] == pytest.approx(0.01)
    s = detect.grouped_bootstrap(y, p, [0, 0, 1, 1] and [0, 1, 0, 1], detect_study.auroc, n_resamples=50)
    assert s["value"] == 1.0 and s["low"] == 1.0


def test_the_command_scores_a_caption_and_refuses_another_model(tmp_path, capsys):
    from dleaf.resources import data_path

    if not data_path("detectors", "organism_detector.json").is_file():
        pytest.skip("no shipped detector")
    code = detect.score_main(["--item", "adversarial/1", "--caption", "there is a fork .", "--output_dir",
                              str(tmp_path / "a"), "--threads", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[-1] == f"outputs: {tmp_path / 'a' / 'detect.json'}"
    rec = json.loads((tmp_path / "a" / "detect.json").read_text())
    assert [t["token"] for t in rec["tokens"]] == ["there", "is", "a", "fork", "."]
    assert all(0 <= t["probability"] <= 1 for t in rec["tokens"])
    code = detect.score_main(["--model", "organism_control", "--item", "adversarial/1", "--caption", "a fork .",
                              "--output_dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "fitted on model" in err


def test_the_shipped_detector_is_package_data_and_fits_the_organism():
    import tomllib
    from pathlib import Path

    from dleaf.resources import data_path

    cfg = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "dleaf.data.detectors" in cfg["packages"] and cfg["package-data"]["dleaf.data.detectors"] == ["*.json"]
    det = detect.Detector.load(data_path("detectors", "organism_detector.json"))
    assert det.layers == [0] and det.model["num_layers"] == 6 and len(det.coef) == 14


@torch.no_grad()
def test_labelled_rows_of_any_caption_benchmark_follow_the_premise_records(sharp):
    """The generic path (a vocabulary's mentions, e.g. COCO under CHAIR's rules): a row is positive exactly where
    the premise records call it a hallucinated row, with the same features as row_features."""
    model, processor = sharp
    scenes, images, replies, prompt = _captions()
    got = detect.labelled_rows(model, processor, images, [prompt] * 3, replies, [s.objects for s in scenes], VOCAB)
    prem = premise_check.reply_records(model, processor, images, [prompt] * 3, replies, [s.objects for s in scenes],
                                       VOCAB)["rows"]
    assert got["y"].tolist() == [int(k == "hallucinated") for k in prem["kind"]] and got["y"].sum() >= 1
    assert got["position"].tolist() == prem["position"] and got["caption"].tolist() == prem["sample"]
    recs = detect.row_features(model, processor, images, [prompt] * 3, replies)
    assert np.array_equal(got["X"], np.concatenate([r["features"] for r in recs]))


@torch.no_grad()
def test_dleaf_learned_is_the_learned_localization_at_the_shipped_detector_and_its_threshold():
    """``dleaf_learned`` with no knobs decodes exactly as ``dleaf`` with ``localization="learned"``, the shipped
    detector's file, the threshold recorded in it and gamma 1; it changes captions; another model is refused."""
    from dleaf.generation import generate
    from dleaf.resources import data_path
    from dleaf.settings import Setting

    torch.set_num_threads(1)
    model, processor = models.load("organism")
    model.set_attn_implementation("eager")
    path = data_path("detectors", "organism_detector.json")
    det = detect.Detector.load(path)
    assert det.threshold == 0.1651 and det.meta["threshold_rule"] == detect.THRESHOLD_RULE
    bench, items = detect_study._items("adversarial", 0, 12)

    def decode(setting):
        return [r["token_ids"] for r in generate(model, processor, items, setting, bench.max_new_tokens(), 12,
                                                 bench.protocol.sentence_rule, token_ids=True)]

    named = decode(Setting("dleaf_learned"))
    explicit = decode(Setting("dleaf", {"localization": "learned", "detector": str(path),
                                        "detector_threshold": 0.1651, "gamma": 1.0}))
    greedy = decode(Setting())
    assert named == explicit
    assert sum(a != b for a, b in zip(named, greedy)) >= 2
    other, _ = models.load("organism_control")
    with pytest.raises(ValueError, match="fitted on model"):
        engine.attach(other.eval(), "dleaf_learned")


@torch.no_grad()
@pytest.mark.parametrize("method,knobs", [("pai", {"alpha": 0.9, "layer_start": 0}),
                                          ("spin", {"keep_ratio": 0.5, "scale": 0.0})])
def test_pai_and_spin_take_the_learned_localization(sharp, make_batch, tmp_path, method, knobs):
    """Another correction at the learned localizer's flags: it decodes as the same correction at oracle flags on the
    rows whose teacher-forced detector probability exceeds the threshold (every layer, the detector reading layer
    0), and it acts."""
    model, processor = sharp
    det, _ = _fitted(model, processor, [0])
    scenes = world.scenes("adversarial", 3)
    prompt = world.CAPTION_PROMPTS[0]
    batch = make_batch(processor, scenes, [prompt] * 3)
    plain = model.generate(**batch, **GREEDY)
    start = batch["input_ids"].shape[1]
    images = [world.render(s) for s in scenes]
    recs = detect.row_features(model, processor, images, [prompt] * 3,
                               [processor.tokenizer.decode(r) for r in plain[:, start:]], layers=[0])
    thr, margin = _threshold_between(np.concatenate([det.probability(r["features"]) for r in recs]))
    assert margin > 1e-4
    path = det.save(tmp_path / "det.json")
    with engine.attached(model, method, localization="learned", detector=str(path), detector_threshold=thr, **knobs):
        out = model.generate(**batch, **GREEDY)
    gen = out[:, start:]
    recs = detect.row_features(model, processor, images, [prompt] * 3,
                               [processor.tokenizer.decode(r) for r in gen], layers=[0])
    flags, n = {}, 0
    for b, r in enumerate(recs):
        assert r["token_ids"] == gen[b].tolist()
        p = det.probability(r["features"])
        assert np.min(np.abs(p - thr)) > 1e-5
        flags[str(b)] = {"rows": {int(j): [0, 1, 2] for j in np.flatnonzero(p > thr)}}
        n += int((p > thr).sum())
    assert 0 < n < gen.numel()
    with engine.attached(model, method, localization="oracle", flags=flags, **knobs):
        ref = model.generate(**batch, **GREEDY)
    assert torch.equal(ref, out)
    assert not torch.equal(out, plain)


def test_the_detector_study_takes_a_model_and_checks_it_before_any_work(tmp_path, capsys):
    """``python -m dleaf.detect --model``: another organism checkpoint gets its own detector file name, and a model
    that is not there is refused (exit 2, one error line) before the output folder is made."""
    assert detect_study.detector_file_name("organism") == "organism_detector.json"
    assert detect_study.detector_file_name("data/organism_llava_like/") == "organism_llava_like_detector.json"
    assert detect_study.detector_file_name("runs/my_run") == "my_run_detector.json"
    out = tmp_path / "out"
    code = detect_study.main(["--model", str(tmp_path / "no_such_checkpoint"), "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "error: model folder not found" in err and "no_such_checkpoint" in err, err
    assert "Traceback" not in err and not out.exists()
