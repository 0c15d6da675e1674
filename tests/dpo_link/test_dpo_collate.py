"""dpo_link.collate: the collator restores the BOS like inference; batches of pairs and of single replies."""

import torch

from dpo_link.collate import VisionPreferenceCollator, pair_batches, response_batches
from dpo_link.data import message_text


def test_collator_restores_bos_like_inference(small_pairs, processor):
    row = small_pairs[0]
    batch = VisionPreferenceCollator(processor=processor)([row])
    text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    ref = processor(text=[text], images=row["images"], return_tensors="pt")["input_ids"][0]
    assert batch["input_ids"][0, :len(ref)].tolist() == ref.tolist()
    reply = processor.tokenizer(message_text(row["chosen"]) + " </s>", add_special_tokens=False)["input_ids"]
    completion = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
    assert completion == reply


def test_response_batches_tokenize_like_the_chosen_half(processor, rows):
    pair_batch = next(pair_batches(rows[:3], processor, 3))[0]
    single = [{"images": r["images"], "prompt": r["prompt"], "response": r["chosen"]} for r in rows[:3]]
    resp_batch = next(response_batches(single, processor, 3))[0]
    for key in ("input_ids", "attention_mask", "completion_mask"):  # equal on every unpadded column
        a = resp_batch[key] * resp_batch["attention_mask"]
        b = (pair_batch[key] * pair_batch["attention_mask"])[:3]
        w = min(a.shape[1], b.shape[1])
        assert torch.equal(a[:, :w], b[:, :w]) and not a[:, w:].any() and not b[:, w:].any()
    assert torch.equal(resp_batch["pixel_values"], pair_batch["pixel_values"][:3])


def test_pair_batches_cover_every_row_in_order(processor, rows):
    batches = list(pair_batches(rows[:5], processor, 2))
    assert [sl for _, sl in batches] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    last, _ = batches[-1]
    assert last["input_ids"].shape[0] == 2  # one pair: its chosen row, then its rejected row
    chosen = last["input_ids"][0][last["completion_mask"][0].bool()].tolist()
    reply = processor.tokenizer(message_text(rows[4]["chosen"]) + " </s>", add_special_tokens=False)["input_ids"]
    assert chosen == reply
