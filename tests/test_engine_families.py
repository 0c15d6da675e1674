"""The model families a user would try, each a tiny random model built here (tests/model_families.py): D-LEAF at
gamma 0 is plain decoding (greedy, batch 2, left padding), the statistics of the first decoded row equal a
brute-force computation from the model's own attentions, and a method that flags changes the logits. A family the
engine cannot serve exactly is refused at attach (or at its first call) with a message that names it. The README's
family list is the set this matrix passes."""

import math
import re
import textwrap
from pathlib import Path

import pytest
import torch

from dleaf import engine
from model_families import FAMILIES

GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, max_new_tokens=4)

#: Families the engine refuses, and the words its error must contain (it names the model class).
REFUSED: dict[str, str] = {
    "mllama": "MllamaForConditionalGeneration: the image reaches this decoder through cross-attention layers",
    "lfm2_vl": r"Lfm2VlForConditionalGeneration: decoder layers \[0\] have no attention module",
}

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"


def readme_block() -> str:
    """The README's family list, as the matrix generates it."""
    names = [FAMILIES[f][0] for f in FAMILIES if f not in REFUSED]
    refused = [FAMILIES[f][0] for f in REFUSED]
    text = ", ".join(names) + ". Refused with an error that names the reason: " + ", ".join(refused) + "."
    return f"{BEGIN}\n" + textwrap.fill(text, 118) + f"\n{END}"


def _brute_force_liae(attentions, input_ids, image_id, b, row):
    """Per layer, the normalised entropy of the head-mixed image profile at ``row`` of sample ``b``."""
    img = [k for k in range(input_ids.shape[1]) if int(input_ids[b, k]) == image_id]
    out = []
    for att in attentions:
        a = att[b, :, row].double()
        heads = a.shape[0]
        masses = [sum(float(a[h, k]) for k in img) for h in range(heads)]
        mixed = [sum(float(a[h, k]) / masses[h] for h in range(heads) if masses[h] > 0) / heads for k in img]
        out.append(-sum(p * math.log(p) for p in mixed if p > 0) / math.log(len(img)))
    return out


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family):
    label, build = FAMILIES[family]
    model, inputs = build()
    assert (inputs["attention_mask"] == 0).any()  # left padding
    if family in REFUSED:
        with pytest.raises((ValueError, NotImplementedError), match=REFUSED[family]):
            with engine.attached(model, "dleaf"):
                model.generate(**inputs, **GEN)
        return
    plain = model.generate(**inputs, **GEN)
    with engine.attached(model, "dleaf", gamma=0.0, trace=True, kappa=0.0, warmup=1) as iv:
        zero = model.generate(**inputs, **GEN)
    assert torch.equal(zero.sequences, plain.sequences), label
    assert all(torch.equal(a, b) for a, b in zip(zero.logits, plain.logits)), label  # bit for bit
    # brute force on the first decoded row (the prompt's last row), every layer, both samples
    n = inputs["input_ids"].shape[1]
    attentions = model(**inputs, output_attentions=True).attentions
    image_id = engine.image_token_id(model)
    for b in range(2):
        trace = iv.trace.sample(b)
        assert int(trace["positions"][0]) == n - 1
        want = _brute_force_liae(attentions, inputs["input_ids"], image_id, b, n - 1)
        assert trace["signal"][0].tolist() == pytest.approx(want, rel=1e-4, abs=1e-5), label
    with engine.attached(model, "no_localization", trace=True, gamma=1.0) as iv:  # flags every layer
        strong = model.generate(**inputs, **GEN)
    assert iv.flag_rate() == 1.0
    assert any((a - b).abs().max() > 1e-5 for a, b in zip(strong.logits, plain.logits)), label
    assert model.config.text_config._attn_implementation == "eager"  # restored


def test_readme_lists_the_families_the_matrix_passes():
    text = README.read_text()
    found = re.search(re.escape(BEGIN) + ".*?" + re.escape(END), text, re.S)
    assert found is not None, f"README.md has no family list between {BEGIN} and {END}"
    assert found.group(0) == readme_block(), "README.md's family list must read:\n" + readme_block()


if __name__ == "__main__":  # print the README block
    print(readme_block())
