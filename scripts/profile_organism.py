"""Measure the hallucination profile of the organism and its no-prior control; write it under data/.

    python scripts/profile_organism.py                       # 1,000 images per split, both models
    python scripts/profile_organism.py --n_images 200 --output_dir runs/profile
"""

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from dleaf.premise import PremiseRow, plot_premise
from dleaf.organism import build, world
from dleaf.io import write_json_atomic, write_text_atomic
from dleaf.organism.profile import ProfileProtocol, patch_probe, profile_markdown, profile_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organism", default=str(build.ORGANISM_DIR), help="organism checkpoint folder")
    ap.add_argument("--control", default=str(build.CONTROL_DIR), help="control checkpoint folder ('' to skip)")
    ap.add_argument("--n_images", type=int, default=1000, help="images per held-out split")
    ap.add_argument("--batch_size", type=int, default=100)
    ap.add_argument("--output_dir", default=str(build.DATA_DIR),
                    help="where organism_profile.{json,md} and the premise figures go")
    ap.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the per-patch linear probe")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    protocol = ProfileProtocol(n_images=args.n_images, batch_size=args.batch_size)
    profile = {"protocol": dataclasses.asdict(protocol), "scene_digests": {}, "models": {}}
    for split in set(protocol.caption_splits) | {protocol.pope_split}:
        profile["scene_digests"][split] = world.scene_digest(world.scenes(split, protocol.n_images))
    models = {"organism": args.organism}
    if args.control:
        models["control"] = args.control
    for name, path in models.items():
        model, processor = build.load_organism(path)
        t0 = time.time()
        profile["models"][name] = profile_model(model, processor, protocol,
                                                progress=lambda m, n=name: print(f"[{n}] {m}", flush=True))
        if args.probe:
            profile["models"][name]["patch_probe"] = patch_probe(model, processor)
        profile["models"][name]["seconds"] = time.time() - t0
    out = Path(args.output_dir)
    write_json_atomic(profile, out / "organism_profile.json")
    for name, res in profile["models"].items():
        for split, rows in res["premise"].items():
            if rows:
                plot_premise([PremiseRow(**r) for r in rows], out / f"{name}_premise_{split}.png")
    md = profile_markdown(profile)
    write_text_atomic(md, out / "organism_profile.md")
    print(md)


if __name__ == "__main__":
    main()
