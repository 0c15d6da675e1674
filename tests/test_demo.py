"""Tests for dleaf.demo: the examples are the scanned scenes where greedy decoding hallucinates (found by
running it), and the effect sentence says plainly when the effect is small."""

from dleaf import eval as harness
from dleaf import demo
from dleaf.settings import Setting


def test_examples_are_the_scenes_where_greedy_hallucinates(tiny_organism):
    model, processor = tiny_organism
    setting = Setting("spin", {"keep_ratio": 0.25, "scale": 0.0})
    res = demo.hallucination_examples(model, processor, setting, scan=6, n=2, batch_size=6)
    bench = harness.load_benchmark("organism_caption", limit=6, splits=["adversarial"])
    greedy = harness.evaluate(model, processor, bench, Setting(), 6)
    want = [it.id for it, sc in zip(bench.items, greedy["scores"]) if sc["hallucinated"]][:2]
    assert [ex["id"] for ex in res["examples"]] == want
    for ex in res["examples"]:
        assert ex["greedy_hallucinated"] and set(ex["greedy_hallucinated"]).isdisjoint(ex["objects"])
    assert res["summary"]["scanned"] == 6
    assert res["summary"]["greedy_chair_s"] == greedy["sections"]["adversarial"]["chair_s"]
    first = demo.first_hallucination(model, processor, bench)
    assert first == (next((k for k, sc in enumerate(greedy["scores"]) if sc["hallucinated"]), None))


def test_effect_sentence():
    small = {"scanned": 64, "greedy_chair_s": 0.20, "method_chair_s": 0.19, "greedy_hallucinated_mentions": 14,
             "method_hallucinated_mentions": 13}
    assert demo.effect_sentence(small, "dleaf").startswith("The effect is small: on these 64 scenes, dleaf moves "
                                                           "CHAIR_s")
    large = dict(small, method_chair_s=0.10)
    text = demo.effect_sentence(large, "dleaf")
    assert text.startswith("On these 64 scenes") and "20.0% to 10.0%" in text and "small" not in text
