"""The whole study: greedy, PAI, SPIN, D-LEAF, the DPO adapter and D-LEAF on top of it through the evaluation
harness, the decoding overhead, the correspondence suite, and a report (markdown, JSON, figures) that sets the
measured numbers beside the paper's claims.

On the organism (no downloads; 300 adversarial images per benchmark by default):

    python scripts/study.py                       # runs/study
    python scripts/study.py --output_dir runs/study_1000 --limit 1000 --no_correspondence

On a real checkpoint, on GPUs (CHAIR on COCO val2014, the POPE question files, a DPO adapter trained with
scripts/train_dpo.py, held-out preference pairs for the correspondence suite):

    accelerate launch --multi_gpu --num_processes 8 scripts/study.py --model llava-hf/llava-1.5-7b-hf \\
        --dtype bfloat16 --coco_images coco/val2014 --coco_instances coco/annotations/instances_val2014.json \\
        --coco_captions coco/annotations/captions_val2014.json --pope_images coco/val2014 \\
        --pope_files pope/coco_pope_random.json pope/coco_pope_popular.json pope/coco_pope_adversarial.json \\
        --adapter runs/llava15_dpo --preference_data rlaif_v_heldout.parquet \\
        --column_map question=prompt --column_map image=images --output_dir runs/study_llava15

An interrupted study resumes where it stopped (run the same command again).
"""

import sys
from pathlib import Path

from dleaf import cli


def correspondence_suite():
    """The correspondence step, when dpo_link's report is available (None otherwise)."""
    try:
        from dpo_link.suite import study_step
    except ImportError:
        return None

    def step(out, cfg, say=None):
        return study_step(out, n_pairs=cfg.correspondence_pairs, model=cfg.model,
                          adapter=cfg.adapter_path,
                          dataset=cfg.preference_data or ("organism" if cfg.organism else None),
                          dataset_split=cfg.preference_split, column_map=cfg.column_map, dtype=cfg.dtype,
                          seed=cfg.seed, progress=say)

    return step


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)
    ap.add_argument("--output_dir", default="runs/study", help="the study's folder")
    ap.add_argument("--limit", type=int, default=None,
                    help="images per benchmark (organism: 300 when not given; a real checkpoint: the first N COCO "
                         "images and the first N questions of each POPE file, all when not given)")
    ap.add_argument("--n_pairs", type=int, default=100, help="preference pairs for the correspondence suite")
    ap.add_argument("--no_correspondence", action="store_true", help="skip the correspondence suite")
    ap.add_argument("--no_progress", dest="progress", action="store_false", help="hide the progress bars")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads torch may use")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals and the correspondence "
                                                        "suite's null draws")
    real = ap.add_argument_group("a real checkpoint (instead of the organism)")
    real.add_argument("--model", default="organism", help="hub id or checkpoint folder (default: the organism; another model of "
                                                       "the organism's world, such as organism_control or a "
                                                       "train_organism.py folder, is studied on its benchmarks)")
    real.add_argument("--adapter", default=None, help="DPO LoRA adapter folder trained on --model (train_dpo.py)")
    real.add_argument("--coco_images", default=None, help="folder of the COCO val2014 images")
    real.add_argument("--coco_instances", default=None, help="instances_val2014.json")
    real.add_argument("--coco_captions", default=None, help="captions_val2014.json")
    real.add_argument("--pope_files", nargs="*", default=[], help="POPE question files (one section each)")
    real.add_argument("--pope_images", default=None, help="folder of the POPE questions' images")
    real.add_argument("--preference_data", default=None,
                      help="held-out preference pairs for the correspondence suite (save_to_disk folder, parquet or "
                           "JSON lines)")
    real.add_argument("--preference_split", default="test", help="split of --preference_data")
    real.add_argument("--column_map", action="extend", nargs="+", default=[], metavar="OLD=NEW",
                      help="rename a column of --preference_data, repeated (--column_map question=prompt "
                           "--column_map image=images)")
    real.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    real.add_argument("--attn_implementation", default=None,
                      help="attention implementation to load with (default: eager for the organism, the model's own "
                           "otherwise; D-LEAF switches the layers it watches itself)")
    real.add_argument("--detector", default=None,
                      help="a token-level hallucination detector file fitted on --model (python -m dleaf.detect), for "
                           "the dleaf_learned setting (default for the organism: the shipped one; a real checkpoint "
                           "without one skips that setting)")
    real.add_argument("--batch_size", type=int, default=None,
                      help="prompts per generate call (default: 100 for the organism, else 8)")
    for old, new in (("--out", "--output_dir"), ("--n_images", "--limit"), ("--pairs", "--n_pairs")):
        cli.add_old_spelling(ap, old, new)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    from dleaf.io import InputError
    from dleaf.study import StudyConfig, run_study

    for flag, value in (("--limit", args.limit), ("--n_pairs", args.n_pairs), ("--batch_size", args.batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    column_map = cli.split_entries(args.column_map, "--column_map") or None
    try:
        cfg = StudyConfig(n_images=args.limit, correspondence=not args.no_correspondence,
                          correspondence_pairs=args.n_pairs, model=args.model, adapter=args.adapter,
                          coco_images=args.coco_images, coco_instances=args.coco_instances,
                          coco_captions=args.coco_captions, pope_files=tuple(args.pope_files),
                          pope_images=args.pope_images, preference_data=args.preference_data,
                          preference_split=args.preference_split, column_map=column_map, dtype=args.dtype,
                          attn_implementation=args.attn_implementation, batch_size=args.batch_size, detector=args.detector,
                          seed=args.seed)
    except ValueError as err:
        raise InputError(str(err)) from None
    cli.check_output_dir(args.output_dir)
    from dleaf import models

    models.check_model(cfg.model)
    if cfg.adapter_path:
        try:  # an adapter trained on another checkpoint is refused before anything runs
            from dpo_link.suite import check_study_adapter
        except ImportError:
            check_study_adapter = None
        if check_study_adapter is not None:
            check_study_adapter(cfg.model, cfg.adapter_path)
    if cfg.preference_data and cfg.correspondence:  # the held-out pairs, their split and column map, up front
        from dpo_link.data import check_dataset_path, parse_column_map

        try:
            check_dataset_path(cfg.preference_data, cfg.preference_split, "--preference_split")
            parse_column_map(column_map)
        except (OSError, ValueError) as e:
            raise e if isinstance(e, InputError) else InputError(f"--preference_data: {e}") from None
    cli.set_threads(args.threads)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  progress lines: stderr
    report = run_study(args.output_dir, cfg, progress=args.progress, say=say, correspondence=correspondence_suite())
    if report is not None:  # process 0
        print((Path(args.output_dir) / "report.md").read_text())
        cli.done(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main))
