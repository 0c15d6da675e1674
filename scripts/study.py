"""The whole study: greedy, PAI, SPIN, D-LEAF, the DPO adapter and D-LEAF on top of it through the evaluation
harness, the decoding overhead, the correspondence suite, and a report (markdown, JSON, figures) that sets the
measured numbers beside the paper's claims.

On the organism (no downloads; 300 adversarial images per benchmark by default):

    python scripts/study.py                       # runs/study
    python scripts/study.py --out runs/study --n_images 1000 --no_correspondence

On a real checkpoint, on GPUs (CHAIR on COCO val2014, the POPE question files, a DPO adapter trained with
scripts/train_dpo.py, held-out preference pairs for the correspondence suite):

    accelerate launch --multi_gpu --num_processes 8 scripts/study.py --model llava-hf/llava-1.5-7b-hf \\
        --dtype bfloat16 --coco_images coco/val2014 --coco_instances coco/annotations/instances_val2014.json \\
        --coco_captions coco/annotations/captions_val2014.json --pope_images coco/val2014 \\
        --pope_files pope/coco_pope_random.json pope/coco_pope_popular.json pope/coco_pope_adversarial.json \\
        --adapter runs/llava15_dpo --preference_data rlaif_v_heldout.parquet --column_map question:prompt,image:images \\
        --out runs/study_llava15

An interrupted study resumes where it stopped (run the same command again).
"""

import argparse
import sys
from pathlib import Path

from dleaf.evaluate import EvaluationInputError
from dleaf.study import StudyConfig, run_study


def correspondence_suite():
    """The correspondence step, when dpo_link's report is available (None otherwise)."""
    try:
        from dpo_link.suite import study_step
    except ImportError:
        return None

    def step(out, cfg: StudyConfig):
        column_map = dict(kv.split(":", 1) for kv in cfg.column_map.split(",")) if cfg.column_map else None
        return study_step(out, n_pairs=cfg.correspondence_pairs, model=cfg.model,
                          adapter=None if cfg.organism else cfg.adapter_path, dataset=cfg.preference_data,
                          dataset_split=cfg.preference_split, column_map=column_map, dtype=cfg.dtype)

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--n_images", type=int, default=None,
                    help="images per benchmark (organism: default 300; a real checkpoint: the first N COCO images "
                         "and the first N questions of each POPE file, default all)")
    ap.add_argument("--pairs", type=int, default=StudyConfig.correspondence_pairs,
                    help="preference pairs for the correspondence suite")
    ap.add_argument("--no_correspondence", action="store_true")
    ap.add_argument("--no_progress", action="store_true")
    real = ap.add_argument_group("a real checkpoint (instead of the organism)")
    real.add_argument("--model", default="organism", help="hub id or checkpoint folder (default: the organism)")
    real.add_argument("--adapter", default=None, help="DPO LoRA adapter folder trained on --model (train_dpo.py)")
    real.add_argument("--coco_images", default=None, help="folder of the COCO val2014 images")
    real.add_argument("--coco_instances", default=None, help="instances_val2014.json")
    real.add_argument("--coco_captions", default=None, help="captions_val2014.json")
    real.add_argument("--pope_files", nargs="*", default=[], help="POPE question files (one section each)")
    real.add_argument("--pope_images", default=None, help="folder of the POPE questions' images")
    real.add_argument("--preference_data", default=None,
                      help="held-out preference pairs for the correspondence suite (save_to_disk folder, parquet or "
                           "JSON lines)")
    real.add_argument("--preference_split", default="test")
    real.add_argument("--column_map", default=None, help="rename preference columns, 'old:new,old:new'")
    real.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    real.add_argument("--attn_implementation", default=None,
                      help="attention implementation to load with (default: eager for the organism, the model's own "
                           "otherwise; D-LEAF switches the layers it watches itself)")
    real.add_argument("--batch_size", type=int, default=None, help="prompts per generate call (organism 100, else 8)")
    args = ap.parse_args(argv)
    try:
        cfg = StudyConfig(n_images=args.n_images, correspondence=not args.no_correspondence,
                          correspondence_pairs=args.pairs, model=args.model, adapter=args.adapter,
                          coco_images=args.coco_images, coco_instances=args.coco_instances,
                          coco_captions=args.coco_captions, pope_files=tuple(args.pope_files),
                          pope_images=args.pope_images, preference_data=args.preference_data,
                          preference_split=args.preference_split, column_map=args.column_map, dtype=args.dtype,
                          attn_implementation=args.attn_implementation, batch_size=args.batch_size)
    except ValueError as err:
        ap.error(str(err))
    try:
        report = run_study(args.out, cfg, progress=not args.no_progress, correspondence=correspondence_suite())
    except EvaluationInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report is not None:  # process 0
        print((Path(args.out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
