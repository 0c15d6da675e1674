"""Tests for dleaf.attention_regime: each statistic against a brute-force loop on small hand-made attention tensors
(continuous random weights, so no ties), the summaries, the regime judgments on hand-made tables, and the driver on
the committed organism against a forward pass of its own."""

import math

import numpy as np
import pytest
import torch

from dleaf import attention_regime as ar
from dleaf import models

H, Q, K = 3, 4, 9
IMAGE = torch.tensor([False, True, True, True, True, False, False, False, False])  # keys 1-4 are image tokens


def _attn(seed=0, h=H, q=Q, k=K, rows=None):
    """Causal attention: row j (absolute position rows[j]) attends to keys 0..rows[j]."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(k - q, k) if rows is None else rows
    logits = torch.randn(h, q, k, generator=g, dtype=torch.float64) * 2
    allowed = torch.arange(k)[None, :] <= rows[:, None]
    return torch.where(allowed, logits, torch.tensor(-math.inf, dtype=torch.float64)).softmax(-1), rows


def test_middle_layers_are_the_middle_half():
    assert ar.middle_layers(6) == [2, 3, 4]
    assert ar.middle_layers(32) == list(range(8, 24))
    assert ar.middle_layers(4) == [1, 2]
    assert ar.middle_layers(1) == [0]
    with pytest.raises(ValueError):
        ar.middle_layers(0)


def test_key_mask_and_share_brute_force():
    valid = torch.tensor([False, True, True, True, True, True, True, True, True])  # key 0 is padding
    rows = torch.tensor([4, 6, 8])
    keys = ar.key_mask(valid, rows)
    share = ar.key_share(IMAGE, keys)
    for j, q in enumerate(rows.tolist()):
        seen = [k for k in range(K) if valid[k] and k <= q]
        assert keys[j].nonzero().squeeze(-1).tolist() == seen
        assert share[j].item() == pytest.approx(sum(bool(IMAGE[k]) for k in seen) / len(seen))


def test_sink_weights_and_key_weight_brute_force():
    a, _ = _attn(1)
    sink, head = ar.sink_weights(a, IMAGE)
    first = ar.key_weight(a, 0)
    for q in range(Q):
        text = [k for k in range(K) if not IMAGE[k]]
        assert sink[q].item() == pytest.approx(max(sum(a[h, q, k].item() for h in range(H)) / H for k in text))
        assert head[q].item() == pytest.approx(max(a[h, q, k].item() for h in range(H) for k in text))
        assert first[q].item() == pytest.approx(sum(a[h, q, 0].item() for h in range(H)) / H)


def test_sink_key_is_the_argmax_of_the_head_mean_over_text_keys():
    for seed in range(5):
        a, _ = _attn(10 + seed)
        key = ar.sink_key(a, IMAGE)
        sink, _ = ar.sink_weights(a, IMAGE)
        for q in range(Q):
            text = [k for k in range(K) if not IMAGE[k]]
            means = {k: sum(a[h, q, k].item() for h in range(H)) / H for k in text}
            best, second = sorted(means.values(), reverse=True)[:2]
            assert best - second > 1e-6  # continuous weights: no tie to break
            assert key[q].item() == max(means, key=means.get) and not IMAGE[key[q]]
            assert a[:, q, key[q]].mean().item() == pytest.approx(sink[q].item())
    # a sink planted on an image key is not a text sink: the text argmax is reported
    a = torch.full((1, 1, K), 0.02, dtype=torch.float64)
    a[0, 0, 2], a[0, 0, 6] = 0.5, 0.1
    assert ar.sink_key(a, IMAGE).item() == 6


def test_mass_ratio_brute_force():
    a, rows = _attn(2)
    keys = ar.key_mask(torch.ones(K, dtype=torch.bool), rows)
    ratio = ar.mass_ratio(a, IMAGE, keys)
    for j, q in enumerate(rows.tolist()):
        mass = sum(a[h, j, k].item() for h in range(H) for k in range(K) if IMAGE[k]) / H
        share = sum(bool(IMAGE[k]) for k in range(q + 1)) / (q + 1)
        assert ratio[j].item() == pytest.approx(mass / share)
    uniform = torch.full((1, 1, K), 1.0 / K, dtype=torch.float64)
    assert ar.mass_ratio(uniform, IMAGE, torch.ones(1, K, dtype=torch.bool)).item() == pytest.approx(1.0)


def test_top_image_head_entropy_region_brute_force():
    a, _ = _attn(3)
    share, idx = ar.top_image(a, IMAGE)
    ent = ar.head_entropy(a, IMAGE)
    region = torch.zeros(K, dtype=torch.bool)
    region[[2, 3, 6]] = True  # key 6 is not an image key and must not count
    reg = ar.region_share(a, IMAGE, region)
    liae = ar.layer_entropy(a, IMAGE, normalize=True)
    img = [k for k in range(K) if IMAGE[k]]
    for h in range(H):
        for q in range(Q):
            mass = sum(a[h, q, k].item() for k in img)
            p = [a[h, q, k].item() / mass for k in img]
            best = max(range(len(p)), key=lambda i: p[i])
            assert share[h, q].item() == pytest.approx(p[best]) and idx[h, q].item() == best
            assert ent[h, q].item() == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(len(img)))
            assert reg[h, q].item() == pytest.approx(p[1] + p[2])
    for q in range(Q):
        mixed = [sum(a[h, q, k].item() / sum(a[h, q, i].item() for i in img) for h in range(H)) / H for k in img]
        assert liae[q].item() == pytest.approx(-sum(x * math.log(x) for x in mixed) / math.log(len(img)))


def test_region_share_per_row_regions():
    a, _ = _attn(4)
    region = torch.zeros(Q, K, dtype=torch.bool)
    region[0, 1] = region[1, [1, 2]] = region[2, 4] = True  # row 3: no region
    reg = ar.region_share(a, IMAGE, region)
    for q in range(Q):
        single = ar.region_share(a[:, q:q + 1], IMAGE, region[q])[:, 0]
        assert torch.allclose(reg[:, q], single)
    assert torch.all(reg[:, 3] == 0)


def test_top_consistency_brute_force():
    top = torch.tensor([[2, 2, 0, 2, 1], [3, 1, 1, 0, 1], [4, 4, 4, 4, 4]])
    want = np.mean([3 / 5, 3 / 5, 1.0])
    assert ar.top_consistency(top) == pytest.approx(want)
    assert math.isnan(ar.top_consistency(torch.zeros(2, 0, dtype=torch.long)))


def test_summarize_matches_sorted_interpolation():
    x = [5.0, 1.0, 3.0, 2.0, 4.0, float("nan")]
    s = ar.summarize(x)
    assert s["n"] == 5 and s["median"] == 3.0
    assert s["p10"] == pytest.approx(1.4) and s["p90"] == pytest.approx(4.6)
    assert ar.summarize([])["n"] == 0 and math.isnan(ar.summarize([])["median"])


def test_box_tokens():
    # a 4 x 4 grid on a 100 x 100 image: the top-left quarter holds tokens 0, 1, 4, 5
    assert ar.box_tokens((0, 0, 50, 50), (100, 100), (4, 4), crop="none") == [0, 1, 4, 5]
    # a 200 x 100 image centre-cropped to its middle 100 x 100 square: x 50..150 is the whole grid width
    assert ar.box_tokens((50, 0, 100, 50), (200, 100), (2, 2)) == [0]
    assert ar.box_tokens((0, 0, 40, 100), (200, 100), (2, 2)) == []
    with pytest.raises(ValueError):
        ar.box_tokens((0, 0, 1, 1), (2, 2), (1, 1), crop="pad")


def _stat(median, p10=None, p90=None):
    return {"median": median, "p10": median if p10 is None else p10, "p90": median if p90 is None else p90, "n": 10}


def _table(sink=0.02, ratio=0.95, top=0.05, same=0.2, ground=0.2, n_layers=6):
    layers = []
    for l in range(n_layers):
        row = {"layer": l, **{k: _stat(0.01) for k in ar.ROW_STATS}}
        row.update(sink=_stat(sink[l] if isinstance(sink, list) else sink),
                   mass_ratio=_stat(ratio[l] if isinstance(ratio, list) else ratio),
                   top_share=_stat(top[l] if isinstance(top, list) else top),
                   consistency=_stat(same[l] if isinstance(same, list) else same),
                   head_entropy=_stat(0.99), head_entropy_min_head={"head": 0, **_stat(0.98)})
        if ground is not None:
            row["grounding_head"] = {"head": 1, **_stat(ground[l] if isinstance(ground, list) else ground)}
            row["grounding_rowmax"] = _stat(0.3)
        layers.append(row)
    return {"n_layers": n_layers, "middle_layers": ar.middle_layers(n_layers), "n_rows": 10, "n_captions": 2,
            "n_grounded": 50 if ground is not None else 0, "layers": layers, "grounding_chance": 0.111}


def _met(table):
    return [t["met"] for t in ar.regime_targets(table)]


def test_regime_targets_on_a_uniform_regime_meet_nothing():
    assert _met(_table()) == [False, False, False, False]
    assert _met(_table(ground=None))[3] is None


def test_regime_targets_judge_each_regime_at_its_threshold():
    # sink: layer 2 on counts, layer 1 does not
    assert _met(_table(sink=[0, 0.9, 0, 0, 0, 0]))[0] is False
    assert _met(_table(sink=[0, 0, 0, 0, 0, 0.30]))[0] is True
    # deficit: every middle layer (2-4) at or under 0.5
    assert _met(_table(ratio=[0.9, 0.9, 0.5, 0.3, 0.4, 0.9]))[1] is True
    assert _met(_table(ratio=[0.1, 0.1, 0.5, 0.51, 0.4, 0.1]))[1] is False
    # visual sinks: share and consistency in the same middle layer
    assert _met(_table(top=[0, 0, 0, 0.2, 0, 0], same=[0, 0, 0, 0.7, 0, 0]))[2] is True
    assert _met(_table(top=[0, 0, 0.3, 0, 0, 0], same=[0, 0, 0, 0.9, 0, 0]))[2] is False
    assert _met(_table(top=[0.9] * 6, same=[0.9, 0.9, 0.6, 0.6, 0.6, 0.9]))[2] is False
    # grounding heads: a middle layer's best head
    assert _met(_table(ground=[0.1, 0.1, 0.1, 0.1, 0.5, 0.1]))[3] is True
    assert _met(_table(ground=[0.9, 0.9, 0.4, 0.4, 0.4, 0.9]))[3] is False


def test_regime_markdown_prints_the_tables_and_judgments():
    md = ar.regime_markdown(_table(sink=0.5), name="m")
    assert "### Attention regime, m" in md and "middle layers 2, 3, 4" in md
    assert "| 0 | 0.500 [0.500, 0.500] |" in md
    assert md.count("| yes |") == 1 and md.count("| no |") == 3
    assert "not judged" in ar.regime_markdown(_table(ground=None))
    # where the sink key lies, as percentages; a table written before the column has a dash there
    t = _table(sink=0.5)
    t["layers"][2]["sink_key"] = {"first": 0.75, "prompt": 0.2, "reply": 0.05}
    md = ar.regime_markdown(t)
    assert "| 2 | 0.500 [0.500, 0.500] | 75 / 20 / 5 |" in md and "| 3 | 0.500 [0.500, 0.500] | - |" in md


@pytest.fixture(scope="module")
def organism():
    return models.load("organism", device="cpu")


def test_regime_records_on_the_organism_match_its_own_attention(organism):
    from dleaf.models import teacher_forced_inputs
    from dleaf.organism import world
    from dleaf.organism.benchmarks import VOCAB
    from dleaf.organism.regime import scene_regions
    from dleaf.premise_check import mention_token_offsets

    model, processor = organism
    scenes = world.scenes("adversarial", 3)
    images = [world.render(s) for s in scenes]
    prompt = "describe the image ."
    replies = [" ".join(f"there is a {o} ." for o in s.objects) + " there is also a fork ." for s in scenes]
    truths = [sorted(s.objects) for s in scenes]
    regions = scene_regions(scenes, 36)
    rec = ar.regime_records(model, processor, images, [prompt] * 3, replies, truths, VOCAB, regions, batch_size=2)
    rows = rec["rows"]
    n_rows = sum(len(processor.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
    assert rows["sink"].shape == (n_rows, 6) and rows["head_entropy"].shape == (n_rows, 6, 6)
    assert rec["consistency"].shape == (3, 6)
    n_grounded = sum(len(s.objects) for s in scenes) - sum("fork" in s.objects for s in scenes)
    assert rec["grounding"]["region"].shape == (n_grounded, 6, 6)
    assert np.allclose(rec["grounding"]["chance"], 4 / 36)
    # brute force on the first caption, layer 3, from a forward pass of our own
    full, n, ids = teacher_forced_inputs(processor, [prompt], images[:1], replies[:1], model)
    checked_keys = []
    with torch.no_grad():
        att = model(**full, output_attentions=True).attentions[3][0].double()
    image = full["input_ids"][0] == model.config.image_token_index
    img = image.nonzero().squeeze(-1).tolist()
    for j in range(len(ids[0])):
        q = n - 1 + j
        a = att[:, q, :q + 1]
        text = [k for k in range(q + 1) if k not in img]
        assert rows["sink"][j, 3] == pytest.approx(max(a[:, k].mean().item() for k in text), rel=1e-5)
        assert rows["first"][j, 3] == pytest.approx(a[:, 0].mean().item(), rel=1e-5)
        assert rows["uniform"][j, 3] == pytest.approx(1 / (q + 1))
        mass = a[:, img].sum(-1).mean().item()
        assert rows["mass_ratio"][j, 3] == pytest.approx(mass / (len(img) / (q + 1)), rel=1e-5)
        means = sorted(((a[:, k].mean().item(), k) for k in text), reverse=True)
        if means[0][0] - means[1][0] > 1e-4:  # away from a float32 tie between two keys
            k = means[0][1]
            checked_keys.append(rows["sink_key"][j, 3] == (0 if k == 0 else 1 if k < n else 2))
    # the first grounded row: the mention's first token, its object's four patches
    s0 = scenes[0]
    obj = s0.objects[0]
    spans = [(f, m) for f, m in mention_token_offsets(processor.tokenizer, ids[0], VOCAB) if m.category in s0.objects]
    first, m = spans[0]
    assert m.category == obj
    a = att[:, n - 1 + first, :]
    patch = [img[t] for t in regions[0][obj]]
    want = (a[:, patch].sum(-1) / a[:, img].sum(-1)).numpy()
    assert np.allclose(rec["grounding"]["region"][0, 3], want, rtol=1e-5)
    assert len(checked_keys) >= len(ids[0]) // 2 and all(checked_keys)
    assert rows["sink_key"].shape == (n_rows, 6) and set(np.unique(rows["sink_key"])) <= {0, 1, 2}
    table = ar.regime_table(rec)
    assert table["n_rows"] == n_rows and table["n_grounded"] == n_grounded and table["middle_layers"] == [2, 3, 4]
    for l in range(6):
        codes = rows["sink_key"][:, l].tolist()
        assert table["layers"][l]["sink_key"] == {name: codes.count(i) / n_rows for i, name in enumerate(ar.SINK_KEYS)}
    assert len(ar.regime_targets(table)) == 4


def test_regime_records_switch_to_eager_and_back(organism):
    model, processor = organism
    from dleaf.organism import world

    scene = world.scenes("adversarial", 1)[0]
    model.set_attn_implementation("sdpa")
    try:
        rec = ar.regime_records(model, processor, [world.render(scene)], ["describe the image ."],
                                ["there is a cup ."])
        assert model.config._attn_implementation == "sdpa"
    finally:
        model.set_attn_implementation("eager")
    assert rec["rows"]["sink"].shape[1] == 6 and len(rec["grounding"]["region"]) == 0
    with pytest.raises(ValueError, match="regions need"):
        ar.regime_records(model, processor, [world.render(scene)], ["x"], ["y"], regions=[{}])


def test_the_profile_measures_and_prints_the_regime_when_asked(organism):
    from dleaf.organism.profile import ProfileProtocol, profile_markdown, profile_model

    model, processor = organism
    protocol = ProfileProtocol(n_images=3, caption_splits=("adversarial",), premise_splits=("adversarial",),
                               pope_negatives=("random",), batch_size=3, n_bootstrap=20)
    res = profile_model(model, processor, protocol, attention_regime=True)
    table = res["attention_regime"]["adversarial"]
    assert table["n_captions"] == 3 and table["middle_layers"] == [2, 3, 4] and table["n_grounded"] > 0
    md = profile_markdown({"protocol": {"n_images": 3, "pope_split": "adversarial"}, "models": {"organism": res}})
    assert "## Attention regime" in md and "### Attention regime, organism, adversarial" in md
    assert "grounding heads: some middle-layer" in md
    plain = {k: v for k, v in res.items() if k != "attention_regime"}
    assert "## Attention regime" not in profile_markdown({"models": {"organism": plain}})


def test_the_profile_script_has_the_regime_option():
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "profile_organism.py"
    parser = runpy.run_path(str(script), run_name="script")["build_parser"]()
    assert parser.parse_args(["--attention_regime"]).attention_regime is True
    assert parser.parse_args([]).attention_regime is False


def test_regime_of_a_harness_run_with_regions_from_items(organism, tmp_path):
    from dleaf import eval as harness
    from dleaf.organism import world
    from dleaf.organism.regime import scene_regions

    model, processor = organism
    harness.run_evaluation(harness.EvalArguments(
        benchmark="organism_caption", splits=["adversarial"], limit=2, batch_size=2, progress=False,
        output_dir=str(tmp_path / "run")), model, processor)
    scenes = {f"adversarial/{i}": s for i, s in enumerate(world.scenes("adversarial", 2))}
    out = ar.regime_of_run(tmp_path / "run", regions=lambda it: scene_regions([scenes[it.id]], 36)[0],
                           say=lambda m: None)
    table = out["adversarial"]
    assert table["n_captions"] == 2 and table["n_grounded"] > 0 and len(table["layers"]) == 6
    plain = ar.regime_of_run(tmp_path / "run", say=lambda m: None)["adversarial"]
    assert plain["n_grounded"] == 0 and plain["layers"][3]["sink"] == table["layers"][3]["sink"]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_batch_stats_on_tiny_models_of_real_families(family):
    import model_families

    model, inputs = getattr(model_families, family)()
    width, t = inputs["input_ids"].shape[1], 3  # the last three columns stand for every sample's reply
    replies = [row[-t:].tolist() for row in inputs["input_ids"]]
    model.set_attn_implementation("sdpa")
    try:
        out = ar.batch_stats(model, inputs, width - t, replies, grounded=[[(1, [0, 1])], []])
    finally:
        model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions
    n_layers, n_heads = len(att), att[0].shape[1]
    for i, rec in enumerate(out):
        image = (inputs["input_ids"][i] == model_families.IMAGE) & inputs["attention_mask"][i].bool()
        img = image.nonzero().squeeze(-1).tolist()
        assert rec["rows"]["sink"].shape == (t, n_layers) and rec["head_entropy"].shape == (t, n_layers, n_heads)
        first = int(inputs["attention_mask"][i].nonzero()[0])
        for l in range(n_layers):
            for j in range(t):
                q = width - t - 1 + j
                a = att[l][i][:, q].double()
                seen = [k for k in range(width) if inputs["attention_mask"][i, k] and k <= q]
                assert rec["rows"]["first"][j, l] == pytest.approx(a[:, first].mean().item(), rel=1e-4)
                want = a[:, img].sum(-1).mean().item() / (len(img) / len(seen))
                assert rec["rows"]["mass_ratio"][j, l] == pytest.approx(want, rel=1e-4)
        assert len(rec["region"]) == (1 if i == 0 else 0)
    q = width - t  # the row predicting reply token 1 of sample 0
    img0 = ((inputs["input_ids"][0] == model_families.IMAGE) & inputs["attention_mask"][0].bool()).nonzero()
    img0 = img0.squeeze(-1).tolist()
    for l in range(n_layers):
        a = att[l][0][:, q].double()
        want = (a[:, img0[:2]].sum(-1) / a[:, img0].sum(-1)).numpy()
        assert np.allclose(out[0]["region"][0][l], want, rtol=1e-4)
    assert out[0]["chance"] == [2 / len(img0)]


def test_a_table_read_back_from_strict_json_is_still_judged():
    from dleaf.io import loads_strict, to_json

    table = _table()
    for row in table["layers"]:
        row["consistency"] = ar.summarize([])  # no caption with two rows: NaN, written as null
    back = loads_strict(to_json(table))
    assert back["layers"][0]["consistency"]["median"] is None
    assert [t["met"] for t in ar.regime_targets(back)] == [False, False, False, False]
    assert "| - |" in ar.regime_markdown(back)


def test_grounding_heads_are_not_judged_on_a_handful_of_rows():
    table = _table(ground=0.9)
    assert _met(table)[3] is True
    table["n_grounded"] = 19
    target = ar.regime_targets(table)[3]
    assert target["met"] is None and "on only 19 grounded rows" in target["measured"]


def test_batch_stats_places_each_rows_sink_key_in_the_first_prompt_or_reply_keys():
    """Planted attention through batch_stats: a left-padded sample (its first key at position 1) whose three reply
    rows put their largest text weight on the first key, on a prompt key and on a reply key."""
    from types import SimpleNamespace

    img = 9
    # position: 0 pad, 1 <s>, 2-3 image, 4 prompt word | reply tokens at 5, 6, 7
    ids = torch.tensor([[0, 1, img, img, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])
    n = 5  # prompt width: rows 4, 5, 6 predict the reply tokens
    a = torch.zeros(1, 2, 8, 8)
    for q, (sink, rest) in {4: (1, (2, 3, 4)), 5: (4, (1, 2, 3, 5)), 6: (5, (1, 2, 3, 4, 6))}.items():
        a[0, :, q, sink] = 0.6
        a[0, :, q, list(rest)] = 0.4 / len(rest)
    a[0, :, 4, 2] += 1.0  # an image key above the first key's weight: not a text sink
    a[0, :, 4] /= a[0, :, 4].sum(-1, keepdim=True)
    fake = type("Fake", (), {"config": SimpleNamespace(image_token_id=img),
                             "__call__": lambda self, **kw: SimpleNamespace(attentions=(a, a))})()
    assert a[0, 0, 4, 2] > a[0, 0, 4, 1] > a[0, 0, 4, 4]
    rec = ar.batch_stats(fake, {"input_ids": ids, "attention_mask": mask}, n, [[5, 6, 7]])[0]
    assert rec["sink_key"].tolist() == [[0, 0], [1, 1], [2, 2]]
    table = ar.regime_table({"rows": {**rec["rows"], "sink_key": rec["sink_key"],
                                      "head_entropy": rec["head_entropy"]},
                             "consistency": np.zeros((0, 2)), "grounding": {"region": [], "chance": []}})
    assert table["layers"][1]["sink_key"] == {"first": pytest.approx(1 / 3), "prompt": pytest.approx(1 / 3),
                                              "reply": pytest.approx(1 / 3)}
