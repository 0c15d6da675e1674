"""Score a caption token by token with the learned hallucination detector: at every token, the probability that
it is a hallucinated object word, from the model's own attention at the row that predicts it (LIAE, image mass,
per-head image mass and focus of the detector's layers; dleaf.detect).

    python scripts/detect.py --item adversarial/3 --caption "a red cube and a blue ball ."
    python scripts/detect.py --model organism --image scene.png --caption "..." --output_dir runs/detect_score

The detector file names the model it was fitted on; scoring another model with it is refused. Writes
detect.json (one record per token: token, id, probability) to --output_dir.
"""

import sys

from dleaf import cli


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="organism", help="a registered model name, a checkpoint folder or a hub id")
    ap.add_argument("--detector", default="data/detectors/organism_detector.json", help="a detector file")
    ap.add_argument("--caption", required=True, help="the caption to score")
    ap.add_argument("--image", default=None, help="an image file")
    ap.add_argument("--item", default=None, help="an organism caption item instead of --image, e.g. adversarial/3")
    ap.add_argument("--prompt", default=None, help="the prompt the caption answers (default: the organism's)")
    ap.add_argument("--output_dir", default="runs/detect_score", help="where detect.json goes")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads torch may use")
    return ap


def run(argv=None):
    args = build_parser().parse_args(argv)
    import json
    from pathlib import Path

    from dleaf import detect, models
    from dleaf.io import InputError, write_json_atomic

    if (args.image is None) == (args.item is None):
        raise InputError("give exactly one of --image and --item")
    try:
        det = detect.Detector.load(args.detector)
    except ValueError as e:
        raise InputError(str(e)) from e
    out = cli.check_output_dir(args.output_dir)
    cli.set_threads(args.threads)
    if args.item is not None:
        from dleaf import eval as harness

        split, _, index = args.item.partition("/")
        if not index.isdigit():
            raise InputError(f"--item must be split/index, e.g. adversarial/3; got {args.item!r}")
        bench = harness.load_benchmark("organism_caption", limit=int(index) + 1, splits=[split])
        item = bench.items[int(index)]
        image, prompt = item.image(), args.prompt or item.prompt
    else:
        from PIL import Image

        if not Path(args.image).is_file():
            raise InputError(f"--image {args.image}: no such file")
        image, prompt = Image.open(args.image).convert("RGB"), args.prompt
    model, processor = models.load(args.model, attn_implementation="eager")
    try:
        det.check_model(model)
    except ValueError as e:
        raise InputError(str(e)) from e
    tokens = detect.score(model, processor, image, args.caption, det, prompt)
    for t in tokens:
        print(f"{t['token']}\t{t['probability']:.4f}")
    path = write_json_atomic({"model": args.model, "detector": str(args.detector), "caption": args.caption,
                              "tokens": tokens}, Path(out) / "detect.json")
    cli.done(path)
    return 0


def main(argv=None):
    return cli.main(run, argv, resumable=False)


if __name__ == "__main__":
    sys.exit(main())
