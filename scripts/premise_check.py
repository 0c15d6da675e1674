"""The premise check on a caption run of the evaluation harness: does any layer's image attention (LIAE, image
mass) separate the model's hallucinated object words from its grounded ones?

    python scripts/evaluate.py --benchmark organism_caption --splits adversarial --output_dir runs/greedy
    python scripts/premise_check.py --benchmark organism_caption --splits adversarial --run_dir runs/greedy
    python scripts/premise_check.py --benchmark coco_chair --model llava-hf/llava-1.5-7b-hf \\
        --coco_images val2014/ --coco_instances instances_val2014.json --coco_captions captions_val2014.json \\
        --run_dir runs/llava_greedy

Takes the same model and benchmark arguments as evaluate.py (the run's own), reads <run_dir>/generations.jsonl, and
writes premise.json, premise.md and premise.png to <run_dir> (or --out). Only greedy runs make sense: the replies
are re-scored without any method attached.
"""

import dataclasses
import sys
from pathlib import Path

from transformers import HfArgumentParser

from dleaf import evaluate, premise, premise_check
from dleaf.io import write_json_atomic, write_text_atomic


@dataclasses.dataclass
class PremiseArguments:
    run_dir: str = dataclasses.field(default=None, metadata={"help": "an evaluate.py caption run folder"})
    out: str | None = dataclasses.field(default=None, metadata={"help": "output folder (default: run_dir)"})
    n_bootstrap: int = dataclasses.field(default=2000, metadata={"help": "bootstrap resamples per AUROC"})
    score_batch_size: int = dataclasses.field(default=16, metadata={"help": "replies per scoring pass"})


def main(argv=None):
    parser = HfArgumentParser((evaluate.EvalArguments, PremiseArguments))
    args, pargs = parser.parse_args_into_dataclasses(args=argv)
    if not pargs.run_dir:
        parser.error("--run_dir is required")
    benchmark = evaluate.build_benchmark(args)
    if any(it.kind != "caption" for it in benchmark.items):
        parser.error(f"benchmark {benchmark.name} is not a caption benchmark; the premise needs object words")
    rows, _ = evaluate.read_jsonl(Path(pargs.run_dir) / "generations.jsonl", "generations file")
    by_id = {r["id"]: r for _, r in rows}
    items = [it for it in benchmark.items if it.id in by_id]
    if not items:
        parser.error(f"{pargs.run_dir}/generations.jsonl has no rows of this benchmark's items")
    model, processor = evaluate.load_model(args)
    records = premise_check.premise_records(
        model, processor, [it.image() for it in items], [it.prompt for it in items],
        [by_id[it.id]["raw"] for it in items], [sorted(it.truth) for it in items], benchmark.vocab,
        batch_size=pargs.score_batch_size)
    table = premise_check.premise_rows(records, pargs.n_bootstrap)
    out = Path(pargs.out or pargs.run_dir)
    n_hall = sum(r["hallucinated"] for r in records)
    write_json_atomic({"n_items": len(items), "n_mentions": len(records), "n_hallucinated": n_hall,
                       "rows": [dataclasses.asdict(r) for r in table], "records": records}, out / "premise.json")
    md = (f"# Premise check\n\n{len(items)} captions, {len(records)} object mentions, {n_hall} hallucinated.\n\n"
          + premise.premise_markdown(table))
    write_text_atomic(md, out / "premise.md")
    if table:
        premise.plot_premise(table, out / "premise.png")
    print(md)


if __name__ == "__main__":
    main(sys.argv[1:])
