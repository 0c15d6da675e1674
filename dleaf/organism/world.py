"""The organism's synthetic world: scenes with exact ground truth and a scene-theme co-occurrence prior.

A scene is a set of objects placed in distinct cells of a 3 x 3 grid on a 48 x 48 canvas. Each of the 24 object
categories is drawn as a 12 px glyph with its own (shape, colour) pair; a cell is 16 px, so with 8 px patches every
object covers exactly the 2 x 2 patches of its cell and nothing else (its visual evidence is local to those patches).

The 24 categories form 6 themes of 4. Training scenes are mostly whole or partial themes, so a language prior forms
("after fork comes knife"). Held-out splits:

- ``indist``: scenes drawn like the training scenes;
- ``adversarial`` and ``replication``: every present object's theme partners are absent (at most one object per
  theme), the scenes where the prior invites objects that are not there; ``replication`` is an independent draw used
  to confirm any effect found on ``adversarial``.

Descriptions are long and free: one sentence per object in canonical order (theme partners adjacent) with varied
templates and a location, so the model itself decides when to stop, and can go on naming what the theme suggests.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

THEMES: dict[str, tuple[str, ...]] = {
    "kitchen": ("fork", "knife", "plate", "cup"),
    "office": ("pen", "book", "lamp", "desk"),
    "farm": ("cow", "pig", "barn", "tractor"),
    "beach": ("ball", "shell", "towel", "boat"),
    "street": ("car", "bus", "sign", "bike"),
    "garden": ("flower", "tree", "bench", "bird"),
}
OBJECTS: tuple[str, ...] = tuple(o for objs in THEMES.values() for o in objs)
THEME_OF: dict[str, str] = {o: t for t, objs in THEMES.items() for o in objs}
PARTNERS: dict[str, frozenset[str]] = {o: frozenset(THEMES[THEME_OF[o]]) - {o} for o in OBJECTS}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 30),
}
# object j of theme k has shape (k + j) mod 6 and colour j: every (shape, colour) pair is used at most once and no
# theme is one shape or one colour.
LOOK: dict[str, tuple[str, str]] = {
    obj: (SHAPES[(k + j) % len(SHAPES)], tuple(COLOURS)[j])
    for k, objs in enumerate(THEMES.values())
    for j, obj in enumerate(objs)
}

CANVAS = 48
BACKGROUND = 235
#: default range of a faint object's contrast against the background, as a fraction of a normal object's
FAINT_RANGE = (0.1, 0.4)
GRID = 3
CELL = CANVAS // GRID
GLYPH = 12
LOCATIONS: tuple[str, ...] = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the middle", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
SENTENCE_TEMPLATES: tuple[str, ...] = (
    "there is a {obj} {loc} .",
    "i can see a {obj} {loc} .",
    "a {obj} is {loc} .",
    "{loc} there is a {obj} .",
)
FOLLOW_TEMPLATE = "there is also a {obj} {loc} ."
OPENINGS: tuple[str, ...] = ("the image shows some objects .", "this is a picture with a few things in it .")
CAPTION_PROMPTS: tuple[str, ...] = ("describe the image in detail .", "what do you see in this picture ?")
QUESTION_TEMPLATE = "is there a {obj} in the image ?"
SPLITS: tuple[str, ...] = ("train", "indist", "adversarial", "replication")
POPE_NEGATIVES: tuple[str, ...] = ("random", "popular", "adversarial")
# a fixed, distinct seed stream per split, so that splits never share scenes by construction of the seed
_SPLIT_OFFSET = {"train": 0, "indist": 1_000_003, "adversarial": 2_000_003, "replication": 3_000_017}


@dataclasses.dataclass(frozen=True)
class Scene:
    """One image's ground truth: objects and the grid cell (0..8, row-major) each occupies."""

    objects: tuple[str, ...]
    cells: tuple[int, ...]
    seed: int
    contrast: tuple[float, ...] = ()

    def __post_init__(self):
        if not isinstance(self.objects, tuple) or not isinstance(self.cells, tuple):
            raise TypeError("Scene.objects and Scene.cells must be tuples")
        if not isinstance(self.contrast, tuple) or len(self.contrast) not in (0, len(self.objects)):
            raise ValueError(f"Scene.contrast must be () (every object at full contrast) or one value per object, "
                             f"got {self.contrast!r}")
        if any(not 0.0 < c <= 1.0 for c in self.contrast):
            raise ValueError(f"Scene.contrast values must lie in (0, 1], got {self.contrast!r}")
        if len(self.objects) != len(self.cells):
            raise ValueError(f"Scene has {len(self.objects)} objects but {len(self.cells)} cells")
        if not self.objects:
            raise ValueError("Scene needs at least one object")
        for o in self.objects:
            if o not in THEME_OF:
                raise ValueError(f"unknown object {o!r}; valid objects are {', '.join(OBJECTS)}")
        if len(set(self.objects)) != len(self.objects):
            raise ValueError(f"Scene objects must be distinct, got {self.objects}")
        for c in self.cells:
            if not isinstance(c, (int, np.integer)) or not 0 <= c < GRID * GRID:
                raise ValueError(f"cell {c!r} is not a grid cell 0..{GRID * GRID - 1}")
        if len(set(self.cells)) != len(self.cells):
            raise ValueError(f"Scene cells must be distinct, got {self.cells}")

    def contrast_of(self, obj: str) -> float:
        """The contrast ``obj`` is drawn at against the background: 1 for a normal object, lower for a faint one
        (weak visual evidence that descriptions still name)."""
        return self.contrast[self.objects.index(obj)] if self.contrast else 1.0

    @property
    def object_set(self) -> frozenset[str]:
        return frozenset(self.objects)

    def canonical(self) -> list[tuple[str, int]]:
        """(object, cell) pairs in canonical description order: theme by theme, partners adjacent."""
        order = {o: i for i, o in enumerate(OBJECTS)}
        return sorted(zip(self.objects, self.cells), key=lambda oc: order[oc[0]])

    def patches_of(self, obj: str, patch: int = 8) -> list[int]:
        """Row-major indices of the image patches covering ``obj`` (the block of its cell: 2 x 2 with 8 px patches,
        4 x 4 with 4 px ones)."""
        if obj not in self.objects:
            raise ValueError(f"{obj!r} is not in this scene ({', '.join(self.objects)})")
        cell = self.cells[self.objects.index(obj)]
        per_side = CANVAS // patch
        r0, c0 = (cell // GRID) * CELL // patch, (cell % GRID) * CELL // patch
        k = CELL // patch
        return [(r0 + dr) * per_side + (c0 + dc) for dr in range(k) for dc in range(k)]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def sample_scene(seed: int, kind: str = "train", prior: bool = True, faint_rate: float = 0.0,
                 faint_range: tuple[float, float] = FAINT_RANGE) -> Scene:
    """Draw one scene, deterministically from ``seed``.

    kind ``train`` / ``indist``: with the prior, 60% a full theme (4 objects), 30% part of a theme (2 or 3 objects,
    sometimes with one unrelated object), 10% 2 to 4 unrelated objects. Without the prior (the control world), 2 to 4
    objects drawn uniformly. kind ``adversarial`` / ``replication``: 2 to 4 objects from distinct themes, so every
    present object's partners are absent.

    ``faint_rate``: each object is drawn faint with this probability, at a contrast drawn uniformly from
    ``faint_range``, from a separate random stream, so the objects and cells of a seed do not depend on it.
    """
    if not 0.0 <= faint_rate <= 1.0:
        raise ValueError(f"faint_rate must lie in [0, 1], got {faint_rate}")
    lo, hi = faint_range
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"faint_range must satisfy 0 < low <= high <= 1, got {faint_range}")
    if kind not in SPLITS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {', '.join(SPLITS)}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng = _rng(int(seed))
    themes = list(THEMES)
    if kind in ("adversarial", "replication"):
        n = int(rng.integers(2, 5))
        chosen = rng.choice(len(themes), size=n, replace=False)
        objs = [THEMES[themes[t]][int(rng.integers(4))] for t in chosen]
    elif not prior:
        n = int(rng.integers(2, 5))
        objs = [OBJECTS[i] for i in rng.choice(len(OBJECTS), size=n, replace=False)]
    else:
        u = rng.random()
        theme = themes[int(rng.integers(len(themes)))]
        if u < 0.6:
            objs = list(THEMES[theme])
        elif u < 0.9:
            k = int(rng.integers(2, 4))
            objs = [THEMES[theme][i] for i in sorted(rng.choice(4, size=k, replace=False))]
            if rng.random() < 0.5:
                others = [o for o in OBJECTS if THEME_OF[o] != theme]
                objs.append(others[int(rng.integers(len(others)))])
        else:
            n = int(rng.integers(2, 5))
            objs = [OBJECTS[i] for i in rng.choice(len(OBJECTS), size=n, replace=False)]
    cells = rng.choice(GRID * GRID, size=len(objs), replace=False)
    contrast = ()
    if faint_rate > 0:
        frng = _rng(int(seed) * 5 + 17)
        contrast = tuple(float(frng.uniform(lo, hi)) if frng.random() < faint_rate else 1.0 for _ in objs)
    return Scene(tuple(objs), tuple(int(c) for c in cells), int(seed), contrast)


