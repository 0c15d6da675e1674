"""The adapter's effect on hallucination in the organism: CHAIR, recall and POPE with and without the adapter.

Same protocol as the organism profile (:mod:`dleaf.organism.profile`): greedy decoding, world seed 0, the first
``n_images`` scenes of each held-out split, caption prompt "describe the image in detail .", POPE questions on the
adversarial split. The base model is the same PEFT model with its adapter disabled, so both rows share every weight
but the adapter's.
"""

from __future__ import annotations

from dleaf import metrics
from dleaf.organism import world
from dleaf.organism.profile import VOCAB, generate

CAPTION_SPLITS = ("indist", "adversarial", "replication")


def evaluate_model(model, processor, n_images: int, caption_splits=CAPTION_SPLITS, pope_split: str = "adversarial",
                   pope_negatives=world.POPE_NEGATIVES, batch_size: int = 100, max_new_tokens: int = 80) -> dict:
    out: dict = {"captions": {}, "pope": {}}
    for split in caption_splits:
        scenes = world.scenes(split, n_images, 0)
        captions, _ = generate(model, processor, scenes, [world.CAPTION_PROMPTS[0]] * len(scenes), max_new_tokens,
                               batch_size)
        res = metrics.chair(captions, [s.objects for s in scenes], VOCAB).as_dict()
        res.pop("per_caption", None)
        out["captions"][split] = res
    scenes = world.scenes(pope_split, n_images, 0)
    for neg in pope_negatives:
        questions = world.pope_questions(scenes, neg)
        answers, _ = generate(model, processor, [q.scene for q in questions],
                              [world.QUESTION_TEMPLATE.format(obj=q.obj) for q in questions], 8, batch_size)
        out["pope"][neg] = metrics.pope(answers, [q.label for q in questions]).as_dict()
    return out


def compare_adapter(peft_model, processor, n_images: int, **kwargs) -> dict:
    """``{"base": ..., "adapter": ...}`` evaluations (see :func:`evaluate_model`) and the protocol."""
    was_training = peft_model.training
    peft_model.eval()
    with peft_model.disable_adapter():
        base = evaluate_model(peft_model, processor, n_images, **kwargs)
    adapter = evaluate_model(peft_model, processor, n_images, **kwargs)
    peft_model.train(was_training)
    return {"n_images": n_images, "world_seed": 0, "decoding": "greedy", "base": base, "adapter": adapter}


def _pct(x) -> str:
    return "nan" if x is None or x != x else f"{100 * x:.1f}"


def evaluation_markdown(ev: dict) -> str:
    lines = [f"{ev['n_images']} images per split (world seed {ev['world_seed']}), {ev['decoding']} decoding.", "",
             "| model | split | CHAIR_s % | CHAIR_i % | recall % | words | hallucinated mentions | grounded mentions |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("base", "adapter"):
        for split, c in ev[name]["captions"].items():
            lines.append(f"| {name} | {split} | {_pct(c['chair_s'])} | {_pct(c['chair_i'])} | {_pct(c['recall'])} | "
                         f"{c['mean_length']:.1f} | {c['n_hallucinated_mentions']} | {c['n_grounded_mentions']} |")
    lines += ["", "| model | POPE negatives | accuracy % | F1 % | yes ratio % |", "|---|---|---|---|---|"]
    for name in ("base", "adapter"):
        for neg, p in ev[name]["pope"].items():
            lines.append(f"| {name} | {neg} | {_pct(p['accuracy'])} | {_pct(p['f1'])} | {_pct(p['yes_ratio'])} |")
    return "\n".join(lines)


