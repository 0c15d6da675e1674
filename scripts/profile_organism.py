"""Measure the hallucination profile of the organism and its no-prior control through the evaluation harness:
captions (CHAIR, additions and substitutions, partner share) and yes/no answers on the held-out splits, the premise
tables (per layer, LIAE and image mass at hallucinated versus grounded object words; at every reply row, the rows
that predict hallucinated object words against the other rows, with position held fixed; wrong against right yes/no
answers at their first token) and a per-patch linear probe.

    python scripts/profile_organism.py                                  # 1,000 images per split, both models
    python scripts/profile_organism.py --limit 200 --output_dir runs/profile_small

Writes organism_profile.json, organism_profile.md and the premise figures to --output_dir.
"""

import sys

from dleaf import cli


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)
    cli.add_common_arguments(ap, output_dir="runs/profile", model=False, seed=0)
    ap.add_argument("--model", default="organism", help="the organism: a name or a checkpoint folder")
    ap.add_argument("--control", default="organism_control", help="the control ('' to skip)")
    ap.add_argument("--limit", type=int, default=1000, help="images per held-out split")
    ap.add_argument("--batch_size", type=int, default=100, help="prompts per generate call")
    ap.add_argument("--probe", action="store_true", default=True, help="also run the per-patch linear probe")
    ap.add_argument("--no_probe", dest="probe", action="store_false", help="skip the per-patch linear probe")
    ap.add_argument("--attention_regime", action="store_true",
                    help="also measure the attention regime (sinks, image-attention deficit, visual sinks, grounding "
                         "heads) on the premise splits' captions")
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
    from dleaf.organism import world
    from dleaf.organism.profile import ProfileProtocol, patch_probe, profile_markdown, profile_model
    from dleaf.premise import PremiseRow, plot_premise

    try:
        protocol = ProfileProtocol(n_images=args.limit, batch_size=args.batch_size)
    except ValueError as e:
        raise InputError(str(e)) from None
    named = {"organism": args.model, **({"control": args.control} if args.control else {})}
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
                                                attention_regime=args.attention_regime)
        if args.probe:
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