def split_seed(split: str, index: int, world_seed: int = 0) -> int:
    """The scene seed of item ``index`` of ``split`` (stable across runs and machines)."""
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return world_seed * 10_000_019 + _SPLIT_OFFSET[split] + int(index)


def scenes(split: str, n: int, world_seed: int = 0, prior: bool = True, start: int = 0,
           faint_rate: float = 0.0, faint_range: tuple[float, float] = FAINT_RANGE) -> list[Scene]:
    """``n`` scenes of ``split`` (items ``start`` .. ``start + n - 1``)."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be non-negative, got n={n}, start={start}")
    kind = "train" if split == "train" else split
    return [sample_scene(split_seed(split, start + i, world_seed), kind, prior, faint_rate, faint_range)
            for i in range(n)]


def _draw_glyph(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], x0: int, y0: int, s: int):
    box = (x0, y0, x0 + s - 1, y0 + s - 1)
    cx, cy = x0 + (s - 1) / 2, y0 + (s - 1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle((x0 + 1, y0 + 1, x0 + s - 2, y0 + s - 2), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x0 + s - 1, cy), (cx, y0 + s - 1), (x0, cy)], fill=colour)
    elif shape == "cross":
        w = s // 3
        draw.rectangle((x0 + w, y0, x0 + 2 * w - 1 + (s % 3 > 0), y0 + s - 1), fill=colour)
        draw.rectangle((x0, y0 + w, x0 + s - 1, y0 + 2 * w - 1 + (s % 3 > 0)), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=3)
    else:  # pragma: no cover - LOOK only uses SHAPES
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as a 48 x 48 RGB image: a light noisy background and one glyph per object in its cell."""
    if not isinstance(scene, Scene):
        raise TypeError(f"render expects a Scene, got {type(scene).__name__}")
    rng = _rng(scene.seed + 7)
    bg = BACKGROUND + rng.integers(-12, 13, size=(CANVAS, CANVAS, 1)) + rng.integers(-4, 5, size=(CANVAS, CANVAS, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for k, (obj, cell) in enumerate(zip(scene.objects, scene.cells)):
        shape, colour = LOOK[obj]
        rng = _rng(scene.seed * 16 + cell)  # per cell, so removing one object leaves the others' pixels unchanged
        jitter = rng.integers(-1, 2, size=2)
        x0 = (cell % GRID) * CELL + (CELL - GLYPH) // 2 + int(jitter[0])
        y0 = (cell // GRID) * CELL + (CELL - GLYPH) // 2 + int(jitter[1])
        shade = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
        if scene.contrast and scene.contrast[k] < 1.0:  # faint: the glyph's colour moved toward the background
            shade = tuple(int(round(BACKGROUND + scene.contrast[k] * (c - BACKGROUND))) for c in shade)
        _draw_glyph(draw, shape, shade, x0, y0, GLYPH)
    return img


def noisy_mentions(scene: Scene, noise: float, rng: np.random.Generator, prior: bool = True) -> list[tuple[str, int]]:
    """The (object, cell) pairs a description names under annotation noise: every present object in canonical
    order, then the objects the image does not show, in canonical order.

    For each present object (in canonical order), with probability ``noise``, the description also names one object
    that is not in the image, at a free cell: in the prior world an absent theme partner of that object (drawn
    uniformly among them; nothing if its whole theme is present), in the no-prior world an absent object drawn
    uniformly. These come after the real objects, as real captions go on to name what the scene suggests once the
    visible objects are described; this annotation noise is what teaches a captioner to *add* objects.
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"description noise must lie in [0, 1], got {noise}")
    present = scene.canonical()
    if noise == 0.0:
        return present
    used_objs, used_cells = set(scene.objects), set(scene.cells)
    extra = []
    for obj, _ in present:
        if rng.random() >= noise:
            continue
        pool = sorted(PARTNERS[obj] - used_objs, key=OBJECTS.index) if prior else \
            [o for o in OBJECTS if o not in used_objs]
        free = [c for c in range(GRID * GRID) if c not in used_cells]
        if not pool or not free:
            continue
        added, cell = pool[int(rng.integers(len(pool)))], free[int(rng.integers(len(free)))]
        extra.append((added, cell))
        used_objs.add(added)
        used_cells.add(cell)
    order = {o: i for i, o in enumerate(OBJECTS)}
    return present + sorted(extra, key=lambda oc: order[oc[0]])


def describe(scene: Scene, seed: int | None = None, noise: float = 0.0, prior: bool = True) -> str:
    """A long, free description of ``scene``: an opening, then one sentence per object in canonical order.

    Templates and the opening vary with ``seed`` (default: the scene's seed); from the second object on, a sentence
    may be a "there is also ..." continuation. Every object is named exactly once. With ``noise`` > 0 the description
    may go on to name absent objects after the real ones (:func:`noisy_mentions`), each as "there is also ...", as
    training captions do.
    """
    base = scene.seed if seed is None else seed
    rng = _rng(base * 31 + 3)
    parts = [OPENINGS[int(rng.integers(len(OPENINGS)))]]
    mentions = scene.canonical() if noise == 0.0 else noisy_mentions(scene, noise, _rng(base * 37 + 5), prior)
    for i, (obj, cell) in enumerate(mentions):
        loc = LOCATIONS[cell]
        if i >= len(scene.objects) or (i > 0 and rng.random() < 0.25):
            parts.append(FOLLOW_TEMPLATE.format(obj=obj, loc=loc))
        else:
            parts.append(SENTENCE_TEMPLATES[int(rng.integers(len(SENTENCE_TEMPLATES)))].format(obj=obj, loc=loc))
    return " ".join(parts)


ANSWER_STYLES: tuple[str, ...] = ("list_first", "object_first", "yes_first")


def object_list(objects: Sequence[str]) -> str:
    """"a fork , a cow and a bus": the objects in the order given, as a reply lists them."""
    names = [f"a {o}" for o in objects]
    return names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]


def answer(scene: Scene, obj: str, style: str = "yes_first", listed: Sequence[str] | None = None) -> str:
    """The yes/no answer to "is there a ``obj`` in the image ?".

    ``yes_first`` (the committed organism's format) decides at once ("yes , there is a fork ."). ``object_first``
    names the asked object, then decides ("fork ? yes , there is a fork ."). ``list_first`` first lists what the
    image shows, then names the asked object and decides ("i see a fork , a cow and a bus . fork ? yes , there is a
    fork ." / "... . knife ? no , there is no knife ."), so that reading the image is the captioning skill the model
    already has and the decision a look-up of the asked word in its own list. All three parse the same way under the
    POPE rule. In our runs none of them made a small model trained on this world answer from the image: the
    decision stayed at chance (docs/organism.md has the runs).

    ``listed``: the objects the list names, in order (default: the scene's objects in canonical order). Training
    passes the noisy mentions of
    :func:`noisy_mentions`, so a list carries the same annotation noise as a description, and the decision follows
    the list: an object the list names is answered yes.
    """
    if obj not in THEME_OF:
        raise ValueError(f"unknown object {obj!r}; valid objects are {', '.join(OBJECTS)}")
    if style not in ANSWER_STYLES:
        raise ValueError(f"unknown answer style {style!r}; expected one of {', '.join(ANSWER_STYLES)}")
    named = [o for o, _ in scene.canonical()] if listed is None else list(listed)
    present = obj in named
    decision = f"yes , there is a {obj} ." if present else f"no , there is no {obj} ."
    if style == "yes_first":
        return decision
    if style == "object_first":
        return f"{obj} ? {decision}"
    return f"i see {object_list(named)} . {obj} ? {decision}"


def object_frequencies(n: int = 20_000, world_seed: int = 0, prior: bool = True) -> dict[str, float]:
    """How often each object appears in training scenes (estimated on ``n`` scenes; used for popular negatives)."""
    counts = dict.fromkeys(OBJECTS, 0)
    for s in scenes("train", n, world_seed, prior):
        for o in s.objects:
            counts[o] += 1
    return {o: c / n for o, c in counts.items()}


@dataclasses.dataclass(frozen=True)
class Question:
    scene: Scene
    obj: str
    label: bool  # True: the object is in the image


def pope_questions(scene_list: Sequence[Scene], negatives: str, seed: int = 0,
                   popularity: dict[str, float] | None = None) -> list[Question]:
    """POPE-style questions: for every scene one present object (yes) and one absent object (no).

    The absent object is drawn uniformly (``random``), among the most frequent training objects absent from the
    image (``popular``), or among the theme partners of the present objects (``adversarial``, the co-occurrence
    negatives of POPE).
    """
    if negatives not in POPE_NEGATIVES:
        raise ValueError(f"unknown negative sampling {negatives!r}; expected one of {', '.join(POPE_NEGATIVES)}")
    if not scene_list:
        raise ValueError("pope_questions needs at least one scene")
    if negatives == "popular" and popularity is None:
        popularity = object_frequencies()
    out = []
    for scene in scene_list:
        rng = _rng(scene.seed * 13 + seed)
        present = list(scene.objects)
        absent = [o for o in OBJECTS if o not in scene.object_set]
        if negatives == "random":
            neg = absent[int(rng.integers(len(absent)))]
        elif negatives == "popular":
            ranked = sorted(absent, key=lambda o: (-popularity[o], OBJECTS.index(o)))
            neg = ranked[int(rng.integers(min(3, len(ranked))))]
        else:
            partners = sorted({p for o in present for p in PARTNERS[o]} - scene.object_set, key=OBJECTS.index)
            pool = partners or absent
            neg = pool[int(rng.integers(len(pool)))]
        pos = present[int(rng.integers(len(present)))]
        out.append(Question(scene, pos, True))
        out.append(Question(scene, neg, False))
    return out


def text_corpus(n: int, world_seed: int = 0, prior: bool = True, noise: float = 0.0,
                list_questions: float = 0.0) -> list[str]:
    """Text without images for the decoder's pretraining: descriptions of training scenes (with the same annotation
    ``noise`` as the image descriptions), theme statements that carry the same co-occurrence prior ("in a kitchen
    there is a fork , a knife , a plate and a cup ."), and, a ``list_questions`` share of the texts, the second half
    of a ``list_first`` answer with no image and no question: a list of objects, an object, and whether the list
    names it ("i see a cow and a ball . fork ? no , there is no fork ."), half the time about a listed object. That
    teaches the look-up of a word in a list before any image is seen, so that the joint stage only has to learn to
    take the asked object from the question (docs/organism.md: without it the answers stayed at chance)."""
    if not 0.0 <= list_questions <= 1.0:
        raise ValueError(f"list_questions must lie in [0, 1], got {list_questions}")
    out = []
    rng = _rng(world_seed * 7 + 11)
    qrng = _rng(world_seed * 7 + 13)
    for i, scene in enumerate(scenes("train", n, world_seed + 1_000, prior)):
        if list_questions > 0 and qrng.random() < list_questions:
            listed = [o for o, _ in noisy_mentions(scene, noise, qrng, prior)]
            if qrng.random() < 0.5:
                obj = listed[int(qrng.integers(len(listed)))]
            else:
                absent = [o for o in OBJECTS if o not in listed]
                obj = absent[int(qrng.integers(len(absent)))]
            out.append(answer(scene, obj, "list_first", listed))
        elif prior and rng.random() < 0.15:
            theme = list(THEMES)[int(rng.integers(len(THEMES)))]
            objs = THEMES[theme]
            out.append(f"in a {theme} there is a {objs[0]} , a {objs[1]} , a {objs[2]} and a {objs[3]} .")
        else:
            out.append(describe(scene, seed=scene.seed + i, noise=noise, prior=prior))
    return out


def words() -> list[str]:
    """Every word the world's texts can contain (the organism tokenizer's vocabulary, special tokens aside)."""
    from .chat import SYSTEM_PROMPT

    texts: list[str] = [SYSTEM_PROMPT, FOLLOW_TEMPLATE, QUESTION_TEMPLATE, "yes , there is no"]
    texts += list(LOCATIONS) + list(SENTENCE_TEMPLATES) + list(OPENINGS) + list(CAPTION_PROMPTS)
    texts += list(OBJECTS) + list(THEMES) + ["in a and", "user", "assistant", ":"]
    vocab: list[str] = []
    for t in texts:
        for w in t.replace("{obj}", " ").replace("{loc}", " ").split():
            if w not in vocab:
                vocab.append(w)
    return vocab


def scene_digest(scene_list: Iterable[Scene]) -> str:
    """A short hash of a list of scenes, recorded with every result to name the exact evaluation set."""
    h = hashlib.sha256()
    for s in scene_list:
        h.update(repr((s.objects, s.cells, s.seed)).encode())
    return h.hexdigest()[:16]
