"""dleaf: D-LEAF (layer image attention entropy, image attention focus, head fusion) for vision-language models,
the hallucination metrics that measure it, and the organism every command and test can run on offline."""

__version__ = "0.1.0"
