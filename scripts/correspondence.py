"""D-LEAF against a trained DPO adapter: implicit rewards, D-LEAF as a DPO step, and the correspondence statistics.

    python scripts/correspondence.py --out runs/correspondence                      # the organism and its adapter
    python scripts/correspondence.py --n_pairs 300 --knob gamma=0.8 --knob threshold=best --out runs/corr_best
    python scripts/correspondence.py --model llava-hf/llava-1.5-7b-hf --adapter runs/llava_dpo \\
        --dataset rlaif_v_heldout.parquet --column_map question:prompt,image:images --n_generations 0 --out runs/llava

Writes correspondence.json, correspondence.md, scatter.png, loss_gamma.png and heads.png to --out (each atomically).
Defaults: base model the committed organism (data/organism), adapter data/organism_dpo, preference data the
adapter's held-out organism pairs (the configuration recorded in its dpo_run.json; world seed 2, which neither
training nor any evaluation split uses), beta the adapter's training beta, D-LEAF's default knobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism", help="'organism' or a path / id of a local vision-language model")
    ap.add_argument("--adapter", default="data/organism_dpo", help="PEFT adapter folder trained on --model")
    ap.add_argument("--dataset", default="organism",
                    help="'organism' (the adapter's held-out ground-truth pairs) or a preference dataset on disk")
    ap.add_argument("--dataset_split", default="test")
    ap.add_argument("--column_map", default=None, help="rename columns, 'old:new,old:new'")
    ap.add_argument("--n_pairs", type=int, default=300,
                    help="preference pairs (the first N; the organism adapter's held-out set is the first 200)")
    ap.add_argument("--n_generations", type=int, default=100,
                    help="organism: also score the base model's greedy captions of this many adversarial images")
    ap.add_argument("--beta", type=float, default=None, help="DPO temperature (default: the adapter's)")
    ap.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE", help="D-LEAF knob (dleaf/config.py)")
    ap.add_argument("--gammas", default="0,0.05,0.1,0.2,0.3,0.5,0.7,1.0", help="comma-separated gamma sweep")
    ap.add_argument("--fd_step", type=float, default=1e-2,
                    help="finite-difference step around gamma = 0 (the engine takes its softmax in float32, which "
                         "makes much smaller steps noisy)")
    ap.add_argument("--batch_size", type=int, default=16, help="pairs per scoring pass")
    ap.add_argument("--n_resamples", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--permutations", type=int, default=2000, help="permutations per p-value")
    ap.add_argument("--top_k", type=int, default=None, help="top-k cells of the mechanism overlap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default="runs/correspondence")
    return ap.parse_args(argv)


def _portable(path) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        try:
            return str(p.resolve().relative_to(ROOT))
        except ValueError:
            return str(Path(*p.parts[-2:])) if p.is_absolute() else str(p)


def load_base(name: str):
    if name == "organism":
        from dleaf.organism.build import load_organism

        return load_organism()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(name)
    model = AutoModelForImageTextToText.from_pretrained(name, attn_implementation="eager").eval()
    return model, processor


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else ROOT / p


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dleaf.config import DLeafConfig
    from dleaf.organism import world
    from dleaf.run import parse_knobs
    from dpo_link import pairs
    from dpo_link.report import CorrespondenceProtocol, measure_generations, measure_pairs, write_report
    from dpo_link.reward_shift import load_adapter, response_rows

    say = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        knobs = parse_knobs("dleaf", args.knob)
        gammas = tuple(float(g) for g in args.gammas.split(","))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = DLeafConfig(**knobs)
    adapter_dir = _resolve(args.adapter)
    run_record = {}
    if (adapter_dir / "dpo_run.json").is_file():
        run_record = json.loads((adapter_dir / "dpo_run.json").read_text())
    beta = args.beta if args.beta is not None else (run_record.get("config", {}).get("dpo", {}).get("beta") or 0.1)
    protocol = CorrespondenceProtocol(beta=float(beta), gammas=gammas, fd_step=args.fd_step,
                                      batch_size=args.batch_size, n_resamples=args.n_resamples,
                                      permutations=args.permutations, seed=args.seed, top_k=args.top_k)
    say(f"loading {args.model} and the adapter {_portable(adapter_dir)}")
    model, processor = load_base(args.model)
    try:
        peft_model = load_adapter(model, adapter_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    vocabulary = None
    if args.dataset == "organism":
        recorded = run_record.get("data", {}).get("eval", {}).get("config")
        fields = {f.name for f in dataclasses.fields(pairs.OrganismPairConfig)}
        base_cfg = ({k: v for k, v in recorded.items() if k in fields} if recorded
                    else {"world_seed": pairs.EVAL_WORLD_SEED})
        pair_cfg = pairs.OrganismPairConfig(**{**base_cfg, "n": args.n_pairs})
        rows = pairs.organism_examples(pair_cfg)
        data_info = {"source": "organism held-out pairs", "config": dataclasses.asdict(pair_cfg)}
        vocabulary = list(world.OBJECTS)
    else:
        ds = pairs.load_preference_dataset(args.dataset, args.dataset_split,
                                           dict(kv.split(":", 1) for kv in args.column_map.split(","))
                                           if args.column_map else None, limit=args.n_pairs)
        rows = [dict(r) for r in ds]
        data_info = {"source": "disk", "path": _portable(args.dataset), "split": args.dataset_split}
    report = {"config": {"model": "data/organism" if args.model == "organism" else args.model,
                         "adapter": _portable(adapter_dir), "data": data_info, "dleaf": knobs or "defaults",
                         "dleaf_config": dataclasses.asdict(config), "protocol": dataclasses.asdict(protocol),
                         "command": " ".join(["scripts/correspondence.py", *(argv if argv is not None
                                                                              else sys.argv[1:])])}}
    t0 = time.time()
    report["pairs_report"] = measure_pairs(peft_model, processor, rows, config, protocol, vocabulary, progress=say)
    by_task = run_record.get("eval_by_task", {}).get("all")
    recorded_n = (run_record.get("data", {}).get("eval", {}).get("config") or {}).get("n")
    if by_task and args.dataset == "organism" and by_task.get("n") == recorded_n and recorded_n <= args.n_pairs:
        # the adapter's own held-out pairs are the first recorded_n pairs of this stream
        from dpo_link.dleaf_dpo import dpo_loss

        arrays = report["pairs_report"]["arrays"]
        r_theta = np.asarray(arrays["r_theta"])
        first = dpo_loss(r_theta[arrays["chosen"][:recorded_n]], r_theta[arrays["rejected"][:recorded_n]])
        report["held_out_check"] = {"n": recorded_n, "recorded_loss": by_task["loss"], "recomputed_loss": first["loss"],
                                    "recorded_accuracy": by_task["rewards/accuracies"],
                                    "recomputed_accuracy": first["accuracy"]}
    if args.n_generations > 0 and args.model == "organism":
        say(f"greedy captions of {args.n_generations} adversarial images (adapter off), then scoring them")
        scenes = world.scenes("adversarial", args.n_generations, 0)
        with peft_model.disable_adapter():
            replies = pairs.generate_replies(peft_model.get_base_model(), processor, scenes,
                                             world.CAPTION_PROMPTS[0], pairs.Decoder("greedy"))
        gen_rows = response_rows([world.render(s) for s in scenes], [world.CAPTION_PROMPTS[0]] * len(scenes),
                                 replies, objects=[list(s.objects) for s in scenes])
        report["generations"] = measure_generations(peft_model, processor, gen_rows, config, protocol, vocabulary)
    report["seconds"] = time.time() - t0
    files = write_report(report, Path(args.out))
    say(f"wrote {', '.join(files)} to {args.out} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
