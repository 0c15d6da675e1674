"""Rebuild the organism (or, with --no_prior, the no-prior control) from a seed, on a CPU.

    python scripts/train_organism.py --seed 0                          # -> data/organism
    python scripts/train_organism.py --seed 0 --no_prior --output_dir data/organism_control
"""

import sys

from transformers import HfArgumentParser

from dleaf.organism.train import TrainConfig, train


def main(argv=None):
    (config,) = HfArgumentParser(TrainConfig).parse_args_into_dataclasses(args=argv)
    log = train(config)
    for stage, info in log["stages"].items():
        print(f"{stage}: {info['steps']} steps, {info['seconds']:.0f}s, loss {info['loss_first']:.3f} -> "
              f"{info['loss_last']:.3f}")
    print(f"saved to {config.output_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
