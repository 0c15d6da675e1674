"""Rebuild the organism (or, with --no_prior, the no-prior control) from a seed, on a CPU.

    python scripts/train_organism.py --seed 0 --threads 1                       # -> runs/organism
    python scripts/train_organism.py --seed 0 --threads 1 --no_prior --output_dir runs/organism_control
    python scripts/train_organism.py --threads 1 --resume_from runs/three_stage --output_dir runs/four_stage
    python scripts/train_organism.py --preset llava_like --threads 1 --checkpoint_every 250
    python scripts/train_organism.py --preset llava_like --threads 1 --checkpoint_every 250 \\
        --resume_from runs/organism_llava_like.partial                          # go on after an interruption

Every field of dleaf.organism.train.TrainConfig is a flag (its defaults are the committed organism's recipe).
--preset NAME replaces those defaults by a named recipe (dleaf.organism.train.PRESETS); flags given explicitly
still win. With --checkpoint_every N a run saves <output_dir>.partial every N steps; --resume_from that folder goes
on from there, with the weights of an uninterrupted run. To replace the committed checkpoints, pass --output_dir
data/organism (or data/organism_control) explicitly.
"""

import sys

from dleaf import cli


def parse_config(argv=None):
    """``(TrainConfig, preset name or None)`` from the command line; a bad value ends the script (exit 2)."""
    from dleaf.organism.train import PRESETS, TrainConfig

    parser = cli.dataclass_parser(TrainConfig, description=__doc__)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="a named recipe whose settings replace the defaults (explicit flags still win)")
    preset = parser.parse_known_args(args=argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    try:
        config, _ = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # TrainConfig's own checks, before any model is built
        cli.fail(str(e))
    return config, preset


def main(argv=None) -> int:
    from dleaf.organism.train import PRESETS

    config, preset = parse_config(argv)
    cli.check_output_dir(config.output_dir)
    if config.resume_from:
        from pathlib import Path

        if not (Path(config.resume_from) / "training_log.json").is_file():
            cli.fail(f"--resume_from {config.resume_from}: no training_log.json there; pass a folder written by "
                     "this script")
    from dleaf.organism.train import train

    if preset:
        print(f"preset {preset}: " + ", ".join(f"{k}={getattr(config, k)}" for k in PRESETS[preset]), flush=True)
    log = train(config)
    for stage, info in log["stages"].items():
        print(f"{stage}: {info['steps']} steps, {info['seconds']:.0f}s, loss {info['loss_first']:.3f} -> "
              f"{info['loss_last']:.3f}")
    cli.done(config.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main, sys.argv[1:], resumable=False))
