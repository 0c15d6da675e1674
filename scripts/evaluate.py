"""Evaluate a model and decoding method on a benchmark under a versioned protocol (the evaluation harness,
dleaf/eval/).

    python scripts/evaluate.py --benchmark organism_caption --output_dir runs/greedy
    python scripts/evaluate.py --benchmark organism_caption --method dleaf --knob gamma=0.3 --output_dir runs/dleaf
    python scripts/evaluate.py --benchmark organism_pope --splits adversarial --output_dir runs/pope
    python scripts/evaluate.py --benchmark coco_chair --model llava-hf/llava-1.5-7b-hf --coco_images val2014/ \\
        --coco_instances annotations/instances_val2014.json --coco_captions annotations/captions_val2014.json \\
        --output_dir runs/llava_chair
    python scripts/evaluate.py --benchmark pope_file --pope_files coco_pope_random.json --pope_images val2014/ ...
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py \\
        --benchmark organism_caption --output_dir runs/x
    python scripts/evaluate.py --compare runs/greedy runs/dleaf --paired --table_out runs/table.md
    python scripts/evaluate.py recipe.yaml          # the same flags as YAML keys

Running the same command again resumes an interrupted run. Methods and their knobs: python -m dleaf methods.
"""

import sys
from pathlib import Path

from dleaf import cli


def build_parser():
    from dleaf.eval import EvalArguments

    return cli.dataclass_parser(EvalArguments, description=__doc__)


def parse(argv):
    parser = build_parser()
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        if not Path(argv[0]).is_file():
            raise cli.InputError(f"recipe file not found: {argv[0]}")
        (args,) = parser.parse_yaml_file(argv[0])
    else:
        (args,) = parser.parse_args_into_dataclasses(argv)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    from dleaf import eval as harness
    from dleaf.eval.coco import write_coco_ids
    from dleaf.io import write_text_atomic

    args = parse(argv)
    if args.compare:
        if args.table_out:
            cli.check_output_file(args.table_out, "--table_out")
        table = harness.comparison_table(args.compare, paired=args.paired)
        print(table, end="")
        if args.table_out:
            write_text_atomic(table, args.table_out)
            cli.done(args.table_out)
        return 0
    if args.write_coco_ids:
        if not args.coco_instances:
            raise cli.InputError("--write_coco_ids needs --coco_instances")
        cli.check_output_file(args.write_coco_ids, "--write_coco_ids")
        ids = write_coco_ids(args.coco_instances, args.write_coco_ids, args.protocol or "coco_chair")
        print(f"wrote {len(ids)} image ids")
        cli.done(args.write_coco_ids)
        return 0
    cli.set_threads(args.threads)
    result = harness.run_evaluation(args)
    if result is not None:
        print(harness.comparison_table([args.output_dir]), end="")
        cli.done(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main))
