"""The correspondence suite: implicit rewards (against TRL), D-LEAF as a DPO step (loss, curve, slope), the
statistics (against independent computations, by-construction nulls, bad input), the report and the script."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dleaf.config import DLeafConfig
from dleaf.organism import build, world
from dpo_link import correspondence as C
from dpo_link import dleaf_dpo, pairs, rewards
from dpo_link import reward_shift as rs
from dpo_link.collate import VisionPreferenceCollator

ROOT = Path(__file__).resolve().parents[1]
TINY = build.OrganismShape(text_hidden=32, text_layers=2, text_heads=4, text_intermediate=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two threads on a shared 2-core machine are many times slower than one for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def processor():
    return build.build_processor(TINY)


@pytest.fixture(scope="module")
def rows():
    return pairs.organism_examples(pairs.OrganismPairConfig(n=8, question_fraction=0.25))


def _tiny_peft(processor, init_lora_weights=False, seed=0, peaky=False, double=False):
    from peft import LoraConfig, get_peft_model

    model = build.build_model(processor.tokenizer, TINY, seed=seed)
    model.set_attn_implementation("eager")
    if peaky:  # sharper attention, so that D-LEAF's correction moves the log-probabilities visibly
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "language_model" in name and ("q_proj" in name or "k_proj" in name):
                    p.mul_(4)
    if double:
        model = model.double()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=init_lora_weights))
    return peft_model.eval()


def _double(batches):
    return [dict(b, pixel_values=b["pixel_values"].double()) for b in batches]


# ------------------------------------------------------------------------------------------- implicit rewards
def test_implicit_rewards_equal_trl_logged_rewards(tmp_path, processor, rows):
    """TRL's own DPOTrainer.evaluate on the same model, adapter, beta and batch logs the batch means of r_theta."""
    from trl import DPOConfig, DPOTrainer

    from peft import LoraConfig

    model = build.build_model(processor.tokenizer, TINY, seed=0)
    model.set_attn_implementation("eager")
    beta = 0.3
    ds = pairs._dataset([dict(r) for r in rows])
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, per_device_eval_batch_size=len(rows), use_cpu=True,
                     bf16=False, report_to="none", disable_tqdm=True, max_length=None)
    # as dpo_link.train builds it: TRL wraps the base model in a new adapter (random here, so rewards are nonzero)
    # and takes the reference by disabling it
    torch.manual_seed(0)
    trainer = DPOTrainer(model=model, args=args, eval_dataset=ds, train_dataset=ds, processing_class=processor,
                         data_collator=VisionPreferenceCollator(processor=processor),
                         peft_config=LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    logged = trainer.evaluate()
    batches = list(rs.pair_batches(rows, processor, batch_size=len(rows)))
    rr = rs.score_rows(trainer.model, batches, beta, mass=False)
    r = rr.rewards("adapter")
    chosen, rejected = r[: len(rows)], r[len(rows):]
    assert logged["eval_rewards/chosen"] == pytest.approx(chosen.mean(), abs=1e-5)
    assert logged["eval_rewards/rejected"] == pytest.approx(rejected.mean(), abs=1e-5)
    assert logged["eval_rewards/margins"] == pytest.approx((chosen - rejected).mean(), abs=1e-5)
    assert logged["eval_rewards/accuracies"] == pytest.approx(float((chosen > rejected).mean()))
    stats = dleaf_dpo.dpo_loss(chosen, rejected)
    assert logged["eval_loss"] == pytest.approx(stats["loss"], abs=1e-5)
    assert np.abs(r).sum() > 0
    # per row, against dpo_link.rewards (plain forward passes, no engine)
    c2, r2 = rewards.implicit_rewards(trainer.model, batches[0][0], beta)
    np.testing.assert_allclose(chosen, c2.double().numpy(), atol=2e-5)
    np.testing.assert_allclose(rejected, r2.double().numpy(), atol=2e-5)


def test_token_rewards_sum_to_sequence_rewards_and_match_a_token_loop(processor, rows):
    peft_model = _tiny_peft(processor)
    batches = list(rs.pair_batches(rows[:3], processor, batch_size=3))
    rr = rs.score_rows(peft_model, batches, 0.5, [rs.Policy("dleaf", DLeafConfig(gamma=0.8, kappa=0.0))], mass=False)
    for name in ("adapter", "dleaf"):
        tok = rr.token_rewards(name)
        np.testing.assert_allclose([t.sum() for t in tok], rr.rewards(name), rtol=1e-12)
    # an independent loop: one row at a time, log p of each reply token from the plain model's logits
    batch = batches[0][0]
    ids, cm = batch["input_ids"], batch["completion_mask"].bool()
    for b in range(ids.shape[0]):
        n = int(batch["attention_mask"][b].sum())
        one = {"input_ids": ids[b:b + 1, :n], "attention_mask": batch["attention_mask"][b:b + 1, :n],
               "pixel_values": batch["pixel_values"][b:b + 1]}
        with torch.no_grad():
            on = torch.log_softmax(peft_model(**one).logits[0].double(), -1)
            with peft_model.disable_adapter():
                off = torch.log_softmax(peft_model(**one).logits[0].double(), -1)
        cols = cm[b, :n].nonzero().flatten()
        expected = [0.5 * float(on[c - 1, ids[b, c]] - off[c - 1, ids[b, c]]) for c in cols]
        np.testing.assert_allclose(rr.token_rewards("adapter")[b], expected, atol=1e-5)
        assert len(rr.token_ids[b]) == len(cols)


def test_response_batches_tokenize_like_the_chosen_half(processor, rows):
    pair_batch = next(rs.pair_batches(rows[:3], processor, 3))[0]
    single = [{"images": r["images"], "prompt": r["prompt"], "response": r["chosen"]} for r in rows[:3]]
    resp_batch = next(rs.response_batches(single, processor, 3))[0]
    for key in ("input_ids", "attention_mask", "completion_mask"):  # equal on every unpadded column
        a = resp_batch[key] * resp_batch["attention_mask"]
        b = (pair_batch[key] * pair_batch["attention_mask"])[:3]
        w = min(a.shape[1], b.shape[1])
        assert torch.equal(a[:, :w], b[:, :w]) and not a[:, w:].any() and not b[:, w:].any()
    assert torch.equal(resp_batch["pixel_values"], pair_batch["pixel_values"][:3])


def test_identical_policies_give_zero_rewards_and_loss_log2(processor, rows):
    peft_model = _tiny_peft(processor, init_lora_weights=True)  # LoRA B = 0: the adapter is the identity
    batches = list(rs.pair_batches(rows, processor, 4))
    rr = rs.score_rows(peft_model, batches, 0.1, [rs.Policy("dleaf0", DLeafConfig(gamma=0.0))], mass=False)
    for name in ("adapter", "dleaf0"):
        r = rr.rewards(name)
        assert np.all(r == 0.0)
        ci, ri = [], []
        for _, sl in batches:
            off = 2 * sl.start
            n = sl.stop - sl.start
            ci += range(off, off + n)
            ri += range(off + n, off + 2 * n)
        stats = dleaf_dpo.dpo_loss(r[ci], r[ri])
        assert stats["loss"] == math.log(2) and math.isnan(stats["accuracy_p_value"])
    curve = dleaf_dpo.loss_curve(peft_model, [b for b, _ in batches], 0.1, DLeafConfig(), [0.0])
    assert curve[0]["loss"] == math.log(2) and curve[0]["ties"] == 1.0


def test_mass_trace_equals_output_attentions(processor, rows):
    """The per-head image mass read from the trace, at the rows that predict reply tokens, against an independent
    computation from the plain model's output_attentions."""
    peft_model = _tiny_peft(processor)
    batch = next(rs.pair_batches(rows[:2], processor, 2))[0]
    base = peft_model.get_base_model()
    s = rs.score(base, batch, rs.MASS_PROBE, trace=True)
    with torch.no_grad():
        out = base(**rs._model_inputs(batch), output_attentions=True)
    att = torch.stack(out.attentions, 1)  # (B, L, H, T, T)
    image = batch["input_ids"] == base.config.image_token_id
    for b in range(att.shape[0]):
        cols = s.mask[b].nonzero().flatten() - 1
        mass = att[b][..., image[b]].sum(-1)[:, :, cols].permute(2, 0, 1)  # (T, L, H)
        np.testing.assert_allclose(s.mass[b], mass.numpy(), atol=1e-6)


# --------------------------------------------------------------------------------------- D-LEAF as a DPO step
@pytest.mark.parametrize("kappa", [0.0, 1.0])
def test_autograd_slope_agrees_with_finite_difference(processor, rows, kappa):
    model = _tiny_peft(processor, peaky=True, double=True)
    batches = _double([b for b, _ in rs.pair_batches(rows[:6], processor, 3)])
    cfg = DLeafConfig(kappa=kappa)
    slope = dleaf_dpo.loss_slope(model, batches, 1.0, cfg)
    fd = dleaf_dpo.finite_difference_slope(model, batches, 1.0, cfg, h=1e-2)
    assert slope["loss_at_0"] == math.log(2)
    assert abs(slope["slope"]) > 1e-5
    assert fd["central"] == pytest.approx(slope["slope"], rel=0.02)


def test_loss_curve_through_gamma_override(processor, rows):
    model = _tiny_peft(processor, peaky=True)
    batches = [b for b, _ in rs.pair_batches(rows[:4], processor, 4)]
    curve = dleaf_dpo.loss_curve(model, batches, 1.0, DLeafConfig(kappa=0.0), [-0.1, 0.0, 0.5])
    assert [c["gamma"] for c in curve] == [-0.1, 0.0, 0.5]
    assert curve[1]["loss"] == math.log(2)
    assert curve[0]["loss"] != math.log(2) and curve[2]["loss"] != math.log(2)
    assert dleaf_dpo.sweep_slope(curve) == pytest.approx((curve[2]["loss"] - math.log(2)) / 0.5)


def test_random_target_null_keeps_dleafs_sites_and_strength(processor, rows):
    model = _tiny_peft(processor, peaky=True).get_base_model()
    batch = next(rs.pair_batches(rows[:2], processor, 2))[0]
    cfg = DLeafConfig(gamma=0.7, kappa=0.0)
    d = rs.score(model, batch, cfg, trace=True)
    n = rs.score(model, batch, cfg, trace=True, intervention_factory=rs.random_target_factory(0))
    base = rs.score(model, batch, None)
    for a, b in zip(d.flagged, n.flagged):  # flags of the first layer are those of the unchanged attention
        assert np.array_equal(a[:, 0], b[:, 0])
    assert not torch.equal(n.logprobs, d.logprobs) and not torch.equal(n.logprobs, base.logprobs)
    zero = rs.score(model, batch, DLeafConfig(gamma=0.0, kappa=0.0),
                    intervention_factory=rs.random_target_factory(0))
    assert torch.equal(zero.logprobs, base.logprobs)
    # during generation (one active row per step) the null still fuses toward a random head
    from dleaf.organism.profile import _prompt_batch

    inputs = _prompt_batch(processor, world.scenes("adversarial", 2, 0), [world.CAPTION_PROMPTS[0]] * 2)
    with torch.no_grad():
        iv = rs.random_target_factory(0)(model, DLeafConfig(gamma=1.0, localization="everywhere"), False)
        try:
            nulled = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                                    return_dict_in_generate=True)
        finally:
            iv.detach()
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)
    assert not torch.allclose(nulled.scores[0], plain.scores[0])


