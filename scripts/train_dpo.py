"""Train a DPO LoRA adapter against object hallucination (TRL's DPOTrainer + PEFT).

Every option comes from the command line or a YAML recipe (TRL's TrlParser over the script's arguments, DPOConfig and
ModelConfig); command-line flags override the recipe:

    python scripts/train_dpo.py --config scripts/recipes/dpo_organism.yaml
    python scripts/train_dpo.py --config scripts/recipes/dpo_organism.yaml --max_steps 20 --output_dir runs/dpo_try
    # two CPU processes (torchrun + gloo; hide any GPU so the recipe's use_cpu holds)
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 scripts/train_dpo.py \\
        --config scripts/recipes/dpo_organism.yaml
    accelerate launch --multi_gpu --num_processes 8 scripts/train_dpo.py --config scripts/recipes/dpo_llava15_rlaifv.yaml

--help lists the project's own flags and the most used TRL ones; --help_all every option of TRL's DPOConfig and
ModelConfig. Repeated name=value flags: --knob (D-LEAF's knobs of self-generated pairs), --column_map.

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


#: the flags the short --help lists, by group (None: every field of dpo_link.train.ScriptArguments); --help_all
#: lists every option of TRL's DPOConfig and ModelConfig too
SHORT_HELP = (
    ("model and output", ("model_name_or_path", "output_dir", "resume_from_checkpoint")),
    ("data (dpo_link.train.ScriptArguments)", None),
    ("training (the most used of TRL's DPOConfig)",
     ("max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_steps",
      "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "beta", "loss_type",
      "loss_weights", "max_length", "weight_decay", "save_steps", "save_total_limit", "logging_steps", "use_cpu",
      "bf16", "seed")),
    ("model and LoRA (the most used of TRL's ModelConfig)",
     ("dtype", "attn_implementation", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")),
)
#: repeated flags of name=value entries: the one syntax (--knob a=1 --knob b=2), and the field each one fills
ENTRY_FLAGS = {"--knob": "--dleaf_knobs", "--column_map": "--column_map"}
OLD_SPELLINGS = {"--dleaf_knobs": "--knob", "--dleaf-knobs": "--knob", "--column-map": "--column_map"}


def short_help(full) -> str:
    """The --help text: the recipe flag, the project's own flags and the most used TRL ones (SHORT_HELP)."""
    import dataclasses

    from dpo_link.train import ScriptArguments

    ap = cli.ArgumentParser(prog="scripts/train_dpo.py", description=__doc__, add_help=False,
                            usage="scripts/train_dpo.py --config RECIPE.yaml [--model MODEL] [--output_dir DIR] "
                                  "[--FLAG VALUE ...]")
    ap.add_argument("-h", "--help", action="store_true",
                    help="show the project's own flags and the most used TRL ones, and exit")
    ap.add_argument("--config", metavar="RECIPE.yaml",
                    help="a YAML recipe: any option as a key (scripts/recipes/dpo_organism.yaml for the organism, "
                         "dpo_llava15_rlaifv.yaml for LLaVA-1.5); flags on the command line override it")
    ap.add_argument("--help_all", action="store_true",
                    help="show every option (TRL's DPOConfig and ModelConfig whole, some 900 lines), and exit")
    script_fields = [f.name for f in dataclasses.fields(ScriptArguments)] + ["model_name_or_path"]
    actions = {}
    for a in full._actions:
        actions.setdefault(a.dest, a)
    for title, dests in SHORT_HELP:
        group = ap.add_argument_group(title)
        for dest in dests or script_fields[:-1]:
            a = actions.get(dest)
            if a is None:
                continue
            text = " ".join((a.help or "").split())
            if dest not in script_fields:  # TRL's help: its first sentence
                text = text.split(". ")[0].rstrip(".")
            text = text.replace("%", "%%")
            if dest == "dleaf_knobs":
                group.add_argument("--knob", metavar="NAME=VALUE", dest=dest,
                                   help="a D-LEAF knob of the self-generated pairs, repeated (--knob gamma=0.8)")
                continue
            if dest == "column_map":
                group.add_argument("--column_map", metavar="OLD=NEW", dest=dest,
                                   help="rename a column of the data on disk, repeated (RLAIF-V: --column_map "
                                        "question=prompt --column_map image=images)")
                continue
            names = [o for o in a.option_strings if o == f"--{dest}" or "-" not in o[2:]]
            group.add_argument(*names, dest=dest, metavar="VALUE" if a.nargs != "+" else "VALUE ...",
                               help=text, default=a.default)
    return ap.format_help()


def normalize_argv(argv: list[str]) -> list[str]:
    """The command line as TrlParser takes it: the entries of every repeated --knob (the D-LEAF knobs of
    self-generated pairs) and --column_map gathered into one list flag each; the old spellings (--dleaf_knobs,
    entries joined by commas) accepted with a warning, once."""
    out: list[str] = []
    entries: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=") if argv[i].startswith("--") else (argv[i], "", "")
        new = OLD_SPELLINGS.get(flag, flag)
        if new not in ENTRY_FLAGS:
            out.append(argv[i])
            i += 1
            continue
        if flag in ("--dleaf_knobs", "--dleaf-knobs"):
            cli.warn_once("--dleaf_knobs is an old spelling of --knob; write --knob NAME=VALUE, once per knob "
                          "(--knob gamma=0.8 --knob threshold=best); the old one still works for now")
        values = [inline] if eq else []
        i += 1
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if not values:
            raise cli.InputError(f"{new} needs a value ({new} NAME=VALUE)")
        if new == "--column_map":
            values = cli.split_entries(values, "--column_map")
        entries.setdefault(new, []).extend(values)
    for new, values in entries.items():
        out += [ENTRY_FLAGS[new], *values]
    return out


def parse(argv):
    """(ScriptArguments, DPOConfig, ModelArguments) from the command line and the --config recipe; --help and
    --help_all print and exit; every parser error is one ``error:`` line (exit status 2)."""
    from dpo_link.train import parser

    p = parser()
    p.error = lambda message: cli.fail(f"{message} (see scripts/train_dpo.py --help)")
    if any(a in ("--help_all", "--help-all") for a in argv):
        p.prog, p.usage = "scripts/train_dpo.py", "scripts/train_dpo.py --config RECIPE.yaml [--FLAG VALUE ...]"
        p.description = ("Every option of scripts/train_dpo.py: the script's own (dpo_link.train.ScriptArguments), "
                         "TRL's DPOConfig and ModelConfig. --config RECIPE.yaml reads a YAML recipe whose keys are "
                         "these options; flags on the command line override it. --help lists the most used ones.")
        p.print_help()
        raise SystemExit(0)
    if any(a in ("-h", "--help") for a in argv):
        print(short_help(p), end="")
        raise SystemExit(0)
    argv = normalize_argv(argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise cli.InputError("--config needs a recipe file (scripts/recipes/dpo_organism.yaml, for example)")
        keys = {a.dest for a in p._actions}
        cli.read_recipe(argv[i + 1], keys, example="scripts/recipes/dpo_organism.yaml is one")
    try:
        *parsed, remaining = p.parse_args_and_config(args=argv, return_remaining_strings=True)
    except ValueError as e:  # a value TrlParser or a config's own checks refuse
        raise cli.InputError(str(e)) from None
    if remaining:
        p.error(cli.unknown_arguments(remaining, p._option_string_actions))
    return tuple(parsed)


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
