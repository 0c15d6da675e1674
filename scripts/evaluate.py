"""Evaluate a model and decoding method on a benchmark under a versioned protocol (see dleaf/evaluate.py).

    python scripts/evaluate.py --benchmark organism_caption --output_dir runs/greedy
    python scripts/evaluate.py --benchmark organism_caption --method dleaf --knobs gamma=0.3 --output_dir runs/dleaf
    python scripts/evaluate.py --benchmark organism_pope --splits adversarial --output_dir runs/pope
    python scripts/evaluate.py --benchmark coco_chair --model llava-hf/llava-1.5-7b-hf --coco_images val2014/ \
        --coco_instances annotations/instances_val2014.json --coco_captions annotations/captions_val2014.json \
        --output_dir runs/llava_chair
    python scripts/evaluate.py --benchmark pope_file --pope_files coco_pope_random.json --pope_images val2014/ ...
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py --benchmark organism_caption --output_dir runs/x
    python scripts/evaluate.py --compare runs/greedy runs/dleaf --table_out runs/table.md
    python scripts/evaluate.py recipe.yaml          # the same flags as YAML keys

Running the same command again resumes an interrupted run.
"""

import sys
from pathlib import Path

from transformers import HfArgumentParser

from dleaf.evaluate import EvalArguments, EvaluationInputError, comparison_table, run_evaluation, write_coco_ids


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(EvalArguments, description=__doc__)
    try:
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            (args,) = parser.parse_yaml_file(argv[0])
        else:
            (args,) = parser.parse_args_into_dataclasses(argv)
        if args.compare:
            table = comparison_table(args.compare)
            if args.table_out:
                Path(args.table_out).write_text(table, encoding="utf-8")
            print(table, end="")
            return 0
        if args.write_coco_ids:
            ids = write_coco_ids(args, args.write_coco_ids)
            print(f"wrote {len(ids)} image ids to {args.write_coco_ids}")
            return 0
        result = run_evaluation(args)
    except EvaluationInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(comparison_table([args.output_dir]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
