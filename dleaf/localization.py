"""Localization against correction on the organism: oracle flags at the rows that predict hallucinated (or grounded)
object words of each greedy caption, every correction applied there, and what happens to those words.

D-LEAF is a localization (where: its LIAE running threshold, :mod:`dleaf.methods.localizers`) and a correction
(how: fusing weak heads toward the best head). On the organism it barely flags. The oracle separates the two: the
rows to act on come from exact ground truth instead of a signal, so whatever a correction fails to fix there is the
correction's failure, not the localization's.

- :func:`object_words`: the object words of a generated reply, each with its position (the index of its token among
  the generated tokens, which is also the active row whose logits produce it: position 0 is the prompt's last row)
  and whether the scene holds the object.
- :func:`organism_flags`: the :class:`~dleaf.methods.localizers.oracle.FlagSet` of a set of greedy replies: per
  reply (keyed by its index), the positions of its hallucinated (``target="hallucinated"``) or grounded
  (``"grounded"``) object words, in every watched layer, with the reply's tokens, so that a caption's later flags are
  dropped once its text has changed.
- :func:`word_changes`: per flagged word, what the corrected decoding produced at its position.
- :func:`measure`: greedy decoding, the flags, and every operator at the flagged rows through the harness's
  generation loop and scores, with paired bootstrap intervals (``python -m dleaf.localization``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .methods.localizers.oracle import FlagSet

TARGETS = ("hallucinated", "grounded", "random")
#: what a flagged word became at its position in the corrected caption
OUTCOMES = ("unchanged", "grounded object, new", "grounded object, named before", "other absent object",
            "non-object word", "end of caption", "not reached")


def _categories(objects) -> dict:
    """``{one-word name: category}`` from a mapping (a vocabulary's ``synonyms``) or a list of names."""
    if isinstance(objects, Mapping):
        return {w: c for w, c in objects.items() if " " not in w}
    return {w: w for w in objects}


def object_words(token_ids: Sequence[int], tokenizer, truth, objects) -> list[dict]:
    """``[{"position", "word", "category", "hallucinated"}]`` for every generated token of ``token_ids`` that is an
    object name: ``objects`` maps one-word names to categories (a caption benchmark's vocabulary ``synonyms``; a
    list of names maps each to itself; the organism's tokenizer has one token per word); ``truth``: the image's
    categories."""
    names = _categories(objects)
    words = tokenizer.convert_ids_to_tokens(list(token_ids))
    return [{"position": j, "word": w, "category": names[w], "hallucinated": names[w] not in truth}
            for j, w in enumerate(words) if w in names]


def organism_flags(rows: Sequence[dict], truths: Sequence, tokenizer, objects,
                   target: str = "hallucinated", layers="all", seed: int = 0) -> FlagSet:
    """Oracle flags from greedy generation rows (each with ``token_ids``, the reply's generated tokens up to and
    including its end-of-sequence token), keyed ``"0", "1", ...`` in row order: the positions of the object words of
    ``target`` kind (``"hallucinated"``, ``"grounded"``), or (``"random"``) as many positions as the reply has
    hallucinated words drawn uniformly without replacement among its positions that hold no object word (seeded by
    ``seed`` and the row's index); in ``layers`` (``"all"``: every watched layer), with the reply's tokens."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    samples = {}
    for k, (row, truth) in enumerate(zip(rows, truths)):
        found = object_words(row["token_ids"], tokenizer, set(truth), objects)
        if target == "random":
            taken = {w["position"] for w in found}
            free = [p for p in range(len(row["token_ids"])) if p not in taken]
            n = min(len(free), sum(w["hallucinated"] for w in found))
            chosen = sorted(int(p) for p in np.random.default_rng([seed, k]).choice(free, n, replace=False)) if n else []
        else:
            chosen = [w["position"] for w in found if w["hallucinated"] == (target == "hallucinated")]
        samples[str(k)] = {"rows": {p: layers for p in chosen}, "tokens": list(row["token_ids"])}
    return FlagSet(samples, meta={"target": target})


def word_changes(greedy: Sequence[dict], corrected: Sequence[dict], flags: FlagSet, truths: Sequence, tokenizer,
                 objects, eos_ids: set) -> dict:
    """Per flagged word (every flagged position of :func:`organism_flags`), what the corrected reply holds at its
    position: ``unchanged``; a grounded object the caption had not named before that position (``grounded object,
    new``) or had (``grounded object, named before``); an ``other absent object``; a ``non-object word``; the ``end of
    caption`` (its end-of-sequence token, or no token); or ``not reached`` (the caption had already changed before
    that position, so its flag was dropped). Also: how many reached words' objects the corrected caption still names
    anywhere (``still_named``), the words changed into (``into``), and the number of flagged captions whose corrected
    tokens equal the greedy ones before their first flagged position (``same_before_first_flag``, of
    ``flagged_captions``)."""
    names = _categories(objects)
    counts, into, still, same, flagged = Counter(), Counter(), 0, 0, 0
    for k, (g, c, truth) in enumerate(zip(greedy, corrected, truths)):
        entry = flags.lookup(str(k))
        gi, ci = list(g["token_ids"]), list(c["token_ids"])
        c_cats = [names.get(w) for w in tokenizer.convert_ids_to_tokens(ci)]
        c_words = set(c_cats) - {None}
        if entry["rows"]:
            flagged += 1
            first = min(entry["rows"])
            same += ci[:first] == gi[:first]
        for p in sorted(entry["rows"]):
            word = names.get(tokenizer.convert_ids_to_tokens([gi[p]])[0])
            if ci[:p] != gi[:p]:
                counts["not reached"] += 1
                continue
            if word in c_words:
                still += 1
            if p < len(ci) and ci[p] == gi[p]:
                counts["unchanged"] += 1
                continue
            if p >= len(ci) or ci[p] in eos_ids:
                counts["end of caption"] += 1
                continue
            new = tokenizer.convert_ids_to_tokens([ci[p]])[0]
            into[new] += 1
            cat = names.get(new)
            if cat is not None and cat in truth:
                counts["grounded object, named before" if cat in c_cats[:p] else "grounded object, new"] += 1
            elif cat is not None:
                counts["other absent object"] += 1
            else:
                counts["non-object word"] += 1
    n = sum(counts.values())
    return {"n_flagged_words": n, "outcomes": {o: counts.get(o, 0) for o in OUTCOMES},
            "still_named": still, "into": dict(into.most_common(8)), "flagged_captions": flagged,
            "same_before_first_flag": same}


def threshold_hits(model, processor, items, flagsets: dict, batch_size: int = 100, knobs: dict | None = None,
                   max_new_tokens: int = 64, sentence_rule: str = "keep") -> dict:
    """Where D-LEAF's own localization flags, at the oracle's rows: D-LEAF watching at zero strength (which decodes
    exactly as greedy) with a trace, per target of ``flagsets`` the share of the target rows' watched (position,
    layer) cells it flags and the share of target rows with at least one flagged layer, beside the same shares over
    every active row of the greedy replies (up to and including their end-of-sequence row)."""
    from .generation import generate
    from .settings import Setting

    setting = Setting("dleaf", {**(knobs or {}), "gamma": 0.0})
    per_sample = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        with setting.attached(model, trace=True) as iv:
            rows = list(generate(model, processor, chunk, setting, max_new_tokens, batch_size, sentence_rule,
                                 intervention=iv, token_ids=True))
            watched = sorted(iv.watched)
            for b, row in enumerate(rows):
                flag = iv.trace.sample(b)["flag"][:, watched]  # (T, Lw): position t = generated position t
                per_sample.append(flag[:len(row["token_ids"])])
    out = {"all rows": _hit_shares(per_sample, None)}
    for target, flags in flagsets.items():
        out[target] = _hit_shares(per_sample, [sorted(flags.lookup(str(k))["rows"]) for k in range(len(items))])
    return out


def _hit_shares(per_sample, positions) -> dict:
    cells = flagged = rows = hit = 0
    for k, flag in enumerate(per_sample):
        chosen = range(flag.shape[0]) if positions is None else [p for p in positions[k] if p < flag.shape[0]]
        for p in chosen:
            cells += flag.shape[1]
            flagged += int(flag[p].sum())
            rows += 1
            hit += bool(flag[p].any())
    return {"n_rows": rows, "cell_share": flagged / cells if cells else None, "row_share": hit / rows if rows else None}


# ---------------------------------------------------------------------------------------------------- measurement
def operators() -> list[tuple[str, str, dict]]:
    """``(label, method, knobs)`` of every correction measured at the oracle rows."""
    return [("dleaf fusion gamma=0.25", "dleaf", {"gamma": 0.25}),
            ("dleaf fusion gamma=0.5", "dleaf", {"gamma": 0.5}),
            ("dleaf fusion gamma=1", "dleaf", {"gamma": 1.0}),
            ("dleaf fusion gamma=1 all_but_best", "dleaf", {"gamma": 1.0, "head_selection": "all_but_best"}),
            ("dleaf fusion gamma=1 iaf=focus", "dleaf", {"gamma": 1.0, "iaf_variant": "focus"}),
            ("pai amplification", "pai", {}),
            ("spin suppression", "spin", {})]


def _addition_arrays(scores):
    """Per caption (substitutions, additions): ``sub = min(|H|, |truth - G|)``, ``add = |H| - sub``."""
    sub = np.array([min(len(s["hallucinated"]), s["n_truth"] - len(s["grounded"])) for s in scores], float)
    add = np.array([len(s["hallucinated"]) for s in scores], float) - sub
    return sub, add


def _total(a, axis=-1):
    return np.sum(a, axis=axis)


def compare_scores(base: Sequence[dict], other: Sequence[dict], n_resamples: int = 2000, seed: int = 0) -> dict:
    """Paired differences (other - base) with 95% percentile bootstrap intervals, items resampled jointly: CHAIR_s,
    CHAIR_i, recall, hallucinated and grounded mentions per image (:func:`dleaf.eval.paired_differences`), and the
    totals of additions and substitutions."""
    from . import eval as harness

    section = base[0]["section"]
    out = dict(harness.paired_differences(base, other, n_resamples, seed)[section])
    (bs, ba), (os_, oa) = _addition_arrays(base), _addition_arrays(other)
    out["n_additions"] = harness.paired_difference((ba,), (oa,), _total, n_resamples, seed)
    out["n_substitutions"] = harness.paired_difference((bs,), (os_,), _total, n_resamples, seed)
    return out


def _row_stats(scores) -> dict:
    from . import eval as harness

    sub, add = _addition_arrays(scores)
    return {**harness.caption_stats(scores), "n_additions": int(add.sum()), "n_substitutions": int(sub.sum())}


def measure(model, processor, split: str = "adversarial", n_images: int = 200, out_dir: str | Path = "runs/loc",
            targets: Sequence[str] = TARGETS, ops: Sequence[tuple[str, str, dict]] | None = None,
            batch_size: int = 100, n_resamples: int = 2000, say: Callable = print) -> dict:
    """Greedy decoding of ``n_images`` captions of ``split``, the oracle flags of each target, and every operator
    at them; returns the report (also written to ``out_dir/localization.json``)."""
    from . import eval as harness
    from .generation import generate
    from .settings import Setting

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = harness.load_benchmark("organism_caption", limit=n_images, splits=[split])
    items = bench.items
    objects = bench.vocab.synonyms  # the organism's 24 object names, one word each
    truths = [set(it.truth) for it in items]
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    max_new = bench.max_new_tokens()
    rule = bench.protocol.sentence_rule

    def run(setting):
        t = time.time()
        rows = list(generate(model, processor, items, setting, max_new, batch_size, rule, token_ids=True))
        rows = [{"id": it.id, "section": it.section, **{k: v for k, v in r.items() if k != "id"}}
                for it, r in zip(items, rows)]
        return rows, harness.item_scores(bench, rows), time.time() - t

    greedy, g_scores, secs = run(Setting())
    say(f"[{split}] greedy: {secs:.0f} s")
    report = {"split": split, "n_images": len(items), "max_new_tokens": max_new, "greedy": _row_stats(g_scores),
              "targets": {}}
    flagsets = {t: organism_flags(greedy, truths, tok, objects, t) for t in targets}
    report["dleaf_threshold_hits"] = threshold_hits(model, processor, items,
                                                    {t: f for t, f in flagsets.items() if t != "random"}, batch_size,
                                                    max_new_tokens=max_new, sentence_rule=rule)
    say(f"[{split}] D-LEAF's own flags at the oracle rows: {report['dleaf_threshold_hits']}")
    for target in targets:
        flags = flagsets[target]
        path = flags.save(out_dir / f"flags_{split}_{target}.json")
        n_words = sum(len(e["rows"]) for e in flags.samples.values())
        n_caps = sum(bool(e["rows"]) for e in flags.samples.values())
        section = {"n_flagged_words": n_words, "n_flagged_captions": n_caps, "operators": {}}
        for label, method, knobs in (ops or operators()):
            setting = Setting(method, {**knobs, "localization": "oracle", "flags": str(path)})
            rows, scores, secs = run(setting)
            section["operators"][label] = {
                "method": method, "knobs": knobs, **_row_stats(scores),
                "vs_greedy": compare_scores(g_scores, scores, n_resamples),
                "words": word_changes(greedy, rows, flags, truths, tok, objects, eos_ids),
                "captions_changed": sum(g["token_ids"] != r["token_ids"] for g, r in zip(greedy, rows))}
            o = section["operators"][label]["words"]["outcomes"]
            say(f"[{split}] {target} {label}: {secs:.0f} s, {o}")
        report["targets"][target] = section
        from .io import write_json_atomic

        write_json_atomic(report, out_dir / f"localization_{split}.json")
    return report


def _iv(d, scale=100.0, digits=1) -> str:
    f = f"{{:+.{digits}f}}"
    return f"{f.format(scale * d['diff'])} [{f.format(scale * d['low'])}, {f.format(scale * d['high'])}]"


def markdown(report: dict) -> str:
    """Two tables per target: the flagged words' outcomes, and the caption statistics with paired intervals."""
    g = report["greedy"]
    lines = [f"### {report['split']} split, {report['n_images']} images (greedy: CHAIR_s {100 * g['chair_s']:.1f}%, "
             f"CHAIR_i {100 * g['chair_i']:.1f}%, recall {100 * g['recall']:.1f}%, additions {g['n_additions']}, "
             f"substitutions {g['n_substitutions']})", ""]
    hits = report.get("dleaf_threshold_hits")
    if hits:
        lines += ["#### Where D-LEAF's own localization flags (defaults, at zero strength)", "",
                  "| rows | n rows | flagged cells % | rows with a flagged layer % |", "|---|---|---|---|"]
        for name, h in hits.items():
            pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
            lines.append(f"| {name} | {h['n_rows']} | {pct(h['cell_share'])} | {pct(h['row_share'])} |")
        lines.append("")
    for target, sec in report["targets"].items():
        if target == "random":
            lines += [f"#### Control rows: random non-object positions, as many per caption as it has hallucinated "
                      f"words ({sec['n_flagged_words']} rows in {sec['n_flagged_captions']} captions)", ""]
        else:
            lines += [f"#### Oracle rows: {target} object words ({sec['n_flagged_words']} words in "
                      f"{sec['n_flagged_captions']} captions)", "",
                      "| operator | " + " | ".join(OUTCOMES) + " | object still named | captions changed |",
                      "|" + "---|" * (len(OUTCOMES) + 3)]
            for label, op in sec["operators"].items():
                w = op["words"]
                lines.append(f"| {label} | " + " | ".join(str(w["outcomes"][o]) for o in OUTCOMES)
                             + f" | {w['still_named']} | {op['captions_changed']} |")
            lines.append("")
        lines += operator_table(sec["operators"])
    return "\n".join(lines)


