"""dpo_link.rewards: implicit rewards against TRL and against plain forward passes, token rewards, the image-mass
trace, the nulls, the DPO loss against hand computation, bad models, adapters and rows."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from dleaf.config import DLeafConfig
from dleaf.organism import build, world
from dpo_link import rewards
from dpo_link.collate import VisionPreferenceCollator, pair_batches, response_rows
from dpo_link.data import preference_dataset
from margins import FLAG_MARGIN, assert_margin, head_cells


def brute_force_rewards(peft_model, batch, beta):
    """Per row of a collated preference batch, ``beta * sum_t (log pi_theta(y_t) - log pi_0(y_t))`` from plain
    forward passes of that row alone (no padding, no engine), log-softmax in float64."""
    ids, cm, am = batch["input_ids"], batch["completion_mask"].bool(), batch["attention_mask"]
    out = []
    for b in range(ids.shape[0]):
        n = int(am[b].sum())
        one = {"input_ids": ids[b:b + 1, :n], "attention_mask": am[b:b + 1, :n],
               "pixel_values": batch["pixel_values"][b:b + 1]}
        with torch.no_grad():
            on = torch.log_softmax(peft_model(**one).logits[0].double(), -1)
            with peft_model.disable_adapter():
                off = torch.log_softmax(peft_model(**one).logits[0].double(), -1)
        cols = cm[b, :n].nonzero().flatten()
        out.append([beta * float(on[c - 1, ids[b, c]] - off[c - 1, ids[b, c]]) for c in cols])
    return out


# ------------------------------------------------------------------------------------------- implicit rewards
def test_adapter_rewards_equal_trl_logged_rewards(tmp_path, processor, rows, make_model):
    """TRL's own DPOTrainer.evaluate on the same model, adapter, beta and batch logs the batch means of r_theta."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    beta = 0.3
    ds = preference_dataset([dict(r) for r in rows])
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, per_device_eval_batch_size=len(rows), use_cpu=True,
                     bf16=False, report_to="none", disable_tqdm=True, max_length=None)
    # as dpo_link.train builds it: TRL wraps the base model in a new adapter (random here, so rewards are nonzero)
    # and takes the reference by disabling it
    torch.manual_seed(0)
    trainer = DPOTrainer(model=make_model(processor), args=args, eval_dataset=ds, train_dataset=ds,
                         processing_class=processor, data_collator=VisionPreferenceCollator(processor=processor),
                         peft_config=LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    logged = trainer.evaluate()
    batches = list(pair_batches(rows, processor, batch_size=len(rows)))
    r = rewards.score_rows(trainer.model, batches, beta, mass=False).rewards("adapter")
    chosen, rejected = r[: len(rows)], r[len(rows):]
    assert np.abs(chosen - rejected).min() > 1e-3  # the check below is not of a degenerate case
    assert logged["eval_rewards/chosen"] == pytest.approx(chosen.mean(), abs=2e-6)
    assert logged["eval_rewards/rejected"] == pytest.approx(rejected.mean(), abs=2e-6)
    assert logged["eval_rewards/margins"] == pytest.approx((chosen - rejected).mean(), abs=2e-6)
    assert logged["eval_rewards/accuracies"] == pytest.approx(float((chosen > rejected).mean()))
    assert logged["eval_loss"] == pytest.approx(rewards.dpo_loss(chosen, rejected)["loss"], abs=2e-6)
    # per row, against plain forward passes of each row alone
    expected = [sum(t) for t in brute_force_rewards(trainer.model, batches[0][0], beta)]
    np.testing.assert_allclose(r, expected, atol=2e-6)
    # adapter_rewards (what training records per task) is the same reward
    c2, r2 = rewards.adapter_rewards(trainer.model, batches[0][0], beta)
    np.testing.assert_allclose(c2.numpy(), chosen, atol=1e-9)
    np.testing.assert_allclose(r2.numpy(), rejected, atol=1e-9)


def test_token_rewards_sum_to_sequence_rewards_and_match_a_token_loop(processor, rows, make_peft):
    peft_model = make_peft(processor)
    batches = list(pair_batches(rows[:3], processor, batch_size=3))
    rr = rewards.score_rows(peft_model, batches, 0.5, [rewards.Policy("dleaf", DLeafConfig(gamma=0.8, kappa=0.0))],
                            mass=False)
    for name in ("adapter", "dleaf"):
        tok = rr.token_rewards(name)
        np.testing.assert_allclose([t.sum() for t in tok], rr.rewards(name), rtol=1e-12)
    expected = brute_force_rewards(peft_model, batches[0][0], 0.5)
    for b, e in enumerate(expected):
        np.testing.assert_allclose(rr.token_rewards("adapter")[b], e, atol=1e-5)
        assert len(rr.token_ids[b]) == len(e)
    assert rr.lengths().tolist() == [len(e) for e in expected]


def test_dleaf_rewards_equal_a_step_by_step_decoding_score(processor, rows, make_model):
    """r_D of a reply: D-LEAF's log-probabilities of its tokens, fed one step at a time through generate's cache (as
    decoding sees them), minus the plain model's."""
    from dleaf import engine

    model = make_model(processor, peaky=True)
    batch, _ = next(pair_batches(rows[:1], processor, 1))
    cfg = DLeafConfig(gamma=1.0, localization="everywhere")
    rr = rewards.score_rows(model, [(batch, slice(0, 1))], 1.0, [rewards.Policy("dleaf", cfg)], adapter=False,
                            mass=False)
    ids, cm = batch["input_ids"][0], batch["completion_mask"][0].bool()
    n = int(batch["attention_mask"][0].sum())
    start = int(cm.nonzero()[0])
    prompt = {"input_ids": ids[None, :start], "attention_mask": torch.ones(1, start, dtype=torch.long),
              "pixel_values": batch["pixel_values"][:1]}
    reply = ids[start:n]

    def stepwise(method):
        with torch.no_grad(), engine.attached(model, method, **({"gamma": 1.0, "localization": "everywhere"}
                                                                  if method else {})):
            out = model.generate(**prompt, max_new_tokens=len(reply), do_sample=False, output_scores=False,
                                 return_dict_in_generate=True, output_logits=True,
                                 prefix_allowed_tokens_fn=lambda b, sofar: [int(reply[sofar.shape[0] - start])])
        return np.array([float(torch.log_softmax(lg[0].double(), -1)[t]) for lg, t in zip(out.logits, reply)])

    # fusing everywhere, D-LEAF's only decisions are its head choices (h*, the heads below the mean IAF): none of
    # those at the reply's positions may be within rounding of a tie, or the two paths could choose differently
    ivs = []
    with torch.no_grad():
        rewards.score(model, batch, cfg, intervention_factory=lambda m, c, t: ivs.append(
            engine.attach(m, c, trace=True)) or ivs[-1])
    decisive = [set(range(start - 1, n - 1)), set()]  # row 0, the chosen reply, is the one compared
    assert assert_margin(head_cells(ivs[0].trace, decisive), FLAG_MARGIN, "head choices") >= FLAG_MARGIN
    np.testing.assert_allclose(rr.token_rewards("dleaf")[0], stepwise("dleaf") - stepwise(None), atol=2e-5)
    assert np.abs(rr.token_rewards("dleaf")[0]).max() > 1e-3


def test_identical_policies_give_zero_rewards_and_loss_log2(processor, rows, make_peft):
    peft_model = make_peft(processor, init_lora_weights=True)  # LoRA B = 0: the adapter is the identity
    batches = list(pair_batches(rows, processor, 4))
    rr = rewards.score_rows(peft_model, batches, 0.1, [rewards.Policy("dleaf0", DLeafConfig(gamma=0.0))], mass=False)
    for name in ("adapter", "dleaf0"):
        r = rr.rewards(name)
        assert np.all(r == 0.0)
        stats = rewards.dpo_loss(r[:4], r[4:8])
        assert stats["loss"] == math.log(2) and math.isnan(stats["accuracy_p_value"]) and stats["ties"] == 1.0


def test_mass_trace_equals_output_attentions(processor, rows, make_model):
    """The per-head image mass read from the trace, at the rows that predict reply tokens, against an independent
    computation from the plain model's output_attentions."""
    base = make_model(processor)
    batch = next(pair_batches(rows[:2], processor, 2))[0]
    s = rewards.score(base, batch, rewards.MASS_PROBE, trace=True)
    with torch.no_grad():
        out = base(**rewards.model_inputs(batch), output_attentions=True)
    att = torch.stack(out.attentions, 1)  # (B, L, H, T, T)
    image = batch["input_ids"] == base.config.image_token_id
    for b in range(att.shape[0]):
        cols = s.mask[b].nonzero().flatten() - 1
        mass = att[b][..., image[b]].sum(-1)[:, :, cols].permute(2, 0, 1)  # (T, L, H)
        np.testing.assert_allclose(s.mass[b], mass.numpy(), atol=1e-6)
    plain = rewards.score(base, batch)
    assert torch.equal(plain.logprobs, s.logprobs)  # the probe at gamma 0 is the plain model bit for bit


# ------------------------------------------------------------------------------------------------ DPO loss
def test_dpo_loss_against_hand_computation():
    chosen, rejected = [1.0, 0.0, 2.0, 0.5], [0.0, 0.0, 3.0, -0.5]
    stats = rewards.dpo_loss(chosen, rejected)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    losses = [-math.log(sig(1.0)), math.log(2), -math.log(sig(-1.0)), -math.log(sig(1.0))]
    assert stats["loss"] == pytest.approx(sum(losses) / 4, abs=1e-15)
    assert stats["accuracy"] == 0.5 and stats["ties"] == 0.25 and stats["margin"] == pytest.approx(0.25)
    assert stats["accuracy_p_value"] == pytest.approx(binomtest(2, 3, 0.5).pvalue)
    assert stats["chosen"] == pytest.approx(0.875) and stats["rejected"] == pytest.approx(0.625)
    assert rewards.dpo_loss([0.3], [0.1])["accuracy_p_value"] == 1.0
    many = rewards.dpo_loss(np.r_[np.ones(15), np.zeros(5)], np.zeros(20))
    assert many["accuracy_p_value"] == pytest.approx(binomtest(15, 15).pvalue) and many["ties"] == 0.25
    with pytest.raises(ValueError, match="same length"):
        rewards.dpo_loss([0.3, 0.1], [0.1])
    with pytest.raises(ValueError, match="no pairs"):
        rewards.dpo_loss([], [])
    t = torch.tensor([0.5, -1.0], requires_grad=True)
    rewards.dpo_losses(t, torch.zeros(2)).sum().backward()
    np.testing.assert_allclose(t.grad.numpy(), [-(1 - sig(0.5)), -(1 - sig(-1.0))], atol=1e-7)
    assert rewards.implicit_rewards(torch.tensor([2.0]), torch.tensor([-1.0]), 0.5).item() == 1.5
    with pytest.raises(ValueError, match="beta must be a positive"):
        rewards.implicit_rewards(torch.zeros(1), torch.zeros(1), 0.0)


# ---------------------------------------------------------------------------------------------------- nulls
def test_random_target_null_keeps_dleafs_sites_and_strength(processor, rows, make_model):
    model = make_model(processor, peaky=True)
    batch = next(pair_batches(rows[:2], processor, 2))[0]
    cfg = DLeafConfig(gamma=0.7, kappa=0.0)
    d = rewards.score(model, batch, cfg, trace=True)
    n = rewards.score(model, batch, cfg, trace=True, intervention_factory=rewards.random_target_factory(0))
    base = rewards.score(model, batch, None)
    for a, b in zip(d.flagged, n.flagged):  # flags of the first layer are those of the unchanged attention
        assert np.array_equal(a[:, 0], b[:, 0])
    assert not torch.equal(n.logprobs, d.logprobs) and not torch.equal(n.logprobs, base.logprobs)
    zero = rewards.score(model, batch, DLeafConfig(gamma=0.0, kappa=0.0),
                         intervention_factory=rewards.random_target_factory(0))
    assert torch.equal(zero.logprobs, base.logprobs)


def test_flag_rate_and_token_kinds_by_hand(processor):
    flagged = [np.array([[True, False], [False, False]]), np.array([[True, True]])]
    assert rewards.flag_rate(flagged) == 3 / 6
    assert rewards.flag_rate(flagged, layers=[1]) == 1 / 3
    tok = processor.tokenizer
    ids = np.array(tok("there is a fork and a knife and a cow .", add_special_tokens=False)["input_ids"])
    kinds = rewards.token_kinds(ids, tok, ["fork", "cow"], world.OBJECTS)
    words = tok.convert_ids_to_tokens(ids.tolist())
    assert [int(k) for k, w in zip(kinds, words) if w in world.OBJECTS] == [rewards.GROUNDED, rewards.HALLUCINATED,
                                                                           rewards.GROUNDED]
    assert all(k == rewards.OTHER for k, w in zip(kinds, words) if w not in world.OBJECTS)
    assert len({rewards.OTHER, rewards.GROUNDED, rewards.HALLUCINATED}) == 3  # three kinds, never merged
    assert int((kinds == rewards.OTHER).sum()) == len(words) - 3
    # a vocabulary word the tokenizer does not know never turns an unknown token into an object word
    unknown = np.array(tok("there is a zebra .", add_special_tokens=False)["input_ids"])
    assert tok.unk_token_id in unknown.tolist()
    assert (rewards.token_kinds(unknown, tok, [], ["zebra", "fork"]) == rewards.OTHER).all()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_models_adapters_and_rows(tmp_path, processor, rows, make_model, make_peft):
    from peft import LoraConfig, get_peft_model

    plain = make_model(processor)
    batches = list(pair_batches(rows[:2], processor, 2))
    with pytest.raises(TypeError, match="needs a peft.PeftModel"):
        rewards.score_rows(plain, batches, 0.1)
    with pytest.raises(ValueError, match="beta must be a positive"):
        rewards.score_rows(make_peft(processor), batches, 0.0)
    # an adapter trained on a model of another shape
    other_shape = build.OrganismShape(text_hidden=48, text_layers=2, text_heads=4, text_intermediate=64)
    other = build.build_model(processor.tokenizer, other_shape, seed=0)
    get_peft_model(other, LoraConfig(target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not belong to this model"):
        rewards.load_adapter(make_model(processor), tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no PEFT adapter"):
        rewards.load_adapter(plain, tmp_path / "missing")
    get_peft_model(make_model(processor, seed=1), LoraConfig(target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "good")
    loaded = rewards.load_adapter(make_model(processor), tmp_path / "good")
    assert not loaded.training
    (tmp_path / "good" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        rewards.check_adapter_files(tmp_path / "good")
    batch = dict(batches[0][0])
    batch["completion_mask"] = batch["completion_mask"].clone()
    batch["completion_mask"][1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] of the batch have no reply token"):
        rewards.score(plain, batch)
    with pytest.raises(ValueError, match="1 prompts|1 responses"):
        response_rows([None, None], ["a"], ["b", "c"])
    with pytest.raises(ValueError, match="policy names must be distinct"):
        rewards.score_rows(make_peft(processor), batches, 0.1, [rewards.Policy("base", DLeafConfig())])


# ------------------------------------------------------------------------------------------- base-model identity
def test_checkpoint_fingerprint_by_hand(tmp_path, monkeypatch):
    import hashlib

    folder = tmp_path / "ckpt"
    folder.mkdir()
    small, big = bytes(range(256)) * 2, bytes((7 * i) % 251 for i in range(1000))
    (folder / "model-2.safetensors").write_bytes(big)
    (folder / "model-1.safetensors").write_bytes(small)
    (folder / "config.json").write_text("{}")  # not a weight file
    (folder / "training_args.bin").write_bytes(b"options")  # not weights either
    monkeypatch.setattr(rewards, "FULL_HASH_BYTES", 600)
    monkeypatch.setattr(rewards, "BLOCK_BYTES", 16)
    monkeypatch.setattr(rewards, "BLOCKS", 4)
    h = hashlib.sha256(b"model-1.safetensors:512\n" + small + b"model-2.safetensors:1000\n")
    for offset in (0, 328, 656, 984):  # four blocks of 16 bytes, evenly spaced, the last one ending the file
        h.update(big[offset:offset + 16])
    assert rewards.checkpoint_fingerprint(folder) == h.hexdigest()
    (folder / "model-2.safetensors").write_bytes(big[:500] + b"x" + big[501:])  # between the blocks: unseen
    assert rewards.checkpoint_fingerprint(folder) == h.hexdigest()
    (folder / "model-1.safetensors").write_bytes(small[:-1] + b"x")  # a small file is hashed whole
    assert rewards.checkpoint_fingerprint(folder) != h.hexdigest()
    assert rewards.checkpoint_fingerprint("owner/some-model") is None
    assert rewards.checkpoint_fingerprint(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert rewards.checkpoint_fingerprint(tmp_path / "empty") is None


def test_an_adapter_of_another_checkpoint_is_refused(tmp_path, tiny_dir, processor):
    same = rewards.checkpoint_fingerprint(tiny_dir)
    assert same is not None and same == rewards.checkpoint_fingerprint(tiny_dir)
    build.build_model(processor.tokenizer, build.OrganismShape(text_hidden=32, text_layers=2, text_heads=4,
                                                               text_intermediate=64), seed=1).save_pretrained(
        tmp_path / "retrained")
    other = rewards.checkpoint_fingerprint(tmp_path / "retrained")
    assert other is not None and other != same  # the same architecture, other weights
    rewards.check_adapter_base("a", tiny_dir, {"base_model": {"fingerprint": same}})
    with pytest.raises(ValueError, match="was trained on another checkpoint"):
        rewards.check_adapter_base("a", tmp_path / "retrained", {"base_model": {"fingerprint": same}})
    rewards.check_adapter_base("a", tmp_path / "retrained", {})  # no fingerprint recorded: nothing to compare
    rewards.check_adapter_base("a", "owner/hub-model", {"base_model": {"fingerprint": same}})  # a hub id


def test_load_adapter_names_each_lora_weight_that_does_not_fit(tmp_path, processor, make_model):
    """Each check of the adapter against the model on its own: a lora_A whose input size is off, a lora_B whose
    output size is off, a module the model lacks, an adapter with no LoRA weight at all, and the count of problems
    beyond the first four."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    get_peft_model(make_model(processor, seed=1), LoraConfig(target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "good")
    saved = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
    a_key = next(k for k in sorted(saved) if ".lora_A." in k)
    b_key = next(k for k in sorted(saved) if ".lora_B." in k)

    def variant(name, tensors):
        shutil.copytree(tmp_path / "good", tmp_path / name)
        save_file(tensors, str(tmp_path / name / "adapter_model.safetensors"))
        return tmp_path / name

    wide_a = variant("wide_a", {**saved, a_key: torch.zeros(saved[a_key].shape[0], saved[a_key].shape[1] + 1)})
    with pytest.raises(ValueError, match=rf"{a_key}: shape .* does not fit") as err:
        rewards.load_adapter(make_model(processor), wide_a)
    assert "more" not in str(err.value)
    tall_b = variant("tall_b", {**saved, b_key: torch.zeros(saved[b_key].shape[0] + 1, saved[b_key].shape[1])})
    with pytest.raises(ValueError, match=rf"{b_key}: shape .* does not fit"):
        rewards.load_adapter(make_model(processor), tall_b)
    # the same shapes on the other side of the pair fit: lora_A is checked on its input, lora_B on its output
    narrow_rank = variant("rank", {**saved, a_key: torch.zeros(saved[a_key].shape[0] + 1, saved[a_key].shape[1]),
                                   b_key: torch.zeros(saved[b_key].shape[0], saved[b_key].shape[1] + 1)})
    try:  # PEFT itself refuses the rank mismatch; the fit check must not
        rewards.load_adapter(make_model(processor), narrow_rank)
    except Exception as e:  # noqa: BLE001
        assert "does not fit" not in str(e) and "does not belong" not in str(e), e
    moved = a_key.replace("q_proj", "no_such_proj")
    missing = variant("missing", {**{k: v for k, v in saved.items() if k != a_key}, moved: saved[a_key]})
    with pytest.raises(ValueError, match="no_such_proj \\(no such module in"):
        rewards.load_adapter(make_model(processor), missing)
    # a module that exists but has no weight of its own (the attention block, not one of its projections)
    block = a_key.replace(".q_proj", "")
    container = variant("container", {**{k: v for k, v in saved.items() if k != a_key}, block: saved[a_key]})
    with pytest.raises(ValueError, match="self_attn \\(no such module in"):
        rewards.load_adapter(make_model(processor), container)
    empty = variant("empty", {"base_model.model.not_lora.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="no LoRA weight matched a module"):
        rewards.load_adapter(make_model(processor), empty)
    many = {k: (torch.zeros(v.shape[0], v.shape[1] + 1) if ".lora_A." in k else v) for k, v in saved.items()}
    n_bad = sum(".lora_A." in k for k in saved)
    assert n_bad > 5
    with pytest.raises(ValueError, match=rf"; and {n_bad - 4} more"):
        rewards.load_adapter(make_model(processor), variant("many", many))
    five = sorted(k for k in saved if ".lora_A." in k)[:5]
    with pytest.raises(ValueError, match="; and 1 more"):
        rewards.load_adapter(make_model(processor), variant("five", {k: many[k] if k in five else v
                                                                     for k, v in saved.items()}))