# ------------------------------------------------------------------------------------------------ statistics
def test_correlations_against_numpy_and_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = 0.6 * x + rng.normal(size=60)
    out = C.correlations(x, y, n_resamples=200, permutations=200)
    from scipy import stats

    assert out["pearson"]["estimate"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert out["spearman"]["estimate"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert out["kendall"]["estimate"] == pytest.approx(stats.kendalltau(x, y).statistic)
    for m in C.CORRELATIONS:
        e = out[m]
        assert e["low"] < e["estimate"] < e["high"] and e["low"] > 0 and e["p_value"] < 0.05


def test_scale_pairs_and_overlap_against_hand_computation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = 2.5 * x + 0.1 * rng.normal(size=40)
    sc = C.scale_fit(x, y, beta=0.1, n_resamples=200)
    s_ls = np.linalg.lstsq(x[:, None], y, rcond=None)[0][0]
    assert sc["s"] == pytest.approx(s_ls) and sc["beta_match"] == pytest.approx(0.1 * s_ls)
    assert sc["low"] < 2.5 < sc["high"] and sc["r2"] > 0.99
    dc, dr, tc, tr = (rng.normal(size=20) for _ in range(4))
    pa = C.pair_agreement(dc, dr, tc, tr, n_resamples=200, permutations=200)
    md, mt = dc - dr, tc - tr
    assert pa["sign_agreement"]["estimate"] == pytest.approx(np.mean(np.sign(md) == np.sign(mt)))
    assert pa["dleaf_accuracy"] == pytest.approx(np.mean(md > 0))
    assert pa["margins"]["pearson"]["estimate"] == pytest.approx(np.corrcoef(md, mt)[0, 1])
    a = np.array([[0.9, 0.1], [0.5, 0.0]])
    b = np.array([[0.8, 0.7], [0.1, 0.2]])
    assert C.top_k_overlap(a, b, 1) == 1.0 and C.top_k_overlap(a, b, 2) == 0.5


def test_head_maps_and_mechanism():
    c = [np.array([[[True, False], [False, False]]]), np.array([[[True, True], [False, False]]] * 2)]
    m0 = [np.full((1, 2, 2), 0.5), np.full((2, 2, 2), 0.5)]
    m1 = [np.full((1, 2, 2), 0.6), np.full((2, 2, 2), 0.4)]
    maps = C.head_maps(c, m0, m1)
    np.testing.assert_allclose(maps["correction_frequency"], [[1.0, 2 / 3], [0.0, 0.0]])
    np.testing.assert_allclose(maps["mass_change"], np.full((2, 2), (0.1 - 0.2) / 3))
    assert maps["n_positions"] == 3
    rng = np.random.default_rng(0)
    f = rng.random((4, 8))
    mech = C.mechanism(f, f + 0.01 * rng.normal(size=(4, 8)), k=4, permutations=200)
    assert mech["spearman"]["estimate"] > 0.9 and mech["spearman"]["p_value"] < 0.02
    assert mech["top_k_overlap"]["estimate"] >= 0.75 and mech["top_k_overlap"]["chance"] == 4 / 32
    const = C.mechanism(f, np.zeros((4, 8)), permutations=50)
    assert math.isnan(const["spearman"]["estimate"]) and "constant" in const["spearman"]["note"]


def test_token_correlations_split_by_kind(processor):
    tok = processor.tokenizer
    ids = np.array(tok("there is a fork and a knife and a cow .", add_special_tokens=False)["input_ids"])
    kinds = rs.token_kinds(ids, tok, ["fork", "cow"], world.OBJECTS)
    words = tok.convert_ids_to_tokens(ids.tolist())
    assert [int(k) for k, w in zip(kinds, words) if w in world.OBJECTS] == [rs.GROUNDED, rs.HALLUCINATED,
                                                                           rs.GROUNDED]
    assert all(k == rs.OTHER for k, w in zip(kinds, words) if w not in world.OBJECTS)
    rng = np.random.default_rng(0)
    d = [rng.normal(size=12) for _ in range(30)]
    t = [a + 0.5 * rng.normal(size=12) for a in d]
    k = [rng.integers(0, 3, size=12) for _ in range(30)]
    out = C.token_correlations(d, t, k, {1: "grounded", 2: "hallucinated"}, n_resamples=100)
    for name in ("all", "grounded", "hallucinated"):
        sel = [np.ones(12, bool) if name == "all" else kk == {"grounded": 1, "hallucinated": 2}[name] for kk in k]
        a = np.concatenate([x[s] for x, s in zip(d, sel)])
        b = np.concatenate([x[s] for x, s in zip(t, sel)])
        assert out[name]["pearson"]["estimate"] == pytest.approx(np.corrcoef(a, b)[0, 1])
        assert out[name]["n_tokens"] == len(a) and out[name]["mean_dleaf"] == pytest.approx(a.mean())
        assert out[name]["pearson"]["low"] < out[name]["pearson"]["estimate"] < out[name]["pearson"]["high"]
    none = C.token_correlations(d, t, [np.zeros(12, int)] * 30, {2: "hallucinated"}, n_resamples=50)
    hall = none["hallucinated"]["pearson"]
    assert math.isnan(hall["estimate"]) and "0 tokens" in hall["note"]


def test_matched_noise_null_intervals_include_zero():
    """A reward vector with no relation to r_theta (matched noise): its 95% intervals cover 0 about 95% of the time."""
    rng = np.random.default_rng(3)
    r_theta = rng.normal(size=80) ** 3
    covered = dict.fromkeys(C.CORRELATIONS, 0)
    for seed in range(20):
        out = C.correlations(C.matched_noise(r_theta * 0.01 + 0.5, seed), r_theta, n_resamples=300, permutations=0,
                             seed=seed)
        for m in C.CORRELATIONS:
            covered[m] += out[m]["low"] <= 0 <= out[m]["high"]
    assert min(covered.values()) >= 16, covered
    out = C.correlations(C.matched_noise(r_theta, 0), r_theta, n_resamples=300, permutations=0)
    assert all(out[m]["low"] <= 0 <= out[m]["high"] for m in C.CORRELATIONS)


def test_shuffled_pairs_give_permutation_p_values_that_are_not_small():
    rng = np.random.default_rng(4)
    x = rng.normal(size=60)
    y = 0.8 * x + 0.5 * rng.normal(size=60)
    assert C.correlation(x, y, "pearson", n_resamples=50, permutations=200)["p_value"] < 0.01
    ps = [C.correlation(C.shuffled(x, s), y, "spearman", n_resamples=20, permutations=200, seed=s)["p_value"]
          for s in range(10)]
    assert sum(p < 0.05 for p in ps) <= 2 and np.median(ps) > 0.2
    sh = C.shuffled(np.arange(30), 0)
    pa = C.pair_agreement(x[:30][sh], x[30:][sh], y[:30], y[30:], n_resamples=50, permutations=200)
    assert pa["sign_agreement"]["p_value"] > 0.05


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="has 5 rows but r_theta has 4"):
        C.correlation(np.zeros(5), np.ones(4), names=("r_D", "r_theta"))
    with pytest.raises(ValueError, match="at least 3 rows"):
        C.correlation([1.0], [2.0])
    with pytest.raises(ValueError, match="at least 3 rows"):
        C.pair_agreement([1.0], [0.0], [1.0], [0.5])
    with pytest.raises(ValueError, match="non-finite"):
        C.correlation([1.0, np.nan, 2.0], [1.0, 2.0, 3.0])
    const = C.correlations(np.zeros(10), np.arange(10.0), names=("r_D", "r_theta"), n_resamples=20, permutations=20)
    assert all(math.isnan(const[m]["estimate"]) and const[m]["note"] == "undefined: r_D is constant"
               for m in C.CORRELATIONS)
    sc = C.scale_fit(np.zeros(5), np.arange(5.0))
    assert math.isnan(sc["s"]) and "0 on every row" in sc["note"]
    single = dleaf_dpo.dpo_loss([0.3], [0.1])
    assert single["n"] == 1 and single["accuracy"] == 1.0  # one pair has a loss, but no correlation
    assert single["accuracy_p_value"] == 1.0
    from scipy.stats import binomtest

    many = dleaf_dpo.dpo_loss(np.r_[np.ones(15), np.zeros(5)], np.zeros(20))
    assert many["accuracy_p_value"] == pytest.approx(binomtest(15, 15).pvalue) and many["ties"] == 0.25
    with pytest.raises(ValueError, match="same length"):
        dleaf_dpo.dpo_loss([0.3, 0.1], [0.1])
    with pytest.raises(ValueError, match="no pairs"):
        dleaf_dpo.dpo_loss([], [])
    with pytest.raises(ValueError, match="row 0: 2 D-LEAF tokens, 3 DPO tokens"):
        C.token_correlations([np.zeros(2)], [np.zeros(3)], [np.zeros(2)], {})
    with pytest.raises(ValueError, match="k must lie"):
        C.top_k_overlap(np.zeros(4), np.zeros(4), 5)


def test_bad_models_adapters_and_rows(tmp_path, processor, rows):
    from peft import LoraConfig, get_peft_model

    plain = build.build_model(processor.tokenizer, TINY, seed=0)
    batches = list(rs.pair_batches(rows[:2], processor, 2))
    with pytest.raises(TypeError, match="needs a peft.PeftModel"):
        rs.score_rows(plain, batches, 0.1)
    with pytest.raises(ValueError, match="beta must be a positive"):
        rs.score_rows(_tiny_peft(processor), batches, 0.0)
    # an adapter trained on a model of another shape
    other_shape = build.OrganismShape(text_hidden=48, text_layers=2, text_heads=4, text_intermediate=64)
    other = build.build_model(processor.tokenizer, other_shape, seed=0)
    get_peft_model(other, LoraConfig(target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not belong to this model"):
        rs.load_adapter(build.build_model(processor.tokenizer, TINY, seed=0), tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no PEFT adapter"):
        rs.load_adapter(plain, tmp_path / "missing")
    good = build.build_model(processor.tokenizer, TINY, seed=1)
    get_peft_model(good, LoraConfig(target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "good")
    loaded = rs.load_adapter(build.build_model(processor.tokenizer, TINY, seed=0), tmp_path / "good")
    assert not loaded.training
    batch = dict(batches[0][0])
    batch["completion_mask"] = batch["completion_mask"].clone()
    batch["completion_mask"][1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] of the batch have no reply token"):
        rs.score(plain, batch)
    with pytest.raises(ValueError, match="1 prompts|1 responses"):
        rs.response_rows([None, None], ["a"], ["b", "c"])
    from dpo_link.report import measure_pairs

    with pytest.raises(ValueError, match="at least 3 preference pairs"):
        measure_pairs(_tiny_peft(processor), processor, rows[:1], DLeafConfig())


# ---------------------------------------------------------------------------------------- report and script
def test_script_writes_report_json_markdown_and_figures(tmp_path, processor):
    import importlib.util

    model = build.build_model(processor.tokenizer, TINY, seed=0)
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter")
    # a run record like train_dpo.py writes: the beta and the held-out pairs come from it
    (tmp_path / "adapter" / "dpo_run.json").write_text(json.dumps({
        "config": {"dpo": {"beta": 0.2}}, "data": {"eval": {"config": {"n": 4, "world_seed": 2}}},
        "eval_by_task": {"all": {"n": 4, "loss": 0.69, "rewards/accuracies": 0.5}}}))
    spec = importlib.util.spec_from_file_location("correspondence_script", ROOT / "scripts" / "correspondence.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "report"
    rc = script.main(["--model", str(tmp_path / "tiny"), "--adapter", str(tmp_path / "adapter"), "--n_pairs", "6",
                      "--batch_size", "3", "--n_resamples", "50", "--permutations", "50", "--gammas", "0,0.5",
                      "--knob", "kappa=0", "--out", str(out)])
    assert rc == 0
    for name in ("correspondence.json", "correspondence.md", "scatter.png", "loss_gamma.png", "heads.png"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "correspondence.json").read_text())
    pr = rep["pairs_report"]
    assert rep["held_out_check"]["n"] == 4 and pr["beta"] == 0.2
    assert rep["config"]["data"]["config"]["world_seed"] == 2
    assert pr["n_pairs"] == 6 and set(pr["dpo"]) == {"adapter", "dleaf", "random_target", "random_layers"}
    assert pr["curve"][0]["loss"] == pytest.approx(math.log(2)) and "slope" in pr
    assert np.array(pr["arrays"]["correction_frequency"]).shape == (TINY.text_layers, TINY.text_heads)
    md = (out / "correspondence.md").read_text()
    assert "## Mechanism" in md and "Slope dL/dgamma" in md and str(tmp_path) not in md.split("\n", 3)[3]
    assert not list(out.glob(".*"))  # no temporary files left behind
    bad = script.main(["--model", str(tmp_path / "tiny"), "--adapter", str(tmp_path / "missing"), "--out", str(out)])
    assert bad == 2


# ------------------------------------------------------------------------------------ on the organism itself
ORGANISM_READY = (ROOT / "data" / "organism" / "config.json").is_file() and \
    (ROOT / "data" / "organism_dpo" / "adapter_config.json").is_file()


@pytest.fixture(scope="module")
def organism_report():
    if not ORGANISM_READY:
        pytest.skip("needs the committed organism (data/organism) and its DPO adapter (data/organism_dpo)")
    from dleaf.organism.build import load_organism
    from dpo_link.report import CorrespondenceProtocol, measure_generations, measure_pairs

    model, processor = load_organism()
    peft_model = rs.load_adapter(model, ROOT / "data" / "organism_dpo")
    run = json.loads((ROOT / "data" / "organism_dpo" / "dpo_run.json").read_text())
    beta = run["config"]["dpo"]["beta"]
    rows_ = pairs.organism_examples(pairs.OrganismPairConfig(n=24, world_seed=pairs.EVAL_WORLD_SEED))
    protocol = CorrespondenceProtocol(beta=beta, gammas=(0.0, 0.5), batch_size=12, n_resamples=200,
                                      permutations=200)
    report = measure_pairs(peft_model, processor, rows_, DLeafConfig(), protocol, vocabulary=world.OBJECTS)
    scenes = world.scenes("adversarial", 8, 0)
    with peft_model.disable_adapter():
        replies = pairs.generate_replies(peft_model.get_base_model(), processor, scenes, world.CAPTION_PROMPTS[0],
                                         pairs.Decoder("greedy"))
    gen_rows = rs.response_rows([world.render(s) for s in scenes], [world.CAPTION_PROMPTS[0]] * 8, replies,
                                objects=[list(s.objects) for s in scenes])
    generations = measure_generations(peft_model, processor, gen_rows, DLeafConfig(), protocol, world.OBJECTS)
    return report, run, generations


def test_every_statistic_on_the_organism_with_its_adapter(organism_report):  # about 15 s on one thread
    pr, run, gen = organism_report
    # the adapter learned something on held-out pairs, as its card says
    assert pr["dpo"]["adapter"]["accuracy"] > 0.5 and pr["dpo"]["adapter"]["loss"] < math.log(2)
    assert pr["dpo"]["dleaf"]["n"] == 24 and 0 <= pr["flag_rate"] <= 1
    for name in ("dleaf", "random_target", "random_layers", "matched_noise", "shuffled", "dleaf_length_partial"):
        for m in C.CORRELATIONS:
            e = pr["sequence"][name][m]
            assert e["note"] is not None or (e["low"] <= e["estimate"] <= e["high"] and 0 <= e["p_value"] <= 1)
    assert set(pr["pairs"]) == {"dleaf", "random_target", "random_layers", "shuffled"}
    assert set(pr["tokens"]) == {"all", "grounded", "hallucinated"} and pr["tokens"]["hallucinated"]["n_tokens"] > 0
    # DPO lowers the probability of hallucinated object tokens
    assert pr["tokens"]["hallucinated"]["mean_dpo"] < 0
    assert "s" in pr["scale"] and pr["mechanism"]["cells"] > 1
    assert pr["curve"][0]["loss"] == math.log(2)
    fd = pr["slope"]["finite_difference"]["central"]
    assert fd == pytest.approx(pr["slope"]["slope"], rel=0.1, abs=1e-4)
    # free generations: the base model's own greedy captions
    assert gen["n"] == 8 and set(gen["sequence"]) == set(C.CORRELATIONS) and "all" in gen["tokens"]


def test_pairs_as_units_of_resampling_and_permutation():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 2))
    y = x + rng.normal(size=(30, 2))
    by_unit = C.correlation(x, y, "pearson", n_resamples=100, permutations=100)
    assert by_unit["estimate"] == pytest.approx(np.corrcoef(x.ravel(), y.ravel())[0, 1])
    assert by_unit["n"] == 60 and by_unit["n_units"] == 30
    assert by_unit["low"] < by_unit["estimate"] < by_unit["high"]
    lengths = rng.integers(5, 50, size=(30, 2)).astype(float)
    res = C.residualize(x + 0.3 * lengths, lengths)
    assert res.shape == (30, 2) and abs(np.corrcoef(res.ravel(), lengths.ravel())[0, 1]) < 1e-10
    with pytest.raises(ValueError, match="at least 3 rows"):
        C.correlation(x[:1], y[:1])


@pytest.mark.slow
@pytest.mark.skipif(not ORGANISM_READY, reason="needs data/organism and data/organism_dpo")
def test_study_step_on_the_organism(tmp_path):
    from dpo_link.report import study_step

    res = study_step(tmp_path / "c", n_pairs=8)
    assert set(res) == {"summary", "agrees", "markdown"} and isinstance(res["agrees"], bool)
    assert "held-out pairs" in res["summary"] and (tmp_path / "c" / "correspondence.json").is_file()
