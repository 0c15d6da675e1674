import numpy as np
import pytest

from dleaf.organism import world


def test_looks_are_distinct_and_themes_mix_shapes_and_colours():
    assert len(set(world.LOOK.values())) == len(world.OBJECTS) == 24
    for theme, objs in world.THEMES.items():
        assert len({world.LOOK[o][0] for o in objs}) > 1, theme
        assert len({world.LOOK[o][1] for o in objs}) > 1, theme


def test_scenes_are_deterministic_and_distinct_across_splits():
    a = world.scenes("adversarial", 50)
    assert a == world.scenes("adversarial", 50)
    assert np.array_equal(np.asarray(world.render(a[3])), np.asarray(world.render(a[3])))
    seeds = {s.seed for split in ("train", "indist", "adversarial", "replication") for s in world.scenes(split, 200)}
    assert len(seeds) == 800
    assert world.scenes("indist", 10, start=5) == world.scenes("indist", 15)[5:]


def test_adversarial_scenes_have_no_partners():
    for s in world.scenes("adversarial", 300) + world.scenes("replication", 300):
        themes = [world.THEME_OF[o] for o in s.objects]
        assert len(themes) == len(set(themes))
        assert 2 <= len(s.objects) <= 4


def test_training_scenes_carry_the_prior_and_the_control_does_not():
    full = sum(len({world.THEME_OF[o] for o in s.objects}) == 1 and len(s.objects) == 4
               for s in world.scenes("train", 2000))
    assert 0.55 < full / 2000 < 0.65
    control = sum(len({world.THEME_OF[o] for o in s.objects}) == 1 and len(s.objects) == 4
                  for s in world.scenes("train", 2000, prior=False))
    assert control < 20


def _cell_pixels(img, cell):
    arr = np.asarray(img).astype(int)
    r, c = divmod(cell, world.GRID)
    return arr[r * world.CELL:(r + 1) * world.CELL, c * world.CELL:(c + 1) * world.CELL]


def test_ground_truth_matches_what_is_drawn():
    for s in world.scenes("indist", 40):
        img = world.render(s)
        for cell in range(world.GRID * world.GRID):
            px = _cell_pixels(img, cell)
            saturated = (px.max(-1) - px.min(-1)) > 80  # glyph colours are saturated, the background is grey
            if cell in s.cells:
                obj = s.objects[s.cells.index(cell)]
                colour = np.array(world.COLOURS[world.LOOK[obj][1]])
                assert saturated.sum() > 20, (s, cell)
                mean = px[saturated].mean(0)
                assert np.abs(mean - colour).max() < 30, (obj, mean, colour)
            else:
                assert saturated.sum() == 0, (s, cell)


def test_patches_of_cover_the_object_cell():
    s = world.Scene(("fork", "cow"), (0, 8), 1)
    assert s.patches_of("fork") == [0, 1, 6, 7]
    assert s.patches_of("cow") == [28, 29, 34, 35]
    with pytest.raises(ValueError, match="not in this scene"):
        s.patches_of("cup")


def test_description_names_every_object_once_in_canonical_order():
    for s in world.scenes("train", 100):
        text = world.describe(s)
        named = [w for w in text.split() if w in world.THEME_OF]
        assert named == [o for o, _ in s.canonical()]
        for obj, cell in s.canonical():
            assert world.LOCATIONS[cell] in text


def test_pope_questions_labels_and_negative_kinds():
    scenes = world.scenes("adversarial", 100)
    for kind in world.POPE_NEGATIVES:
        qs = world.pope_questions(scenes, kind)
        assert len(qs) == 200
        for q in qs:
            assert q.label == (q.obj in q.scene.object_set)
    for q in world.pope_questions(scenes, "adversarial"):
        if not q.label:
            assert any(q.obj in world.PARTNERS[o] for o in q.scene.objects)


