"""Tests for dleaf.models: the one loader (named checkpoints, folders, adapters, dtype, device) and the chat
helper."""

import pytest
import torch

from dleaf import models
from dleaf.io import InputError


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_organism):
    model, processor = tiny_organism
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_checkpoint):
    """A LoRA adapter on the tiny checkpoint whose B matrices are not zero (so it changes the model)."""
    from peft import LoraConfig, get_peft_model

    base, _ = models.load(tiny_checkpoint, attn_implementation="eager")
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("adapter") / "lora"
    peft.save_pretrained(path)
    return path, peft.eval()


def _inputs(processor, model):
    from PIL import Image

    return models.model_inputs(processor, ["describe the image in detail .", "what do you see in this picture ?"],
                               [Image.new("RGB", (48, 48), (200, 10, 10)), Image.new("RGB", (48, 48), (0, 0, 0))],
                               model)


def test_chat_prompt_uses_the_processors_template(tiny_organism):
    _, processor = tiny_organism
    text = models.chat_prompt(processor, "is there a cup in the image ?")
    assert text == processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a cup in the image ?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert text.count("<image>") == 1 and text.endswith("assistant :")
    assert "<image>" not in models.chat_prompt(processor, "hello", image=False)


def test_model_inputs_pad_left_and_follow_the_model(tiny_organism):
    model, processor = tiny_organism
    import copy

    from PIL import Image

    half = copy.deepcopy(model).to(torch.bfloat16)
    batch = models.model_inputs(processor, ["a", "describe the image in detail ."], [Image.new("RGB", (48, 48))] * 2,
                                half)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padding
    assert batch["pixel_values"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        models.model_inputs(processor, ["a", "b"], [None])


def test_load_a_folder_same_logits_dtype_and_device(tiny_organism, tiny_checkpoint):
    model, processor = tiny_organism
    loaded, proc = models.load(tiny_checkpoint, attn_implementation="eager", device="cpu")
    assert not loaded.training and loaded.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(proc, loaded)).logits, model(**_inputs(processor, model)).logits)
    half, _ = models.load(tiny_checkpoint, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert half.config._attn_implementation != "eager" or loaded.config._attn_implementation == "eager"


def test_adapter_is_merged_and_changes_the_model(tiny_checkpoint, tiny_adapter):
    path, peft = tiny_adapter
    base, processor = models.load(tiny_checkpoint, attn_implementation="eager")
    merged, _ = models.load(tiny_checkpoint, adapter=path, attn_implementation="eager")
    with torch.no_grad():
        b = base(**_inputs(processor, base)).logits
        m = merged(**_inputs(processor, merged)).logits
        p = peft(**_inputs(processor, base)).logits
    assert not torch.allclose(b, m, atol=1e-3)  # the adapter changes something
    torch.testing.assert_close(m, p, atol=1e-4, rtol=1e-4)  # merged = the adapter applied by PEFT


def test_bad_models_and_adapters_are_refused_before_loading(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="not found"):
        models.check_model(tmp_path / "nothing_here")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        models.check_model(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        models.load(tmp_path / "empty")
    with pytest.raises(InputError, match="no adapter_config.json"):
        models.check_adapter(tmp_path / "empty")
    with pytest.raises(InputError, match="dtype"):
        models.check_dtype("float64")
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)  # offline, a hub id must be cached (tests/test_first_use.py)
    assert models.check_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"  # online: the loader checks


def test_named_models_resolve_to_the_shipped_checkpoints():
    names = models.registered()
    assert {"organism", "organism_control", "organism_llava_like"} <= set(names)
    for name in ("organism", "organism_control", "organism_llava_like"):
        path, entry = models.resolve(name)
        assert (models.resolve(name)[1].path / "config.json").is_file() and entry.attn_implementation == "eager"
        assert models.check_model(name) == path
    models.register("tmp_name", "/nonexistent/folder")
    try:
        assert all(repr(name) in models.model_help() for name in (*names, "tmp_name"))  # the --model help names them
        with pytest.raises(InputError, match="checkpoint is missing"):
            models.check_model("tmp_name")
    finally:
        models.unregister("tmp_name")
