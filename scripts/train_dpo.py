"""Train a DPO LoRA adapter against object hallucination (TRL's DPOTrainer + PEFT).

Every option comes from the command line or a YAML recipe (TRL's TrlParser over the script's arguments, DPOConfig and
ModelConfig); command-line flags override the recipe:

    python scripts/train_dpo.py --config scripts/recipes/dpo_organism.yaml
    python scripts/train_dpo.py --config scripts/recipes/dpo_organism.yaml --max_steps 20 --output_dir runs/dpo_try
    # two CPU processes (torchrun + gloo; hide any GPU so the recipe's use_cpu holds)
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 scripts/train_dpo.py \\
        --config scripts/recipes/dpo_organism.yaml
    accelerate launch --multi_gpu --num_processes 8 scripts/train_dpo.py --config scripts/recipes/dpo_llava15_rlaifv.yaml

The adapter, its model card (README.md) and dpo_run.json go to --output_dir (the organism recipe: runs/organism_dpo).
An interrupted run resumes from its last checkpoint when the same command is run again; an output folder that holds
anything else (another recipe's run, a finished run, a committed adapter) is refused before any model loads.
`accelerate launch --cpu --num_processes N` starts N processes only through mpirun (with --mpirun_hostfile); without
MPI it starts one, which this script detects and says so. See docs/dpo.md for what is logged and saved.
"""

import logging
import os
import sys
from pathlib import Path

from dleaf import cli


def single_process_from_a_multi_process_cpu_launch() -> bool:
    """True when `accelerate launch --cpu --num_processes N>1` ran this as its only process: accelerate sets
    MASTER_ADDR for N > 1 but, without mpirun, starts one process with no RANK or WORLD_SIZE."""
    env = os.environ
    return (env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
            and not any(k in env for k in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")))


def parse(argv):
    from dpo_link.train import parser

    p = parser()
    p.error = lambda message: cli.fail(f"{message} (see scripts/train_dpo.py --help)")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or not Path(argv[i + 1]).is_file():
            raise cli.InputError(f"recipe file not found: {argv[i + 1] if i + 1 < len(argv) else '(none given)'}")
    try:
        return p.parse_args_and_config(args=argv)
    except ValueError as e:  # a recipe key that no argument class knows, or a value TrlParser refuses
        raise cli.InputError(str(e)) from None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if single_process_from_a_multi_process_cpu_launch():
        logging.getLogger("train_dpo").warning(
            "accelerate launch --cpu started a single process: accelerate fans CPU processes out only through mpirun "
            "(--mpirun_hostfile). For N CPU processes without MPI run: CUDA_VISIBLE_DEVICES= accelerate launch "
            "--multi_gpu --num_processes N scripts/train_dpo.py ... (torchrun with the gloo backend)")
    script_args, training_args, model_args = parse(argv)
    cli.check_output_dir(training_args.output_dir)
    from dpo_link.train import run

    rank0 = int(os.environ.get("RANK", "0")) == 0
    record = run(script_args, training_args, model_args,
                 progress=lambda msg: print(msg, file=sys.stderr, flush=True) if rank0 else None)
    if not rank0:
        return 0
    for when in ("eval_before", "eval_after"):
        if when in record:
            print(when, " ".join(f"{k}={v:.4f}" for k, v in record[when].items() if v is not None))
    print("saved the adapter, its model card (README.md) and dpo_run.json")
    cli.done(training_args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main))
