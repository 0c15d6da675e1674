"""Fault injection: damage the image attention of a model that reads the image at known layers, heads and generated
positions, then measure the damage, whether each method finds the faulted layers, and whether it repairs them
(the package dleaf.faults; docs/faults.md has the results and their commands).

    python scripts/fault_benchmark.py                                               # the whole grid, both splits
    python scripts/fault_benchmark.py --limit 40 --output_dir runs/faults_small     # 40 images per split
    python scripts/fault_benchmark.py --grid_file faults.yaml --methods greedy dleaf pai --splits adversarial
    python scripts/fault_benchmark.py --knob gamma=0.5                              # a knob for every method with it
    python scripts/fault_benchmark.py --list                                        # the grid and the methods

Each (split, fault, method) is a run folder of the evaluation harness under <output_dir>/<split>/<fault>/<method>/;
running the same command again resumes (a folder made by other weights of the same model name is refused). The
report is <output_dir>/faults.md, report.json and the figures flags_<kind>_<split>.png and repair_strength.png. A
grid file is a YAML list of faults, each a mapping of the fields of dleaf.faults.FaultConfig (kind, layers, heads,
strength, positions, start, fraction, seed). A --knob goes to every chosen method whose configuration has that knob
and does not fix it itself.
"""

import sys

from dleaf import cli


def build_parser():
    from dleaf.faults import grid

    ap = cli.ArgumentParser(description=__doc__)
    cli.add_common_arguments(ap, output_dir="runs/faults", seed=0, progress=True)
    ap.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                    help="a method knob, repeated; it goes to every chosen method that has it (python -m dleaf "
                         "methods lists them)")
    ap.add_argument("--splits", nargs="+", default=["adversarial", "indist"], help="splits of the benchmark")
    ap.add_argument("--limit", type=int, default=None, help="images per split (default: the protocol's)")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="override the protocol's token limit")
    ap.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    ap.add_argument("--methods", nargs="+", default=list(grid.DEFAULT_METHODS),
                    help=f"methods to run, of {', '.join(grid.METHODS)} (greedy is required)")
    ap.add_argument("--grid_file", default=None, help="YAML list of faults (default: the built-in grid, --list)")
    ap.add_argument("--faults", nargs="+", default=None, metavar="N",
                    help="run only these faults of the grid, by number (as --list numbers them)")
    ap.add_argument("--benchmark", default="organism_caption", help="a registered caption benchmark")
    ap.add_argument("--n_resamples", type=int, default=2000,
                    help="bootstrap resamples of every interval (--seed seeds them)")
    ap.add_argument("--list", action="store_true", help="print the fault grid and the methods, and stop")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from dleaf import models
    from dleaf.eval import get_benchmark
    from dleaf.faults import grid, report, run
    from dleaf.io import InputError

    faults = grid.read_grid(args.grid_file) if args.grid_file else grid.default_grid()
    picked = grid.pick_faults(faults, args.faults)
    if args.list:
        for k, f in picked:
            print(f"{k:3d}  {f.label()}")
        for name, m in grid.METHODS.items():
            print(f"method {name}: {m.description}")
        return 0
    if args.n_resamples < 100:
        raise InputError(f"--n_resamples must be at least 100, got {args.n_resamples}")
    if get_benchmark(args.benchmark).kind != "caption":
        raise InputError(f"--benchmark {args.benchmark} is not a caption benchmark")
    path = models.check_model(args.model)
    cfg = grid.FaultBenchConfig(faults=[f for _, f in picked], methods=args.methods, splits=args.splits,
                                benchmark=args.benchmark,
                                limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                model=args.model, n_resamples=args.n_resamples, knobs=cli.parse_knobs(args.knob),
                                model_weights=grid.model_digest(path), seed=args.seed)
    for split in cfg.splits:  # every input checked before the model loads
        cfg.load_benchmark(split)
    out = cli.check_output_dir(args.output_dir)
    cli.set_threads(args.threads)
    model, processor = models.load(args.model)
    result = run.run_benchmark(model, processor, out, cfg, say=lambda m: print(m, file=sys.stderr, flush=True),
                               progress=args.progress)
    print(report.report_markdown(result))
    cli.done(Path(out) / grid.MARKDOWN, Path(out) / grid.REPORT)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main))
