"""D-LEAF against a trained DPO adapter: implicit rewards, D-LEAF as a DPO step, and the correspondence statistics.

    python scripts/correspondence.py --output_dir runs/correspondence               # the organism and its adapter
    python scripts/correspondence.py --n_pairs 300 --knob gamma=0.8 --knob threshold=best --output_dir runs/corr_best
    python scripts/correspondence.py --model path/to/llava-1.5-7b-hf --adapter runs/llava_dpo \\
        --dataset rlaif_v_heldout.parquet --column_map question=prompt --column_map image=images \\
        --output_dir runs/llava

Writes correspondence.json, correspondence.md, scatter.png, loss_gamma.png and heads.png to --output_dir (each
atomically). Defaults: base model the committed organism, adapter its committed DPO adapter (data/organism_dpo),
preference data the adapter's held-out organism pairs (the configuration recorded in its dpo_run.json; world seed 2,
which neither training nor any evaluation split uses), beta the adapter's training beta, D-LEAF's default knobs
(python -m dleaf methods lists them). docs/correspondence.md defines every statistic.
"""

from __future__ import annotations

import sys
import time

from dleaf import cli


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)
    cli.add_common_arguments(ap, output_dir="runs/correspondence", model=True, seed=0, threads=True)
    ap.add_argument("--adapter", default=None,
                    help="PEFT adapter folder trained on --model (default for the organism: data/organism_dpo)")
    ap.add_argument("--dataset", default="organism",
                    help="'organism' (the adapter's held-out ground-truth pairs) or a preference dataset on disk "
                         "(save_to_disk folder, parquet or JSON lines)")
    ap.add_argument("--dataset_split", default="test", help="split of a DatasetDict on disk")
    ap.add_argument("--column_map", action="extend", nargs="+", default=[], metavar="OLD=NEW",
                    help="rename a column of --dataset, repeated (--column_map question=prompt --column_map "
                         "image=images)")
    ap.add_argument("--n_pairs", type=int, default=300,
                    help="preference pairs, the first N (the organism adapter's own held-out set is the first 200)")
    ap.add_argument("--n_generations", type=int, default=100,
                    help="organism: also score the base model's greedy captions of this many adversarial images "
                         "(0: none)")
    ap.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                    help="a D-LEAF knob, repeated (python -m dleaf methods lists them)")
    ap.add_argument("--beta", type=float, default=None, help="DPO temperature (default: the adapter's training beta)")
    ap.add_argument("--gammas", default="0,0.05,0.1,0.2,0.3,0.5,0.7,1.0", help="comma-separated gamma sweep")
    ap.add_argument("--fd_step", type=float, default=1e-2,
                    help="finite-difference step around gamma = 0 (the engine takes its softmax in float32, which "
                         "makes much smaller steps noisy)")
    ap.add_argument("--batch_size", type=int, default=16, help="pairs per scoring pass")
    ap.add_argument("--n_resamples", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--permutations", type=int, default=2000, help="permutations per p-value")
    ap.add_argument("--top_k", type=int, default=None,
                    help="top-k cells of the mechanism overlap (default: the cells D-LEAF ever corrects, at most a "
                         "quarter)")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the GPU when there is one)")
    return ap


def main(argv=None) -> int:
    t0 = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from dpo_link import suite

    cli.check_output_dir(args.output_dir)
    try:
        gammas = [float(g) for g in args.gammas.split(",")]
    except ValueError:
        raise cli.InputError(f"--gammas must be comma-separated numbers, got {args.gammas!r}") from None
    prep = suite.prepare(
        args.output_dir, model=args.model, adapter=args.adapter, dataset=args.dataset,
        dataset_split=args.dataset_split, column_map=cli.split_entries(args.column_map, "--column_map"),
        n_pairs=args.n_pairs,
        n_generations=args.n_generations, knobs=cli.parse_knobs(args.knob), beta=args.beta, gammas=gammas,
        fd_step=args.fd_step, batch_size=args.batch_size, n_resamples=args.n_resamples,
        permutations=args.permutations, seed=args.seed, top_k=args.top_k, dtype=args.dtype, device=args.device,
        command=" ".join(["scripts/correspondence.py", *argv]))
    cli.set_threads(args.threads)
    say = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    suite.run(prep, progress=say)
    say(f"the correspondence suite took {time.time() - t0:.0f} s")
    cli.done(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main, resumable=False))
