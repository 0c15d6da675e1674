"""Train a DPO LoRA adapter against object hallucination (TRL's DPOTrainer + PEFT).

Every option comes from the command line or a YAML recipe (TRL's TrlParser over ScriptArguments, DPOConfig and
ModelConfig); command-line flags override the recipe:

    python scripts/train_dpo.py --config scripts/recipes/dpo_organism.yaml
    python scripts/train_dpo.py --config scripts/recipes/dpo_organism.yaml --max_steps 20 --output_dir runs/dpo_try
    python scripts/train_dpo.py --config scripts/recipes/dpo_organism.yaml --resume_from_checkpoint last
    # two CPU processes (torchrun + gloo; hide any GPU so the recipe's use_cpu holds)
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 scripts/train_dpo.py \
        --config scripts/recipes/dpo_organism.yaml
    accelerate launch --multi_gpu --num_processes 8 scripts/train_dpo.py --config scripts/recipes/dpo_llava15_rlaifv.yaml

`accelerate launch --cpu --num_processes N` starts N processes only through mpirun (with --mpirun_hostfile); without
MPI it starts one, which this script detects and says so.

See dpo_link/train.py for what is logged and saved.
"""

import logging
import os
import sys

from trl import DPOConfig, ModelConfig, TrlParser

from dpo_link.train import ScriptArguments, run
from dpo_link.validate import PreferenceDataError


def single_process_from_a_multi_process_cpu_launch() -> bool:
    """True when `accelerate launch --cpu --num_processes N>1` ran this as its only process: accelerate sets
    MASTER_ADDR for N > 1 but, without mpirun, starts one process with no RANK or WORLD_SIZE."""
    env = os.environ
    return (env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
            and not any(k in env for k in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if single_process_from_a_multi_process_cpu_launch():
        logging.getLogger("train_dpo").warning(
            "accelerate launch --cpu started a single process: accelerate fans CPU processes out only through mpirun "
            "(--mpirun_hostfile). For N CPU processes without MPI run: CUDA_VISIBLE_DEVICES= accelerate launch "
            "--multi_gpu --num_processes N scripts/train_dpo.py ... (torchrun with the gloo backend)")
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    try:
        record = run(script_args, training_args, model_args)
    except PreferenceDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    for when in ("eval_before", "eval_after"):
        if when in record:
            print(when, " ".join(f"{k}={v:.4f}" for k, v in record[when].items() if v is not None))
    print(f"saved the adapter and its model card to {training_args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
