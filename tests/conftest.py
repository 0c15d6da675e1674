import pytest


@pytest.fixture(scope="session")
def tiny_organism():
    """A randomly initialised organism-shaped Llava (3 decoder layers, 4 heads) with eager attention, and its
    processor: for tests that need a real model but not a trained one."""
    from dleaf.organism import build

    shape = build.OrganismShape(text_hidden=32, text_layers=3, text_heads=4, text_intermediate=64)
    processor = build.build_processor(shape)
    model = build.build_model(processor.tokenizer, shape, seed=0).eval()
    model.set_attn_implementation("eager")
    return model, processor
