"""The whole study on the organism: greedy, PAI, SPIN, D-LEAF, the DPO adapter and D-LEAF on top of it through the
evaluation harness, the decoding overhead, the correspondence suite, and a report (markdown, JSON, figures) that
sets the measured numbers beside the paper's claims.

    python scripts/study.py                       # runs/study, 300 images per benchmark
    python scripts/study.py --out runs/study --n_images 1000 --no_correspondence

An interrupted study resumes where it stopped (run the same command again).
"""

import argparse
import sys

from dleaf.organism.reproduce import StudyConfig, run_study


def correspondence_suite(n_pairs: int):
    """The correspondence step, when dpo_link's report is available (None otherwise)."""
    try:
        from dpo_link.report import study_step
    except ImportError:
        return None
    return lambda out: study_step(out, n_pairs=n_pairs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--n_images", type=int, default=StudyConfig.n_images)
    ap.add_argument("--pairs", type=int, default=StudyConfig.correspondence_pairs,
                    help="preference pairs for the correspondence suite")
    ap.add_argument("--no_correspondence", action="store_true")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        cfg = StudyConfig(n_images=args.n_images, correspondence=not args.no_correspondence,
                          correspondence_pairs=args.pairs)
    except ValueError as err:
        ap.error(str(err))
    run_study(args.out, cfg, progress=not args.no_progress,
              correspondence=correspondence_suite(cfg.correspondence_pairs))
    print((__import__("pathlib").Path(args.out) / "report.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
