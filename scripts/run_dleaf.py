"""Decode one image with plain greedy decoding and with D-LEAF (or another method), side by side, with a trace
summary for the methods that flag layers.

    python scripts/run_dleaf.py                                    # the organism, an adversarial scene
    python scripts/run_dleaf.py --method dleaf --knob gamma=0.8 --knob threshold=best --output_dir runs/one
    python scripts/run_dleaf.py --model llava-hf/llava-1.5-7b-hf --image photo.jpg --prompt "Describe the image."

Methods and their knobs: python -m dleaf methods. With --output_dir, result.json (the two replies, the setting) and
summary.txt are written there, and for a method that flags layers (D-LEAF and its variants) trace.json and
trace.png.
"""

import sys

from dleaf import cli


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)
    cli.add_common_arguments(ap, method=True)
    ap.set_defaults(method="dleaf")
    ap.add_argument("--output_dir", default=None,
                    help="folder for result.json and summary.txt (and trace.json, trace.png for a method that flags "
                         "layers)")
    ap.add_argument("--image", default=None, help="image file (default with the organism: an adversarial scene)")
    ap.add_argument("--scene", type=int, default=None,
                    help="which adversarial organism scene when --image is not given (default: the first of the "
                         "first 32 where greedy decoding hallucinates)")
    ap.add_argument("--prompt", default=None, help="the question (default: the benchmark's caption prompt)")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="token limit of each reply")
    cli.add_old_spelling(ap, "--out", "--output_dir")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    from dleaf import eval as harness, models
    from dleaf.io import InputError, load_image
    from dleaf.settings import Setting

    setting = Setting(args.method, cli.parse_knobs(args.knob))
    if not setting.attaches:
        raise InputError("--method greedy attaches nothing: there is nothing to compare plain decoding with")
    if args.max_new_tokens < 1:
        raise InputError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    if args.scene is not None and args.scene < 0:
        raise InputError(f"--scene must be >= 0, got {args.scene}")
    cli.set_threads(args.threads)
    models.check_model(args.model)
    named = args.model in models.registered()
    if args.output_dir:
        cli.check_output_dir(args.output_dir)
    if args.image is not None:
        image = load_image(args.image)
        prompt = args.prompt or "Describe this image in detail."
        truth, vocab = None, None
    elif named:
        limit = 32 if args.scene is None else args.scene + 1
        bench = harness.load_benchmark("organism_caption", limit=limit, splits=["adversarial"])
        if args.scene is not None and args.scene >= len(bench.items):
            raise InputError(f"--scene must be below {len(bench.items)}, got {args.scene}")
        model, processor = models.load(args.model)
        scene, why = args.scene, ""
        if scene is None:
            from dleaf.demo import first_hallucination

            scene = first_hallucination(model, processor, bench)
            why = " (the first scene where greedy decoding hallucinates)" if scene is not None else ""
            scene = scene or 0
        item = bench.items[scene]
        image, prompt, truth, vocab = item.image(), args.prompt or item.prompt, item.truth, bench.vocab
        print(f"image: adversarial scene {scene}{why}, objects: {', '.join(sorted(truth))}")
    else:
        raise InputError("--image is required with a --model other than the organism")
    if args.image is not None:
        model, processor = models.load(args.model)
    from dleaf import run

    result = run.compare(model, processor, image, prompt, setting, args.max_new_tokens, vocab, truth)
    print(f"prompt: {prompt}\n\nplain greedy : {result['plain']}\n{args.method:<13}: {result['method']}")
    if truth is not None:
        for name, text in (("plain greedy", result["plain"]), (args.method, result["method"])):
            wrong = sorted({m.category for m in vocab.extract(text)} - set(truth))
            print(f"{name:<13}: hallucinated {', '.join(wrong) if wrong else 'nothing'}")
    if result["trace"] is not None:
        from dleaf import trace_report

        print("\n" + trace_report.trace_summary(result["trace"]))
    if args.output_dir:
        where = str(args.image) if args.image is not None else f"adversarial scene {scene}"
        meta = {"model": args.model, "image": where, "prompt": prompt, "setting": setting.label,
                "max_new_tokens": args.max_new_tokens}
        if truth is not None:
            meta["objects"] = sorted(truth)
        run.write_outputs(result, args.output_dir, title=f"{args.model}, {where}: {setting.label}",
                          method=args.method, meta=meta)
        cli.done(args.output_dir)
        return 0
    print("no files written (pass --output_dir to write result.json and summary.txt, and for a method that flags "
          "layers trace.json and trace.png)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main))
