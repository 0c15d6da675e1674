"""The committed LLaVA-like organism (``data/organism_llava_like``): registered beside the organism, trained by the
``llava_like`` preset on one CPU thread, 144 image tokens and an 8-layer decoder, with its own shipped detector."""

import dataclasses
import json

import pytest

from dleaf import detect, models
from dleaf.organism import build, world
from dleaf.organism.train import TrainConfig, preset_config

# what a run's log records beside its recipe: where it writes, how often it logs, where it resumed from
NOT_RECIPE = {"output_dir", "log_every", "probe_every", "resume_from", "stage_checkpoints", "checkpoint_every",
              "threads", "device"}


@pytest.fixture(scope="module")
def llava_like():
    return models.load("organism_llava_like", device="cpu")


def test_the_checkpoint_is_the_preset_recipe_trained_on_one_cpu_thread():
    _, entry = models.resolve("organism_llava_like")
    log = json.loads((entry.path / "training_log.json").read_text())
    logged = log["config"]
    recipe = dataclasses.asdict(preset_config("llava_like"))
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - NOT_RECIPE
    assert fields and {k: logged[k] for k in fields} == {k: recipe[k] for k in fields}
    assert logged["weight_decay"] == 0.1 and logged["text_layers"] == 8 and logged["patch"] == 4
    assert (logged["threads"], logged["device"]) == (1, "cpu")  # the CPU-reproducible recipe
    assert "in_progress" not in log  # a finished run, not a mid-stage checkpoint
    assert list(log["stages"]) == ["text", "align", "joint", "refine", "tune"]
    assert entry.attn_implementation == "eager" and build.is_world_checkpoint("organism_llava_like")


def test_it_reads_144_image_tokens_with_an_8_layer_decoder(llava_like):
    model, processor = llava_like
    text_config = model.config.text_config
    assert (text_config.num_hidden_layers, text_config.num_attention_heads, text_config.hidden_size) == (8, 8, 128)
    text = models.chat_prompt(processor, "describe the image in detail .")
    ids = processor(text=[text], images=[world.render(world.scenes("adversarial", 1, 0)[0])], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids["input_ids"] == image_id).sum()) == 144


def test_its_shipped_detector_fits_it_and_no_other_model(llava_like):
    model, _ = llava_like
    organism = models.load("organism", device="cpu")[0]
    assert "organism_llava_like" in detect.SHIPPED
    assert detect.shipped_detector_for(model) == "organism_llava_like"
    assert detect.shipped_detector_for(organism) == "organism"
    with pytest.raises(ValueError, match="fitted on model"):
        detect.Detector.load(detect.shipped_detector("organism")).check_model(model)
    with pytest.raises(ValueError, match="fitted on model"):
        detect.Detector.load(detect.shipped_detector("organism_llava_like")).check_model(organism)
