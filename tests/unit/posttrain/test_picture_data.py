"""Drawn pictures say what their captions and answers say: checked from the pixels alone."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from herd.posttrain import picture_data as pd

pytest.importorskip("PIL")
ndimage = pytest.importorskip("scipy.ndimage")


def _blobs(img) -> list[tuple[str, float]]:
    """(colour, fill ratio of its bounding box) for each connected blob of a palette colour."""
    a = np.asarray(img).astype(int)
    out = []
    for name, rgb in pd.COLOURS.items():
        mask = (np.abs(a - np.array(rgb)).sum(-1) == 0)
        labels, n = ndimage.label(mask)
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            out.append((name, len(ys) / box))
    return out


def _shape_of(fill: float) -> str:
    # square ~1.0, circle ~pi/4 = 0.785, triangle ~0.5: far enough apart to classify by fill alone
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def test_captions_count_the_blobs_in_the_pixels():
    scenes = [s for s in pd.make_scenes(60, seed=3) if s.digit is None]
    assert len(scenes) > 30
    for scene in scenes:
        blobs = _blobs(pd.draw(scene))
        seen = Counter((colour, _shape_of(fill)) for colour, fill in blobs)
        assert seen == Counter((it.colour, it.shape) for it in scene.items), scene.caption()


def test_answers_agree_with_the_pixels():
    rng = random.Random(0)
    for scene in pd.make_scenes(40, seed=5):
        if scene.digit is not None:
            continue
        blobs = _blobs(pd.draw(scene))
        for q, a in scene.questions(rng):
            if q == "How many shapes are there?":
                assert a == str(len(blobs))
            elif q.startswith("How many "):
                shape = q.split()[2][:-1]
                assert a == str(sum(_shape_of(f) == shape for _, f in blobs))
            elif q.startswith("Is there anything "):
                colour = q.split()[3].rstrip("?")
                assert a == ("yes" if any(c == colour for c, _ in blobs) else "no")
            else:  # What colour is the SHAPE?
                shape = q.split()[-1].rstrip("?")
                assert [c for c, f in blobs if _shape_of(f) == shape] == [a]


def test_digits_are_drawn_large_and_differ():
    pictures = {d: np.asarray(pd.draw(pd.Scene(size=64, digit=d))) for d in range(10)}
    for d, a in pictures.items():
        ink = (np.abs(a.astype(int) - np.array(pd.DIGIT_INK)).sum(-1) < 60).mean()
        assert 0.03 < ink < 0.5, (d, ink)
    assert len({a.tobytes() for a in pictures.values()}) == 10


def test_scenes_are_deterministic_and_captions_read_well():
    assert [s.caption() for s in pd.make_scenes(5, seed=1)] == [s.caption() for s in pd.make_scenes(5, seed=1)]
    scene = pd.Scene(size=64, items=[pd.Item("square", "blue", (0, 0, 10, 10)), pd.Item("circle", "red", (20, 0, 30, 10)),
                                     pd.Item("circle", "red", (40, 0, 50, 10))])
    assert scene.caption() == "2 red circles and 1 blue square."
    assert pd.Scene(size=64, digit=7).caption() == "The digit 7."


def test_answer_matching():
    assert pd.answer_matches("Two.", "2") and pd.answer_matches(" blue, I think", "blue")
    assert not pd.answer_matches("", "2") and not pd.answer_matches("3", "2")


def test_write_picture_set(tmp_path):
    scenes = pd.make_scenes(6, seed=2, size=48)
    out = pd.write_picture_set(tmp_path / "pics", scenes)
    caps = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    qs = [json.loads(x) for x in (out / "questions.jsonl").read_text().splitlines()]
    assert len(caps) == 6 and all((out / c["image"]).is_file() for c in caps)
    assert {q["image"] for q in qs} <= {c["image"] for c in caps}
    with pytest.raises(FileExistsError):
        pd.write_picture_set(tmp_path / "pics", scenes)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 32"):
        pd.make_scenes(1, size=16)
    with pytest.raises(ValueError, match="max_items"):
        pd.make_scenes(1, max_items=0)
    with pytest.raises(ValueError, match="positive"):
        pd.make_scenes(0)
