"""Compare greedy decoding, D-LEAF (its variants, a gamma sweep, the ablations), PAI and SPIN on the organism.

    python scripts/organism_grid.py --n_images 1000 --out runs/grid            # screening on the adversarial split
    python scripts/organism_grid.py --n_images 1000 --out runs/grid --replicate dleaf pai

Every setting's per-image rows go to <out>/grid.jsonl as soon as they are computed (a rerun resumes). The summary,
with paired bootstrap intervals of each difference from greedy on the same images, is written to <out>/grid.md and
<out>/grid.json. ``--replicate`` re-runs the named settings (and greedy) on the replication split.
"""

import argparse
from pathlib import Path

from dleaf.organism import build, study
from dleaf.io import write_json_atomic, write_text_atomic

S = study.setting


def grid(random_rate: float | None) -> list:
    settings = [
        S("greedy"),
        S("pai", "pai"),
        S("spin", "spin"),
        S("dleaf", "dleaf"),
        S("dleaf gamma=0.25", "dleaf", gamma=0.25),
        S("dleaf gamma=1", "dleaf", gamma=1.0),
        S("dleaf liae=mean_head", "dleaf", liae_variant="mean_head"),
        S("dleaf iaf=focus", "dleaf", iaf_variant="focus"),
        S("dleaf threshold=best", "dleaf", threshold="best", margin=0.05),
        S("dleaf kappa=0", "dleaf", kappa=0.0),
        S("dleaf signal=mass_deficit", "dleaf", layer_signal="mass_deficit"),
        S("dleaf heads=all_but_best", "dleaf", head_selection="all_but_best"),
        S("no_localization", "no_localization"),
    ]
    if random_rate is not None:
        settings.append(S("random_layers", "random_layers", random_rate=round(random_rate, 4)))
    return settings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(build.ORGANISM_DIR))
    ap.add_argument("--n_images", type=int, default=1000)
    ap.add_argument("--out", default="runs/grid")
    ap.add_argument("--only", nargs="*", default=None, help="labels to run (default: the whole grid)")
    ap.add_argument("--replicate", nargs="*", default=[], help="labels to confirm on the replication split")
    ap.add_argument("--no_pope", action="store_true")
    args = ap.parse_args(argv)
    if args.n_images <= 0:
        ap.error(f"--n_images must be positive, got {args.n_images}")
    model, processor = build.load_organism(args.checkpoint)
    out = Path(args.out)
    jsonl = out / "grid.jsonl"
    first = [s for s in grid(None) if s.label in ("greedy", "dleaf")]
    results = study.run_grid(model, processor, first, "adversarial", args.n_images, jsonl, pope=not args.no_pope)
    settings = grid(results["dleaf"]["flag_rate"])
    if args.only is not None:
        unknown = set(args.only) - {s.label for s in settings}
        if unknown:
            ap.error(f"unknown labels {sorted(unknown)}; the grid has {[s.label for s in settings]}")
        settings = [s for s in settings if s.label in set(args.only) | {"greedy", "dleaf"}]
    results = study.run_grid(model, processor, settings, "adversarial", args.n_images, jsonl, pope=not args.no_pope)
    table, md = study.summary_table(results)
    sections = [f"## Adversarial split, {args.n_images} images\n\n{md}"]
    report = {"adversarial": table}
    if args.replicate:
        rep = [s for s in settings if s.label in set(args.replicate) | {"greedy"}]
        rep_results = study.run_grid(model, processor, rep, "replication", args.n_images, jsonl,
                                     pope=not args.no_pope)
        rep_table, rep_md = study.summary_table(rep_results)
        sections.append(f"## Replication split, {args.n_images} images\n\n{rep_md}")
        report["replication"] = rep_table
    legend = ("Cells: value (difference from greedy [95% paired bootstrap interval]), in percentage points for rates. "
              "Mentions are totals over the split's captions.\n")
    write_text_atomic("# Decoding methods on the organism\n\n" + legend + "\n" + "\n\n".join(sections), out / "grid.md")
    write_json_atomic(report, out / "grid.json")
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
