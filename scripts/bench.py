"""Performance benchmark: decoding throughput and peak memory of plain greedy decoding (sdpa and eager), D-LEAF, PAI,
SPIN and a VCD-style two-pass contrastive baseline, and teacher-forced scoring in one pass against step by step.

    python scripts/bench.py --output_dir runs/bench                     # the full benchmark (tens of minutes on CPU)
    python scripts/bench.py --models llava_shaped --batch_sizes 1 --repeats 3 --no_memory
    python scripts/bench.py --llava_shape text_layers=8 --llava_shape text_hidden=256 --output_dir runs/bench_small
    python scripts/bench.py --preset llava7b --device cuda --dtype bfloat16 --output_dir runs/gpu  # LLaVA-7B shape

With --output_dir, the results go to bench.json (written atomically) and the tables to bench.md there.

Models: ``organism`` (the committed checkpoint, or a random organism when none is present) and ``llava_shaped`` (a
random LLaVA-1.5-shaped model scaled to a CPU: 576 image tokens, a 16-layer, 16-head Llama decoder). All logic lives
in ``dleaf/bench/``; see ``docs/performance.md`` for the measured tables and the cost model.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dleaf import bench, cli  # noqa: E402


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _str_tuple(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def _shape_knobs(items: list[str], cls) -> dict:
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"bad shape knob {item!r}; expected NAME=INT with NAME one of {', '.join(sorted(fields))}")
        out[name] = int(value)
    return out


class _OldOut(argparse.Action):
    """``--out FILE``, the old spelling: still writes that JSON file, and says once to write --output_dir."""

    def __call__(self, parser, namespace, values, option_string=None):
        cli.warn_once("--out FILE is an old spelling; write --output_dir FOLDER (bench.json and bench.md go there); "
                      "--out still works for now")
        setattr(namespace, self.dest, values)


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)  # dash aliases, error: ... with exit status 2
    d = bench.BenchConfig()
    ap.add_argument("--models", type=_str_tuple, default=d.models, help="comma-separated: organism,llava_shaped")
    ap.add_argument("--configs", type=_str_tuple, default=d.configs, help=f"comma-separated from {','.join(bench.config_names())}")
    ap.add_argument("--batch_sizes", type=_int_tuple, default=d.batch_sizes)
    ap.add_argument("--new_tokens", type=int, default=d.new_tokens)
    ap.add_argument("--repeats", type=int, default=d.repeats)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--paired_steps", type=int, default=d.paired_steps,
                    help="steps of the paired per-step comparison with plain decoding (0: skip it)")
    ap.add_argument("--paired_warmup", type=int, default=d.paired_warmup)
    ap.add_argument("--no_memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--memory_only", action="store_true",
                    help="measure only peak memory (CPU) and merge it into the bench.json of --output_dir")
    ap.add_argument("--memory_models", type=_str_tuple, default=d.memory_models)
    ap.add_argument("--score_models", type=_str_tuple, default=d.score_models)
    ap.add_argument("--score_batch_sizes", type=_int_tuple, default=d.score_batch_sizes)
    ap.add_argument("--score_tokens", type=int, default=d.score_tokens)
    ap.add_argument("--score_repeats", type=int, default=d.score_repeats)
    ap.add_argument("--llava_shape", action="append", default=[], metavar="NAME=INT",
                    help="override a field of LlavaShape (repeatable)")
    ap.add_argument("--organism_shape", action="append", default=[], metavar="NAME=INT",
                    help="use a random organism with these OrganismShape fields instead of the checkpoint")
    ap.add_argument("--random_organism", action="store_true", help="a random organism even if a checkpoint exists")
    ap.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default=d.dtype, choices=bench.DTYPES, help="the model's weights and pixel values")
    ap.add_argument("--preset", default=None, choices=tuple(bench.PRESETS),
                    help="a named run (llava7b: the GPU measurement; tiny: its rehearsal on a CPU); the other flags "
                         "given override its fields")
    ap.add_argument("--no_checks", action="store_true",
                    help="skip the equivalence checks at the start (gamma 0 = plain; compiled step = eager step)")
    ap.add_argument("--check_steps", type=int, default=d.check_steps, help="decoding steps each check compares")
    ap.add_argument("--check_tokens", type=int, default=d.check_tokens,
                    help="new tokens of the check that the loop equals generate")
    ap.add_argument("--bootstrap", type=int, default=d.bootstrap,
                    help="bootstrap resamples for the paired ratios' 95%% intervals (0: none)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--output_dir", default=None,
                    help="folder for bench.json (the results, written atomically) and bench.md (the tables)")
    ap.add_argument("--markdown", default=None, help="write the tables as Markdown to this file (default with "
                                                     "--output_dir: its bench.md)")
    ap.add_argument("--out", action=_OldOut, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> dict:
    ap = build_parser()
    bench.apply_preset_defaults(ap, argv)  # --preset NAME: its fields become the defaults of the other flags
    args = ap.parse_args(argv)
    from dleaf import models

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    try:
        cfg = bench.BenchConfig(
            models=args.models, configs=args.configs, batch_sizes=args.batch_sizes, new_tokens=args.new_tokens,
            repeats=args.repeats, warmup=args.warmup, memory=not args.no_memory, memory_models=args.memory_models,
            score_models=args.score_models, score_batch_sizes=args.score_batch_sizes, score_tokens=args.score_tokens,
            score_repeats=args.score_repeats, paired_steps=args.paired_steps, paired_warmup=args.paired_warmup,
            llava_shape=dataclasses.replace(bench.preset_llava_shape(args.preset),
                                            **_shape_knobs(args.llava_shape, bench.LlavaShape)),
            organism_shape=_shape_knobs(args.organism_shape, models.family("organism").shape()) or None,
            use_checkpoint=not args.random_organism, device=args.device, seed=args.seed, dtype=args.dtype,
            checks=not args.no_checks, check_steps=args.check_steps, check_tokens=args.check_tokens,
            bootstrap=args.bootstrap)
    except ValueError as err:
        ap.error(str(err))
    if args.output_dir:
        args.out = args.out or str(Path(args.output_dir) / "bench.json")
        args.markdown = args.markdown or str(Path(args.output_dir) / "bench.md")
    try:  # the output files are checked before the benchmark runs
        if args.output_dir:
            cli.check_output_dir(args.output_dir)
        for flag, path in (("--out", args.out), ("--markdown", args.markdown)):
            if path:
                cli.check_output_file(path, flag)
    except cli.InputError as err:
        cli.fail(str(err))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.memory_only:
        if not args.out:
            ap.error("--memory_only needs --output_dir (whose bench.json the memory results are merged into)")
        result = bench.run_memory_only(cfg, args.out, log)
    else:
        result = bench.run_benchmark(cfg, args.out, log)
    print(bench.format_report(result))
    if args.markdown:
        from dleaf.io import write_text_atomic

        write_text_atomic(bench.markdown_tables(result), args.markdown)
    written = [args.output_dir] if args.output_dir else [p for p in (args.out, args.markdown) if p]
    if written:
        print()
        cli.done(*written)
    else:
        print("\nno files written (pass --output_dir to write bench.json and bench.md)")
    return result


if __name__ == "__main__":
    sys.exit(cli.main(lambda argv: main(argv) and 0, resumable=False))
