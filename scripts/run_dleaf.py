"""Decode one image with plain greedy decoding and with D-LEAF (or a baseline), side by side, with a trace summary.

    python scripts/run_dleaf.py                                    # the organism, an adversarial scene
    python scripts/run_dleaf.py --method dleaf --knob gamma=0.8 --knob threshold=best --out runs/one
    python scripts/run_dleaf.py --model llava-hf/llava-1.5-7b-hf --image photo.jpg --prompt "Describe the image."

Methods: dleaf, pai, spin, no_localization, random_layers; knobs are the fields of their configs (dleaf/config.py).
"""

import argparse

from dleaf import run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the committed organism)")
    ap.add_argument("--image", default=None, help="image file (default with the organism: an adversarial scene)")
    ap.add_argument("--scene", type=int, default=0, help="which adversarial scene when --image is not given")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--method", default="dleaf")
    ap.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="folder for trace.json, trace.png and summary.txt")
    args = ap.parse_args(argv)
    try:
        knobs = run.parse_knobs(args.method, args.knob)
    except ValueError as err:
        ap.error(str(err))
    model, processor, organism = run.load_model(args.model)
    if args.image is None:
        if not organism:
            ap.error("--image is required with --model")
        from dleaf.organism import world

        scene = world.scenes("adversarial", args.scene + 1)[args.scene]
        image = world.render(scene)
        print(f"image: adversarial scene {args.scene}, objects: {', '.join(scene.objects)}")
    else:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    if args.prompt:
        prompt = args.prompt
    elif organism:
        from dleaf.organism import world

        prompt = world.CAPTION_PROMPTS[0]
    else:
        prompt = "Describe this image in detail."
    result = run.compare(model, processor, run.prompt_inputs(processor, image, prompt, organism), args.method, knobs,
                         args.max_new_tokens)
    print(f"prompt: {prompt}\n\nplain greedy : {result['plain']}\n{args.method:<13}: {result['method']}")
    if result["trace"] is not None:
        from dleaf import trace_report

        print("\n" + trace_report.trace_summary(result["trace"]))
    if args.out:
        signal = "LIAE" if result["config"].__class__.__name__ == "DLeafConfig" and \
            result["config"].layer_signal == "liae" else "image-mass deficit"
        for path in run.write_outputs(result, args.out, signal):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