def operator_table(operators: dict) -> list[str]:
    """The markdown caption table of measured operators (label -> its measurement, with ``vs_greedy`` paired
    differences): CHAIR_s, CHAIR_i, recall, additions and substitutions with their intervals, captions changed."""
    lines = ["| operator | CHAIR_s % | CHAIR_i % | recall % | additions | substitutions | captions changed |",
             "|---|---|---|---|---|---|---|"]
    for label, op in operators.items():
        d = op["vs_greedy"]
        lines.append(
            f"| {label} | {100 * op['chair_s']:.1f} ({_iv(d['chair_s'])}) | {100 * op['chair_i']:.1f} "
            f"({_iv(d['chair_i'])}) | {100 * op['recall']:.1f} ({_iv(d['recall'])}) | {op['n_additions']} "
            f"({_iv(d['n_additions'], 1, 0)}) | {op['n_substitutions']} ({_iv(d['n_substitutions'], 1, 0)}) | "
            f"{op['captions_changed']} |")
    return lines + [""]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dleaf.localization", description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", "--output-dir", default="runs/localization")
    p.add_argument("--model", default="organism")
    p.add_argument("--splits", nargs="+", default=["adversarial"])
    p.add_argument("--n_images", "--n-images", type=int, default=200)
    p.add_argument("--batch_size", "--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="operator labels to run (default: all)")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS, help="which rows to flag")
    args = p.parse_args(argv)
    import torch

    from . import models

    torch.set_num_threads(args.threads)
    model, processor = models.load(args.model, attn_implementation="eager")
    ops = [o for o in operators() if args.only is None or o[0] in args.only]
    texts = []
    with torch.no_grad():
        for split in args.splits:
            rep = measure(model, processor, split, args.n_images, args.output_dir, targets=args.targets, ops=ops,
                          batch_size=args.batch_size, say=lambda m: print(m, flush=True))
            texts.append(markdown(rep))
    out = Path(args.output_dir) / "localization.md"
    out.write_text("\n\n".join(texts) + "\n")
    print(json.dumps({"written": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
