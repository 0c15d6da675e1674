"""Calibrate the `calibrated` localizer for a model: per-layer percentiles, mean and sd of one layer signal (LIAE or
the image-mass deficit) over every reply row of plain greedy captions on a calibration set, written with the model's
identity to a small JSON file that `localization=calibrated calibration=<file>` loads.

    python scripts/calibrate_localizer.py --output_dir runs/calibration
    python scripts/calibrate_localizer.py --signal mass_deficit --splits indist --n_images 200 --output_dir runs/cal
    python scripts/calibrate_localizer.py --model llava-hf/llava-1.5-7b-hf --benchmark coco_chair \\
        --coco_images val2014/ --coco_instances instances_val2014.json --coco_captions captions_val2014.json \\
        --output_dir runs/cal_llava

The benchmark is any caption benchmark of the harness (default organism_caption, the organism's indist split);
its protocol's prompt, token budget and trailing-sentence rule are used. Writes calibration.json (its path is
printed) to --output_dir. A file is refused when attached to another model.
"""

import json
import sys
from pathlib import Path

from dleaf import cli


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="organism", help="model name or path (default: organism)")
    ap.add_argument("--benchmark", default="organism_caption", help="a caption benchmark of the harness")
    ap.add_argument("--splits", nargs="+", default=["indist"], help="benchmark splits to calibrate on")
    ap.add_argument("--n_images", "--n-images", type=int, default=200, help="images per split")
    ap.add_argument("--signal", default="liae", choices=["liae", "mass_deficit"], help="the layer signal")
    ap.add_argument("--liae_variant", "--liae-variant", default="mixed", choices=["mixed", "mean_head"],
                    help="LIAE of the head-mixed profile or mean of per-head entropies")
    ap.add_argument("--no_liae_normalize", "--no-liae-normalize", action="store_true",
                    help="turn off dividing LIAE by log |I|")
    ap.add_argument("--output_dir", "--output-dir", default="runs/calibration", help="where calibration.json goes")
    ap.add_argument("--output_name", "--output-name", default="calibration.json", help="the file's name")
    ap.add_argument("--batch_size", "--batch-size", type=int, default=100, help="replies per generation batch")
    ap.add_argument("--coco_images", "--coco-images", default=None, help="coco_chair: folder of the images")
    ap.add_argument("--coco_instances", "--coco-instances", default=None, help="coco_chair: instances json")
    ap.add_argument("--coco_captions", "--coco-captions", default=None, help="coco_chair: captions json")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads torch may use")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch

    from dleaf import eval as harness
    from dleaf import models
    from dleaf.io import write_json_atomic
    from dleaf.methods.localizers.calibrated import calibrate

    torch.set_num_threads(args.threads)
    extra = {k: getattr(args, k) for k in ("coco_images", "coco_instances", "coco_captions") if getattr(args, k)}
    bench = harness.load_benchmark(args.benchmark, limit=args.n_images, splits=args.splits, **extra)
    model, processor = models.load(args.model, attn_implementation="eager")
    knobs = {"layer_signal": args.signal, "liae_variant": args.liae_variant,
             "liae_normalize": not args.no_liae_normalize}
    source = {"model": args.model, "benchmark": args.benchmark, "splits": list(args.splits),
              "n_images": len(bench.items)}
    with torch.no_grad():
        data = calibrate(model, processor, bench.items, knobs, bench.max_new_tokens(), args.batch_size,
                         bench.protocol.sentence_rule, source)
    out = write_json_atomic(data, Path(args.output_dir) / args.output_name)
    print(json.dumps({"written": str(out), "n_rows": data["n_rows"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
