"""What the first screen shows: captions where greedy decoding hallucinates, beside the same images decoded with
D-LEAF (or another method), every object word checked against the image's ground truth. The examples are not
hand-picked: greedy decoding is run on the first ``scan`` items of a caption benchmark (by default the organism's
adversarial scenes, exact ground truth) and the items where its caption names an absent object are shown."""

from __future__ import annotations

from . import eval as harness
from .settings import Setting


def hallucination_examples(model, processor, setting: Setting, scan: int = 64, n: int = 3, batch_size: int = 64,
                           split: str = "adversarial", benchmark: str = "organism_caption") -> dict:
    """Greedy and ``setting`` on the first ``scan`` items of section ``split`` of the caption ``benchmark``:
    ``examples`` (up to ``n`` items where greedy's caption hallucinates, each with both captions, the hallucinated
    objects of each, the image's objects) and ``summary`` (CHAIR_s and hallucinated mentions of both on the scanned
    items)."""
    bench = harness.load_benchmark(benchmark, limit=scan, splits=[split])
    plain = harness.evaluate(model, processor, bench, Setting(), batch_size)
    steered = harness.evaluate(model, processor, bench, setting, batch_size)
    examples = []
    for it, g, m, gs, ms in zip(bench.items, plain["rows"], steered["rows"], plain["scores"], steered["scores"]):
        if gs["hallucinated"] and len(examples) < n:
            examples.append({"id": it.id, "objects": sorted(it.truth), "greedy": g["text"],
                             "greedy_hallucinated": gs["hallucinated"], "method": m["text"],
                             "method_hallucinated": ms["hallucinated"]})
    g, m = plain["sections"][split], steered["sections"][split]
    summary = {"scanned": len(bench.items), "greedy_chair_s": g["chair_s"], "method_chair_s": m["chair_s"],
               "greedy_hallucinated_mentions": g["n_hallucinated_mentions"],
               "method_hallucinated_mentions": m["n_hallucinated_mentions"],
               "greedy_recall": g["recall"], "method_recall": m["recall"]}
    return {"examples": examples, "summary": summary, "setting": setting.label}


def effect_sentence(summary: dict, label: str) -> str:
    """One sentence on the effect measured on the scanned scenes, saying plainly when it is small."""
    g, m = 100 * summary["greedy_chair_s"], 100 * summary["method_chair_s"]
    diff = m - g
    what = (f"on these {summary['scanned']} scenes, {label} moves CHAIR_s (captions naming an absent object) from "
            f"{g:.1f}% to {m:.1f}% and hallucinated mentions from {summary['greedy_hallucinated_mentions']} to "
            f"{summary['method_hallucinated_mentions']}")
    if abs(diff) < 2.0:
        return f"The effect is small: {what}; see docs/results_organism.md for the measured grid with intervals."
    return f"{what[0].upper()}{what[1:]}; docs/results_organism.md has the measured grid with intervals."


def first_hallucination(model, processor, benchmark, batch_size: int = 32) -> int | None:
    """The index of the first item of a caption ``benchmark`` whose greedy caption names an absent object (None when
    none does)."""
    scores = harness.evaluate(model, processor, benchmark, Setting(), batch_size)["scores"]
    return next((k for k, sc in enumerate(scores) if sc["hallucinated"]), None)
