"""The premise check on a greedy caption run of the evaluation harness: does any layer's image attention (LIAE,
image mass) separate the model's hallucinated object words from its grounded ones, and, as a flagging method sees
it, the rows that predict hallucinated object words from every other reply row (AUROC with intervals over captions,
recall and precision of percentile flags, with position held fixed)? On a greedy yes/no run: wrong against right
answers at the row that predicts the first token.

    python scripts/evaluate.py --benchmark organism_caption --splits adversarial --output_dir runs/greedy
    python scripts/premise_check.py --run_dir runs/greedy
    python scripts/evaluate.py --benchmark organism_pope --splits adversarial --output_dir runs/pope
    python scripts/premise_check.py --run_dir runs/pope
    python scripts/premise_check.py --run_dir runs/llava_greedy --coco_images val2014/ \\
        --coco_instances instances_val2014.json --coco_captions captions_val2014.json

The run's config.json names the benchmark, the model, the adapter and the decoding; only greedy runs are accepted
(the replies are re-scored with nothing attached). COCO runs need the COCO files again (their paths are not
recorded with a run). Writes premise.json, premise.md and one figure per caption section (premise.png for a
one-section run) to --output_dir (default: the run folder).
"""

import sys

from dleaf import cli


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)
    ap.add_argument("--run_dir", required=True, help="a finished greedy caption or yes/no run of scripts/evaluate.py")
    ap.add_argument("--output_dir", default=None, help="where the outputs go (default: --run_dir)")
    ap.add_argument("--model", default=None, help="must be the run's own model if given (default: the run's)")
    ap.add_argument("--protocol", default=None, help="the run's protocol file, when it is not a shipped one")
    ap.add_argument("--coco_images", default=None, help="coco_chair runs: folder of the val2014 images")
    ap.add_argument("--coco_instances", default=None, help="coco_chair runs: instances_val2014.json")
    ap.add_argument("--coco_captions", default=None, help="coco_chair runs: captions_val2014.json")
    ap.add_argument("--n_bootstrap", type=int, default=2000, help="bootstrap resamples per AUROC")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    ap.add_argument("--batch_size", "--score_batch_size", type=int, default=16, help="replies per scoring pass")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads torch may use")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    from dleaf import premise_check
    from dleaf.io import InputError

    if args.n_bootstrap < 1 or args.batch_size < 1:
        raise InputError("--n_bootstrap and --batch_size must be positive")
    cli.check_output_dir(args.output_dir or args.run_dir, "--output_dir" if args.output_dir else "--run_dir")
    cli.set_threads(args.threads)
    options = {k: getattr(args, k) for k in ("coco_images", "coco_instances", "coco_captions") if getattr(args, k)}
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  progress lines: stderr
    result = premise_check.run_premise_check(args.run_dir, args.output_dir, args.model, options, args.protocol,
                                             args.n_bootstrap, args.batch_size, seed=args.seed, say=say,
                                             progress=cli.progress_lines("[premise]   scored", "batches"))
    print((result["paths"][1]).read_text(), end="")
    cli.done(args.output_dir or args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main, resumable=False))
