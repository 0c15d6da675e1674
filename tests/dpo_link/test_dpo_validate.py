"""dpo_link.validate: every check names the bad rows and what would be right, before any training step."""

import pytest
import torch

from dpo_link import validate
from dpo_link.collate import VisionPreferenceCollator


def test_missing_column_is_named(small_pairs, processor):
    with pytest.raises(validate.PreferenceDataError, match="missing column.*'rejected'"):
        validate.validate_preference_dataset(small_pairs.remove_columns("rejected"), processor, 256, "train dataset")
    with pytest.raises(validate.PreferenceDataError, match="'images'"):
        validate.validate_preference_dataset(small_pairs.remove_columns("images"), processor, 256)


def test_prompt_without_image_is_caught(small_pairs, processor):
    ds = small_pairs.select(range(4)).map(lambda r, i: {"images": [] if i == 2 else r["images"]}, with_indices=True)
    with pytest.raises(validate.PreferenceDataError, match=r"row\(s\) 2 .*prompt without an image"):
        validate.validate_preference_dataset(ds, processor, 256)
    text_only = small_pairs.select(range(3)).map(
        lambda r: {"prompt": [{"role": "user", "content": [{"type": "text", "text": "describe ."}]}]})
    with pytest.raises(validate.PreferenceDataError, match="prompt without an image"):
        validate.validate_preference_dataset(text_only, processor, 256)


def test_identical_chosen_and_rejected_are_caught(small_pairs, processor):
    ds = small_pairs.select(range(5)).map(lambda r, i: {"rejected": r["chosen"] if i in (1, 3) else r["rejected"]},
                                          with_indices=True)
    with pytest.raises(validate.PreferenceDataError, match=r"row\(s\) 1, 3 .*identical chosen and rejected"):
        validate.validate_preference_dataset(ds, processor, 256)


def test_max_length_that_cuts_image_tokens_is_caught(small_pairs, processor):
    report = validate.measure_lengths(small_pairs, processor)
    assert report.image_tokens_per_image == 36 and report.add_bos
    with pytest.raises(validate.PreferenceDataError, match="would cut image tokens"):
        validate.check_max_length(report, report.max_image_end - 1)
    with pytest.raises(validate.PreferenceDataError, match="no completion token"):
        validate.check_max_length(report, report.max_prompt)
    validate.check_max_length(report, report.max_total)
    validate.check_max_length(report, None)


def test_measured_lengths_equal_the_collator(small_pairs, processor):
    report = validate.measure_lengths(small_pairs, processor)
    batch = VisionPreferenceCollator(processor=processor, max_length=None)(list(small_pairs))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int(batch["attention_mask"].sum(1).max()) == report.max_total
    last_image = max(int(torch.nonzero(row == image_id).max()) + 1 for row in batch["input_ids"])
    assert last_image == report.max_image_end
    first_completion = batch["completion_mask"].float().argmax(1)
    assert int(first_completion.max()) == report.max_prompt
