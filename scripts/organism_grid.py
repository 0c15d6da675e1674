"""Compare greedy decoding, D-LEAF (its variants, a gamma sweep, the ablations), PAI and SPIN on the organism,
every setting through the evaluation harness, with paired bootstrap intervals of each difference from greedy.

    python scripts/organism_grid.py --limit 1000 --output_dir runs/grid            # the adversarial split
    python scripts/organism_grid.py --limit 1000 --output_dir runs/grid --replicate dleaf pai

Each setting is a harness run folder under <output_dir>/<split>/<setting>/ (captions, pope); a rerun resumes or
skips them. The summary is written to <output_dir>/grid.md and grid.json. --replicate re-runs the named settings
(and greedy) on the replication split.
"""

import sys

from dleaf import cli


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)
    cli.add_common_arguments(ap, output_dir="runs/grid", seed=0)
    ap.add_argument("--limit", type=int, default=1000, help="scenes per split")
    ap.add_argument("--batch_size", type=int, default=100, help="prompts per generate call")
    ap.add_argument("--only", nargs="*", default=None, help="labels to run (default: the whole grid)")
    ap.add_argument("--replicate", nargs="*", default=[], help="labels to confirm on the replication split")
    ap.add_argument("--detector", default=None,
                    help="the detector file of the learned settings (python -m dleaf.detect fits one for --model); "
                         "default: the shipped detector fitted on --model, and without one the learned settings "
                         "are left out")
    ap.add_argument("--no_pope", dest="pope", action="store_false", help="skip the yes/no questions")
    cli.add_old_spelling(ap, "--n_images", "--limit")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from dleaf import models
    from dleaf.io import InputError, write_json_atomic, write_text_atomic
    from dleaf import grid

    if args.limit < 1 or args.batch_size < 1:
        raise InputError("--limit and --batch_size must be positive")
    labels = [s.label for s in grid.grid(0.1)]
    for name, chosen in (("--only", args.only or ()), ("--replicate", args.replicate)):
        unknown = sorted(set(chosen) - set(labels))
        if unknown:
            raise InputError(f"{name}: unknown setting(s) {unknown}; the grid has {labels}")
    if args.detector is not None:
        from dleaf.detect import as_detector

        try:
            as_detector(args.detector)
        except ValueError as e:
            raise InputError(f"--detector: {e}") from e
    cli.check_output_dir(args.output_dir)
    cli.set_threads(args.threads)
    model, processor = models.load(args.model)
    res = grid.run_organism_grid(model, processor, args.output_dir, args.limit, args.only, args.replicate,
                                  args.pope, args.batch_size, model_name=args.model, seed=args.seed,
                                  detector=args.detector)
    out = Path(args.output_dir)
    write_text_atomic(res["markdown"], out / "grid.md")
    write_json_atomic(res["report"], out / "grid.json")
    print(res["markdown"])
    cli.done(out / "grid.md", out / "grid.json")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main))
