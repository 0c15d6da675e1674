"""The tiny random organism the tests build (importable by name: ``from tiny_organisms import ...``; a test module
cannot import a conftest by name, as two of them exist)."""


TINY_SHAPE = dict(text_hidden=32, text_layers=3, text_heads=4, text_intermediate=64)


def build_tiny_organism(seed: int = 0, sharpen: float = 1.0):
    """A randomly initialised organism-shaped Llava (3 decoder layers, 4 heads) with eager attention, and its
    processor; ``sharpen`` scales the language model's query and key projections (see :data:`SHARPEN`)."""
    from dleaf.organism import build
    from margins import sharpen_attention

    shape = build.OrganismShape(**TINY_SHAPE)
    processor = build.build_processor(shape)
    model = build.build_model(processor.tokenizer, shape, seed=seed).eval()
    model.set_attn_implementation("eager")
    return (sharpen_attention(model, sharpen) if sharpen != 1.0 else model), processor


#: The query and key projections of the sharp organism's language model are scaled by this (the attention logits by
#: its square). The plain random organism attends almost uniformly: its D-LEAF layer signals (image-attention
#: entropies over log |I|) all lie within 1e-5 of 1 and the closest flag within one float32 rounding step (5e-8) of
#: its running threshold, and under D-LEAF two tokens' logits come within 1e-5 of each other, so which layers are
#: flagged and which token greedy decoding picks are decided by rounding. Sharpened, the flags and head choices the
#: tests compare lie 1.2e-4 or more from a tie and the greedy choices 7e-4 or more (tests/margins.py checks each).
SHARPEN = 8.0