def test_vocabulary_covers_every_text():
    vocab = set(world.words())
    texts = world.text_corpus(200) + [world.describe(s) for s in world.scenes("adversarial", 50)]
    texts += [world.answer(s, o) for s in world.scenes("indist", 5) for o in world.OBJECTS]
    for t in texts:
        assert set(t.split()) <= vocab, t


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(objects=("fork", "spaceship"), cells=(0, 1), seed=0), ValueError, "unknown object 'spaceship'"),
    (dict(objects=("fork",), cells=(0, 1), seed=0), ValueError, "1 objects but 2 cells"),
    (dict(objects=("fork", "cup"), cells=(0, 0), seed=0), ValueError, "cells must be distinct"),
    (dict(objects=("fork", "fork"), cells=(0, 1), seed=0), ValueError, "objects must be distinct"),
    (dict(objects=("fork",), cells=(9,), seed=0), ValueError, "not a grid cell"),
    (dict(objects=(), cells=(), seed=0), ValueError, "at least one object"),
    (dict(objects=["fork"], cells=[0], seed=0), TypeError, "tuples"),
])
def test_scene_rejects_malformed_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        world.Scene(**kwargs)


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown scene kind 'val'"):
        world.sample_scene(0, "val")
    with pytest.raises(TypeError, match="seed must be an int"):
        world.sample_scene("0")
    with pytest.raises(ValueError, match="unknown split"):
        world.scenes("test", 3)
    with pytest.raises(ValueError, match="unknown negative sampling 'hard'"):
        world.pope_questions(world.scenes("indist", 2), "hard")
    with pytest.raises(ValueError, match="at least one scene"):
        world.pope_questions([], "random")
    with pytest.raises(ValueError, match="unknown object 'zebra'"):
        world.answer(world.scenes("indist", 1)[0], "zebra")
    with pytest.raises(TypeError, match="expects a Scene"):
        world.render(("fork",))


def test_faint_objects_are_drawn_at_low_contrast_and_leave_the_scene_unchanged():
    plain = world.scenes("train", 200)
    faint = world.scenes("train", 200, faint_rate=0.3, faint_range=(0.2, 0.3))
    assert [(s.objects, s.cells, s.seed) for s in plain] == [(s.objects, s.cells, s.seed) for s in faint]
    values = [c for s in faint for c in s.contrast]
    assert 0.25 < np.mean([c < 1 for c in values]) < 0.35
    assert all(0.2 <= c <= 0.3 for c in values if c < 1)
    assert all(s.contrast == () for s in plain)
    s = next(s for s in faint if any(c < 1 for c in s.contrast) and 1.0 in s.contrast)
    strong = np.asarray(world.render(world.Scene(s.objects, s.cells, s.seed))).astype(int)
    weak = np.asarray(world.render(s)).astype(int)
    for obj, cell, c in zip(s.objects, s.cells, s.contrast):
        a, b = _cell_pixels(strong, cell), _cell_pixels(weak, cell)
        assert s.contrast_of(obj) == c
        if c == 1.0:
            assert np.array_equal(a, b)
            continue
        glyph = (a.max(-1) - a.min(-1)) > 80
        # every glyph pixel moved to background + contrast * (colour - background), up to rounding; the rest is kept
        expected = world.BACKGROUND + c * (a[glyph] - world.BACKGROUND)
        assert np.abs(b[glyph] - expected).max() <= 1
        assert np.array_equal(a[~glyph], b[~glyph])
    with pytest.raises(ValueError, match="contrast"):
        world.Scene(("fork",), (0,), 1, (0.0,))
    with pytest.raises(ValueError, match="faint_range"):
        world.sample_scene(1, faint_rate=0.5, faint_range=(0.5, 0.2))


def test_description_noise_names_absent_partners_at_free_cells():
    rng = np.random.default_rng(0)
    assert world.noisy_mentions(world.Scene(("fork", "cow"), (0, 8), 1), 0.0, rng) == [("fork", 0), ("cow", 8)]
    added, eligible = 0, 0
    for s in world.scenes("adversarial", 300):
        named = world.noisy_mentions(s, 0.5, rng)
        objs = [o for o, _ in named]
        cells = [c for _, c in named]
        assert set(s.objects) <= set(objs) and len(set(objs)) == len(objs) and len(set(cells)) == len(cells)
        k = len(s.objects)
        assert objs[:k] == [o for o, _ in s.canonical()]  # the real objects first, in canonical order
        assert objs[k:] == sorted(objs[k:], key=world.OBJECTS.index)
        for o, c in named:
            if o not in s.object_set:
                assert world.PARTNERS[o] & s.object_set  # an absent partner of a present object
                assert c not in s.cells
        added += len(objs) - len(s.objects)
        eligible += len(s.objects)
    assert 0.43 < added / eligible < 0.57  # every object of an adversarial scene has absent partners
    # full themes have no absent partner: nothing to add in the prior world; the control adds uniformly
    full = world.Scene(("fork", "knife", "plate", "cup"), (0, 1, 2, 3), 2)
    assert world.noisy_mentions(full, 1.0, rng) == full.canonical()
    assert len(world.noisy_mentions(full, 1.0, rng, prior=False)) == 8
    text = world.describe(full, noise=1.0, prior=False, seed=4)
    assert len([w for w in text.split() if w in world.THEME_OF]) == 8
    with pytest.raises(ValueError, match="noise"):
        world.noisy_mentions(full, 1.5, rng)
