"""The main job on the organism: load it offline, caption a few held-out images, answer a few yes/no questions, mark
every hallucinated object against the exact ground truth, and print the organism's measured hallucination profile.

    python scripts/organism_demo.py [--n 4] [--checkpoint data/organism]
"""

import argparse

from dleaf.organism import build, world
from dleaf.organism.profile import VOCAB, generate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(build.ORGANISM_DIR))
    ap.add_argument("--n", type=int, default=4, help="images per split to caption")
    args = ap.parse_args(argv)
    if args.n <= 0:
        ap.error(f"--n must be positive, got {args.n}")
    model, processor = build.load_organism(args.checkpoint)
    for split in ("indist", "adversarial"):
        scenes = world.scenes(split, args.n)
        captions, _ = generate(model, processor, scenes, [world.CAPTION_PROMPTS[0]] * len(scenes), 80)
        print(f"\n== captions, {split} split ==")
        for scene, caption in zip(scenes, captions):
            named = [m.category for m in VOCAB.extract(caption)]
            wrong = sorted({o for o in named if o not in scene.object_set})
            print(f"- image objects: {', '.join(scene.objects)}")
            print(f"  caption: {caption}")
            print(f"  hallucinated: {', '.join(wrong) if wrong else 'none'}")
    print("\n== yes/no questions, adversarial negatives ==")
    questions = world.pope_questions(world.scenes("adversarial", args.n), "adversarial")
    answers, _ = generate(model, processor, [q.scene for q in questions],
                          [world.QUESTION_TEMPLATE.format(obj=q.obj) for q in questions], 8)
    for q, a in zip(questions, answers):
        print(f"- {', '.join(q.scene.objects)} | is there a {q.obj}? -> {a}   (truth: {'yes' if q.label else 'no'})")
    profile = build.DATA_DIR / "organism_profile.md"
    print()
    print(profile.read_text() if profile.is_file() else "no profile yet: run scripts/profile_organism.py")


if __name__ == "__main__":
    main()
