"""dpo_link.data: TRL's vision preference format, ranking replies into pairs, column maps, datasets on disk."""

import pytest

from dleaf.organism import world
from dpo_link import data, validate


def test_format_helpers():
    row = data.preference_example("IMG", "describe .", "a fork .", "a fork . a knife .", task="caption")
    assert row["images"] == ["IMG"] and row["task"] == "caption"
    assert row["prompt"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe ."}]}]
    assert data.message_text(row["chosen"]) == "a fork ." and data.message_text("plain") == "plain"
    assert data.message_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]}]) == "hi a b"
    assert data.user_prompt("q", 2)[0]["content"][:2] == [{"type": "image"}] * 2
    with pytest.raises(ValueError, match="no preference pairs"):
        data.preference_dataset([])


def test_rank_replies_prefers_fewest_hallucinations():
    cands = {"greedy": ("a fork . a knife .", 1, 1), "dleaf": ("a fork .", 0, 1)}
    assert data.rank_replies(cands) == ("dleaf", "greedy")
    assert data.rank_replies({"greedy": ("x", 1, 1), "dleaf": ("y", 1, 1)}) is None  # no preference
    assert data.rank_replies({"greedy": ("x", 2, 1), "dleaf": ("y", 1, 1)}, min_margin=2) is None
    # ties in hallucinations broken by grounded objects
    assert data.rank_replies({"a": ("x", 1, 2), "b": ("y", 2, 3), "c": ("z", 2, 1)}) == ("a", "c")


def test_ranked_pairs_build_rows_from_counts():
    rows = data.ranked_pairs(["A", "B", "C"], "describe .", {"greedy": ["g0", "g1", "g2"], "dleaf": ["d0", "d1", "g2"]},
                             {"greedy": [(2, 1), (0, 2), (1, 1)], "dleaf": [(0, 1), (0, 2), (0, 1)]},
                             meta=[{"scene_seed": i} for i in range(3)])
    # image 0: dleaf preferred; image 1: no margin; image 2: one hallucination fewer but the same text
    assert len(rows) == 1
    first = rows[0]
    assert data.message_text(first["chosen"]) == "d0" and data.message_text(first["rejected"]) == "g0"
    assert (first["chosen_source"], first["rejected_source"]) == ("dleaf", "greedy")
    assert (first["chosen_hallucinations"], first["rejected_hallucinations"]) == (0, 2)
    assert first["scene_seed"] == 0 and first["source"] == "self_generated" and first["images"] == ["A"]
    with pytest.raises(ValueError, match="at least two decoders"):
        data.ranked_pairs(["A"], "p", {"greedy": ["x"]}, {"greedy": [(0, 0)]})


def test_column_map_syntax():
    assert data.parse_column_map(None) is None and data.parse_column_map([]) is None
    assert data.parse_column_map(["question=prompt", "image = images"]) == {"question": "prompt", "image": "images"}
    assert data.parse_column_map({"a": "b"}) == {"a": "b"} and data.parse_column_map("a=b") == {"a": "b"}
    assert data.parse_column_map("question=prompt, image=images") == {"question": "prompt", "image": "images"}
    with pytest.raises(ValueError, match="look like old=new"):
        data.parse_column_map(["question:prompt"])
    with pytest.raises(ValueError, match="not a column name"):
        data.parse_column_map(["=prompt"])
    with pytest.raises(ValueError, match="names no new column"):
        data.parse_column_map(["question="])
    with pytest.raises(ValueError, match="given twice"):
        data.parse_column_map(["a=b", "a=c"])


def test_load_user_dataset_from_disk(tmp_path, small_pairs, processor):
    small_pairs.save_to_disk(tmp_path / "trl")
    ds = data.load_preference_dataset(tmp_path / "trl")
    assert ds.column_names == small_pairs.column_names and len(ds) == len(small_pairs)
    validate.validate_preference_dataset(ds, processor, 256)
    # an RLAIF-V style export: plain strings, one image column, other column names
    from datasets import Dataset, DatasetDict

    rows = [{"question": world.CAPTION_PROMPTS[0], "image": r["images"][0],
             "chosen": data.message_text(r["chosen"]), "rejected": data.message_text(r["rejected"]),
             "ds_name": "organism"} for r in small_pairs.select(range(4))]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(tmp_path / "rlaifv")
    ds = data.load_preference_dataset(tmp_path / "rlaifv", "train", ["question=prompt"])
    assert ds[0]["prompt"][0]["content"][0]["type"] == "image" and len(ds[0]["images"]) == 1
    assert ds[0]["chosen"] == data.assistant_reply(rows[0]["chosen"])
    validate.validate_preference_dataset(ds, processor, None)
    Dataset.from_list(rows).to_parquet(tmp_path / "x.parquet")
    ds = data.load_preference_dataset(tmp_path / "x.parquet", column_map=["question=prompt", "image=images"])
    assert len(ds) == 4
    with pytest.raises(ValueError, match="splits"):
        data.load_preference_dataset(tmp_path / "rlaifv", "test")
    with pytest.raises(ValueError, match="does not have"):
        data.load_preference_dataset(tmp_path / "trl", column_map=["question=prompt"])
    with pytest.raises(FileNotFoundError):
        data.load_preference_dataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="expected .parquet"):
        (tmp_path / "x.csv").write_text("a")
        data.load_preference_dataset(tmp_path / "x.csv")
