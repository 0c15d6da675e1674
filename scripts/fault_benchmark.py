"""Fault injection: damage the image attention of a model that reads the image at known layers, heads and generated
positions, then measure the damage, whether each method finds the faulted layers, and whether it repairs them
(dleaf/fault_benchmark.py; the faults are defined in dleaf/faults.py; docs/faults.md has the results).

    python scripts/fault_benchmark.py --output_dir runs/faults                      # the whole grid, both splits
    python scripts/fault_benchmark.py --limit 40 --output_dir runs/faults_small     # 40 images per split
    python scripts/fault_benchmark.py --grid_file faults.yaml --methods greedy dleaf pai --splits adversarial
    python scripts/fault_benchmark.py --list                                        # the grid and the methods

Each (split, fault, method) is a run folder of the evaluation harness under <output_dir>/<split>/<fault>/<method>/;
running the same command again resumes. The report is <output_dir>/faults.md, report.json and the figures
flags_<kind>_<split>.png and repair_strength.png. A grid file is a YAML list of faults, each a mapping of the fields
of dleaf.faults.FaultConfig (kind, layers, heads, strength, positions, start, fraction, seed).
"""

import sys

from dleaf import cli


def build_parser():
    from dleaf import fault_benchmark as fb

    ap = cli.ArgumentParser(description=__doc__)
    cli.add_common_arguments(ap, output_dir="runs/faults", progress=True)
    ap.add_argument("--splits", nargs="+", default=["adversarial", "indist"], help="splits of the benchmark")
    ap.add_argument("--limit", type=int, default=None, help="images per split (default: the protocol's)")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="override the protocol's token limit")
    ap.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    ap.add_argument("--methods", nargs="+", default=list(fb.DEFAULT_METHODS),
                    help=f"methods to run, of {', '.join(fb.METHODS)} (greedy is required)")
    ap.add_argument("--grid_file", default=None, help="YAML list of faults (default: the built-in grid, --list)")
    ap.add_argument("--faults", nargs="+", default=None, metavar="N",
                    help="run only these faults of the grid, by number (as --list numbers them)")
    ap.add_argument("--benchmark", default="organism_caption", help="a registered caption benchmark")
    ap.add_argument("--n_resamples", type=int, default=2000, help="bootstrap resamples of every interval")
    ap.add_argument("--list", action="store_true", help="print the fault grid and the methods, and stop")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from dleaf import fault_benchmark as fb
    from dleaf import models
    from dleaf.eval import get_benchmark
    from dleaf.io import InputError

    grid = fb.read_grid(args.grid_file) if args.grid_file else fb.default_grid()
    if args.faults:
        try:
            picked = [int(k) for k in args.faults]
        except ValueError:
            raise InputError(f"--faults takes fault numbers (see --list), got {args.faults}") from None
        bad = [k for k in picked if not 1 <= k <= len(grid)]
        if bad:
            raise InputError(f"--faults {bad}: the grid has faults 1 to {len(grid)}")
        grid = [grid[k - 1] for k in picked]
    if args.list:
        for k, f in enumerate(grid, start=1):
            print(f"{k:3d}  {f.label()}")
        for name, m in fb.METHODS.items():
            print(f"method {name}: {m.description}")
        return 0
    if args.n_resamples < 100:
        raise InputError(f"--n_resamples must be at least 100, got {args.n_resamples}")
    if get_benchmark(args.benchmark).kind != "caption":
        raise InputError(f"--benchmark {args.benchmark} is not a caption benchmark")
    cfg = fb.FaultBenchConfig(faults=grid, methods=args.methods, splits=args.splits, benchmark=args.benchmark,
                              limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              model=args.model, n_resamples=args.n_resamples)
    for split in cfg.splits:  # every input checked before the model loads
        cfg.load_benchmark(split)
    out = cli.check_output_dir(args.output_dir)
    models.check_model(args.model)
    cli.set_threads(args.threads)
    model, processor = models.load(args.model)
    report = fb.run_benchmark(model, processor, out, cfg, say=lambda m: print(m, file=sys.stderr, flush=True),
                              progress=args.progress)
    print(fb.report_markdown(report))
    cli.done(Path(out) / fb.MARKDOWN, Path(out) / fb.REPORT)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main))
