"""Shared fixtures of the dpo_link tests: a tiny random organism-shaped model (two decoder layers, four heads), its
processor, preference rows of the organism, a PEFT model on it, and the model saved like a checkpoint.

The model libraries are imported by the fixtures that need them, so that the statistics' tests (numpy and scipy
only) start in a second."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: the tiny organism's shape (``dleaf.organism.build.OrganismShape`` keywords)
TINY_SHAPE = dict(text_hidden=32, text_layers=2, text_heads=4, text_intermediate=64)


def tiny_shape():
    from dleaf.organism import build

    return build.OrganismShape(**TINY_SHAPE)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two threads on a shared 2-core machine are many times slower than one for these tiny models (only where
    torch is in use: a module of pure statistics does not import it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def processor():
    from dleaf.organism import build

    return build.build_processor(tiny_shape())


@pytest.fixture(scope="session")
def rows():
    """Eight organism preference pairs (six captions, two yes/no questions) from the training stream."""
    from dpo_link import pairs

    return pairs.organism_examples(pairs.OrganismPairConfig(n=8, question_fraction=0.25))


@pytest.fixture(scope="session")
def small_pairs():
    """Forty organism preference pairs as a ``datasets.Dataset``."""
    from dpo_link import pairs

    return pairs.organism_pairs(pairs.OrganismPairConfig(n=40, question_fraction=0.3))


def tiny_model(processor, seed=0, peaky=False, double=False):
    """A tiny random organism-shaped Llava with eager attention, in eval mode. ``peaky`` sharpens its attention so
    that D-LEAF's correction moves the log-probabilities visibly; ``double`` makes it float64."""
    import torch

    from dleaf.organism import build

    model = build.build_model(processor.tokenizer, tiny_shape(), seed=seed)
    model.set_attn_implementation("eager")
    if peaky:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "language_model" in name and ("q_proj" in name or "k_proj" in name):
                    p.mul_(4)
    if double:
        model = model.double()
    return model.eval()


def tiny_peft(processor, init_lora_weights=False, seed=0, peaky=False, double=False):
    """:func:`tiny_model` with a LoRA adapter on q_proj and v_proj (random unless ``init_lora_weights``: then the
    adapter is the identity)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = tiny_model(processor, seed, peaky, double)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=init_lora_weights))
    return peft_model.eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, processor):
    """The tiny random organism saved like a checkpoint (so that scripts can load it by path)."""
    from dleaf.organism import build

    path = tmp_path_factory.mktemp("tiny_organism")
    build.build_model(processor.tokenizer, tiny_shape(), seed=0).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_model():
    """The factory :func:`tiny_model` (``make_model(processor, seed=0, peaky=False, double=False)``)."""
    return tiny_model


@pytest.fixture(scope="session")
def make_peft():
    """The factory :func:`tiny_peft` (``make_peft(processor, init_lora_weights=False, seed=0, ...)``)."""
    return tiny_peft
