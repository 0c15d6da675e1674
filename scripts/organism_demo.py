"""A first look at the organism: captions of held-out scenes where greedy decoding names objects that are not
there, beside the same scenes decoded with D-LEAF (or another method), every object checked against the scene's
exact ground truth; a few yes/no answers; and the organism's measured profile.

    python scripts/organism_demo.py
    python scripts/organism_demo.py --n 5 --scan 128 --method dleaf --knob gamma=0.8

The examples are chosen by running greedy decoding on the first --scan adversarial scenes and keeping those whose
caption hallucinates; nothing is hand-picked. Writes nothing.
"""

import sys

from dleaf import cli


def build_parser():
    ap = cli.ArgumentParser(description=__doc__)
    cli.add_common_arguments(ap, method=True)
    ap.set_defaults(method="dleaf")
    ap.add_argument("--n", type=int, default=3, help="examples to show")
    ap.add_argument("--scan", type=int, default=64, help="adversarial scenes to scan for greedy hallucinations")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    from dleaf import eval as harness
    from dleaf import models
    from dleaf.io import InputError
    from dleaf.demo import effect_sentence, hallucination_examples
    from dleaf.resources import data_path
    from dleaf.settings import Setting

    if args.n < 1 or args.scan < 1:
        raise InputError("--n and --scan must be positive")
    setting = Setting(args.method, cli.parse_knobs(args.knob))
    models.check_model(args.model)
    cli.set_threads(args.threads)
    model, processor = models.load(args.model)
    print(f"scanning {args.scan} adversarial scenes with greedy decoding and with {setting.label} ...", flush=True)
    res = hallucination_examples(model, processor, setting, args.scan, args.n)
    if not res["examples"]:
        print(f"\ngreedy decoding named no absent object on these {args.scan} scenes; try --scan with more scenes")
    for ex in res["examples"]:
        print(f"\n- scene {ex['id']}: objects {', '.join(ex['objects'])}")
        print(f"  greedy      : {ex['greedy']}")
        print(f"                hallucinated: {', '.join(ex['greedy_hallucinated'])}")
        print(f"  {setting.method:<12}: {ex['method']}")
        print(f"                hallucinated: {', '.join(ex['method_hallucinated']) or 'none'}")
    print("\n" + effect_sentence(res["summary"], setting.label))
    print("\n== yes/no questions, adversarial negatives (greedy) ==")
    bench = harness.load_benchmark("organism_pope", limit=2, splits=["adversarial"], negatives=["adversarial"])
    for it, row in zip(bench.items, harness.evaluate(model, processor, bench)["rows"]):
        print(f"- {it.prompt} -> {row['text']}   (truth: {'yes' if it.truth else 'no'})")
    profile = data_path("organism_profile.md")
    if args.model == "organism" and profile.is_file():
        print("\n" + profile.read_text())
        cli.done(profile, what="the measured profile")
    else:
        print("\nno files written")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(main, resumable=False))
