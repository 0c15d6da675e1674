"""Measure the hallucination profile of the organism and its no-prior control through the evaluation harness:
captions (CHAIR, additions and substitutions, partner share) and yes/no answers on the held-out splits, the premise
tables (per layer, LIAE and image mass at hallucinated versus grounded object words; at every reply row, the rows
that predict hallucinated object words against the other rows, with position held fixed; wrong against right yes/no
answers at their first token) and a per-patch linear probe.

    python scripts/profile_organism.py                                  # 1,000 images per split, both models
    python scripts/profile_organism.py --limit 200 --output_dir runs/profile_small
    python scripts/profile_organism.py --model runs/my_organism --regime_only --limit 100

``--regime_only`` is the cheap check of a checkpoint during training: captions of ``--splits`` (default the
adversarial split) with their attention regime and yes/no answers with random negatives, without the premise tables,
the other negative sets and the probe (about a minute per 100 images for a small organism).

Writes organism_profile.json, organism_profile.md and the premise figures to --output_dir.
"""

import sys

from dleaf import cli
from dleaf.organism import world

HELD_OUT = tuple(s for s in world.SPLITS if s != "train")


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)
    cli.add_common_arguments(ap, output_dir="runs/profile", model=False, seed=0)
    ap.add_argument("--model", default="organism", help="the organism: a name or a checkpoint folder")
    ap.add_argument("--control", default=None,
                    help="the no-prior control profiled beside the model ('' to skip; default: organism_control, "
                         "none with --regime_only)")
    ap.add_argument("--limit", type=int, default=1000, help="images per held-out split")
    ap.add_argument("--batch_size", type=int, default=100, help="prompts per generate call")
    ap.add_argument("--probe", action="store_true", default=True, help="also run the per-patch linear probe")
    ap.add_argument("--no_probe", dest="probe", action="store_false", help="skip the per-patch linear probe")
    ap.add_argument("--attention_regime", action="store_true",
                    help="also measure the attention regime (sinks, image-attention deficit, visual sinks, grounding "
                         "heads) on the premise splits' captions")
    ap.add_argument("--splits", nargs="+", choices=HELD_OUT, default=None,
                    help="caption splits (default: all three; with --regime_only: adversarial); the premise tables "
                         "run on those of them that are adversarial or replication")
    ap.add_argument("--negatives", nargs="+", choices=world.POPE_NEGATIVES, default=None,
                    help="yes/no negative sets (default: all three; with --regime_only: random)")
    ap.add_argument("--regime_only", action="store_true",
                    help="only captions, their attention regime and yes/no answers: no premise tables, no probe "
                         "(a cheap check of a training checkpoint)")
    for old, new in (("--organism", "--model"), ("--n_images", "--limit")):
        cli.add_old_spelling(ap, old, new)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    import dataclasses
    import time
    from pathlib import Path

    import torch

    from dleaf import models
    from dleaf.io import InputError, write_json_atomic, write_text_atomic
    from dleaf.organism.profile import ProfileProtocol, patch_probe, profile_markdown, profile_model
    from dleaf.premise import PremiseRow, plot_premise

    splits = tuple(args.splits or (("adversarial",) if args.regime_only else HELD_OUT))
    negatives = tuple(args.negatives or (("random",) if args.regime_only else world.POPE_NEGATIVES))
    premise = () if args.regime_only else tuple(s for s in splits if s in ProfileProtocol.premise_splits)
    attention_regime = args.attention_regime or args.regime_only
    try:
        protocol = ProfileProtocol(n_images=args.limit, batch_size=args.batch_size, caption_splits=splits,
                                   pope_negatives=negatives, premise_splits=premise,
                                   regime_splits=splits if args.regime_only else None)
    except ValueError as e:
        raise InputError(str(e)) from None
    control = args.control if args.control is not None else ("" if args.regime_only else "organism_control")
    named = {"organism": args.model, **({"control": control} if control else {})}
    for path in named.values():
        models.check_model(path)
    cli.check_output_dir(args.output_dir)
    cli.set_threads(args.threads)
    torch.manual_seed(args.seed)
    profile = {"protocol": dataclasses.asdict(protocol), "scene_digests": {}, "models": {}}
    for split in set(protocol.caption_splits) | {protocol.pope_split}:
        profile["scene_digests"][split] = world.scene_digest(world.scenes(split, protocol.n_images))
    for name, path in named.items():
        model, processor = models.load(path, device="cpu")
        t0 = time.time()
        profile["models"][name] = profile_model(model, processor, protocol,
                                                progress=lambda m, n=name: print(f"[{n}] {m}", flush=True),
                                                attention_regime=attention_regime)
        if args.probe and not args.regime_only:
            profile["models"][name]["patch_probe"] = patch_probe(model, processor, seed=args.seed)
        profile["models"][name]["seconds"] = time.time() - t0
    out = Path(args.output_dir)
    write_json_atomic(profile, out / "organism_profile.json")
    for name, res in profile["models"].items():
        for split, rows in res["premise"].items():
            if rows:
                plot_premise([PremiseRow(**r) for r in rows], out / f"{name}_premise_{split}.png",
                             title=f"{name} ({named[name]}), greedy captions, {split} split")
    md = profile_markdown(profile)
    write_text_atomic(md, out / "organism_profile.md")
    print(md)
    cli.done(out)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main, resumable=False))
