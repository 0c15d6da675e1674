"""Shared fixtures: a tiny random organism, and hand-made COCO (instances, captions, images) and POPE files."""

import json

import pytest
from PIL import Image
from tiny_organisms import SHARPEN, build_tiny_organism


@pytest.fixture(scope="session")
def tiny_organism_factory():
    """``tiny_organism_factory(seed)``: a fresh tiny organism model (see :func:`build_tiny_organism`)."""
    return lambda seed=0: build_tiny_organism(seed)[0]


@pytest.fixture(scope="session")
def tiny_organism():
    """A randomly initialised organism-shaped Llava (3 decoder layers, 4 heads) with eager attention, and its
    processor: for tests that need a real model but not a trained one."""
    return build_tiny_organism(0)


def prompt_batch(processor, scenes, prompts):
    """Model inputs for one prompt per organism scene: the chat template, the rendered image, left padding."""
    from dleaf.organism import world

    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": p}]}],
                                           add_generation_prompt=True, tokenize=False) for p in prompts]
    return dict(processor(text=texts, images=[world.render(s) for s in scenes], return_tensors="pt", padding=True))


@pytest.fixture(scope="session")
def make_batch():
    """``make_batch(processor, scenes, prompts)``: see :func:`prompt_batch`."""
    return prompt_batch


@pytest.fixture(scope="session")
def organism_batch(tiny_organism):
    """The tiny organism and a left-padded batch of three prompts (two captions and a question) on three held-out
    scenes: ``(model, processor, scenes, prompts, batch)``."""
    from dleaf.organism import world

    model, processor = tiny_organism
    scenes = world.scenes("adversarial", 3)
    prompts = [world.CAPTION_PROMPTS[0], world.QUESTION_TEMPLATE.format(obj="fork"), world.CAPTION_PROMPTS[1]]
    batch = prompt_batch(processor, scenes, prompts)
    assert (batch["attention_mask"] == 0).any()  # the batch really is left-padded
    return model, processor, scenes, prompts, batch


@pytest.fixture(scope="session")
def sharp_organism_batch():
    """:func:`organism_batch` on the tiny organism with sharpened attention (:data:`SHARPEN`): for the tests that
    compare D-LEAF's flags or greedy choices along two numerically different paths, which need every such decision
    taken by a clear margin."""
    from dleaf.organism import world

    model, processor = build_tiny_organism(0, sharpen=SHARPEN)
    scenes = world.scenes("adversarial", 3)
    prompts = [world.CAPTION_PROMPTS[0], world.QUESTION_TEMPLATE.format(obj="fork"), world.CAPTION_PROMPTS[1]]
    return model, processor, scenes, prompts, prompt_batch(processor, scenes, prompts)


#: D-LEAF knobs that flag often on an untrained model
STRONG = dict(gamma=1.0, warmup=1, kappa=0.0)


# ------------------------------------------------------------------------------------ hand-made COCO and POPE files
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 23, "name": "bear"},
              {"id": 58, "name": "hot dog"}, {"id": 88, "name": "teddy bear"}, {"id": 67, "name": "dining table"},
              {"id": 47, "name": "cup"}, {"id": 49, "name": "knife"}]


def _write_coco(tmp_path, with_images=True):
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 20, "height": 20} for i in (1, 2, 3)]
    instances = {
        "images": images, "categories": CATEGORIES,
        "annotations": [{"id": 10, "image_id": 1, "category_id": 18}, {"id": 11, "image_id": 1, "category_id": 67},
                        {"id": 12, "image_id": 1, "category_id": 18},
                        {"id": 13, "image_id": 2, "category_id": 88},
                        {"id": 14, "image_id": 3, "category_id": 58}, {"id": 15, "image_id": 3, "category_id": 47}],
    }
    captions = {
        "images": images,
        "annotations": [{"id": 20, "image_id": 1, "caption": "A puppy sitting under a table."},
                        {"id": 21, "image_id": 1, "caption": "A man feeding his dog."},
                        {"id": 22, "image_id": 2, "caption": "A teddy bear on a bed."},
                        {"id": 23, "image_id": 3, "caption": "Two hot dogs and a mug of coffee."}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances, indent=1))
    (tmp_path / "captions.json").write_text(json.dumps(captions, indent=1))
    img_dir = tmp_path / "val2014"
    img_dir.mkdir(exist_ok=True)
    if with_images:
        for k, im in enumerate(images):
            Image.new("RGB", (20, 20), (40 * k, 200, 90)).save(img_dir / im["file_name"])
    return img_dir, tmp_path / "instances.json", tmp_path / "captions.json"


def _write_pope(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (16, 16), (10, 120, 200)).save(img_dir / name)
    qs = [(1, "a.jpg", "Is there a dog in the image?", "yes"), (2, "a.jpg", "Is there a cat in the image?", "no"),
          (3, "b.jpg", "Is there a car in the image?", "yes"), (4, "b.jpg", "Is there a bus in the image?", "no"),
          (5, "b.jpg", "Is there a cup in the image?", "yes"), (6, "a.jpg", "Is there a fork in the image?", "no")]
    path = tmp_path / "coco_pope_random.json"
    path.write_text("".join(json.dumps({"question_id": q, "image": i, "text": t, "label": lab}) + "\n"
                            for q, i, t, lab in qs))
    return path, img_dir


@pytest.fixture()
def write_coco():
    """``write_coco(folder, with_images=True)``: COCO val2014-style instances and captions for three images (the
    hand counts in test_evaluate.py refer to them), and the images; returns (image folder, instances, captions)."""
    return _write_coco


@pytest.fixture()
def write_pope():
    """``write_pope(folder)``: a six-question POPE file over two images; returns (file, image folder)."""
    return _write_pope


# ------------------------------------------------------------------------------------ running scripts
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def script_env(**extra) -> dict:
    """The environment a script subprocess runs in: offline, one CPU thread, and this checkout first on the path
    (so the scripts import the code under test, whatever is installed)."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


@pytest.fixture()
def run_script():
    """``run_script(name, *args, cwd=ROOT, timeout=600, env=None)``: run ``scripts/<name>`` with the current
    interpreter; returns the ``subprocess.CompletedProcess`` (text output)."""
    import subprocess
    import sys

    def run(name, *args, cwd=ROOT, timeout=600, env=None):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], cwd=cwd,
                              env=env or script_env(), capture_output=True, text=True, timeout=timeout)

    return run
