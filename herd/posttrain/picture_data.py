"""Pictures with known content, for training and testing an image adapter offline.

The Llama 3 paper trains the vision adapter on image-caption pairs, then fine-tunes it on
question-answer pairs about images. Nothing can be downloaded here, so the pictures are drawn:
each scene is a few coloured shapes (circle, square, triangle) on a light background, or one
large digit. Because the drawing is ours, every caption and answer is true by construction, and
accuracy can be scored exactly (`answer_matches`).

Scenes never overlap their shapes (each sits in its own cell of a jittered grid, with a margin),
so the pictures can also be checked from their pixels alone: one connected blob of a colour per
shape (tests/unit/posttrain/test_picture_data.py does this, an independent check of the captions).

`make_scenes(n, seed)` is deterministic; `write_picture_set` writes PNGs plus `captions.jsonl`
(one caption per picture) and `questions.jsonl` (question/answer pairs) into a folder atomically.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 240)
DIGIT_INK = (20, 20, 20)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Item:
    """One drawn shape: kind, colour name and its box (left, top, right, bottom) in pixels."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]


@dataclass
class Scene:
    """A picture's content: shapes, or a single digit (then `items` is empty)."""

    size: int
    items: list[Item] = field(default_factory=list)
    digit: int | None = None

    def caption(self) -> str:
        """One sentence naming everything in the picture, in a fixed order (so it can be learned exactly)."""
        if self.digit is not None:
            return f"The digit {self.digit}."
        counts = Counter((it.colour, it.shape) for it in self.items)
        parts = [f"{n} {colour} {shape}{'s' if n > 1 else ''}"
                 for (colour, shape), n in sorted(counts.items(), key=lambda kv: (SHAPES.index(kv[0][1]),
                                                                                   list(COLOURS).index(kv[0][0])))]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return text[0].upper() + text[1:] + "."

    def questions(self, rng: random.Random) -> list[tuple[str, str]]:
        """Question/answer pairs whose answers are one word or number, true by construction."""
        if self.digit is not None:
            return [("What digit is shown?", str(self.digit)),
                    ("Is the digit even or odd?", "even" if self.digit % 2 == 0 else "odd")]
        out = [("How many shapes are there?", str(len(self.items)))]
        shape = rng.choice(SHAPES)
        out.append((f"How many {shape}s are there?", str(sum(it.shape == shape for it in self.items))))
        colour = rng.choice(list(COLOURS))
        present = any(it.colour == colour for it in self.items)
        out.append((f"Is there anything {colour}?", "yes" if present else "no"))
        lone = [s for s in SHAPES if sum(it.shape == s for it in self.items) == 1]
        if lone:
            s = rng.choice(lone)
            out.append((f"What colour is the {s}?", next(it.colour for it in self.items if it.shape == s)))
        return out


def random_scene(rng: random.Random, *, size: int = 112, max_items: int = 4, digit_share: float = 0.2) -> Scene:
    """A random scene: with probability digit_share one digit, else 1..max_items shapes."""
    if size < 32:
        raise ValueError(f"pictures must be at least 32 pixels wide to hold a shape, got {size}")
    if not 1 <= max_items <= 9:
        raise ValueError(f"max_items must be between 1 and 9 (a 3 x 3 grid of cells), got {max_items}")
    if rng.random() < digit_share:
        return Scene(size=size, digit=rng.randrange(10))
    grid = 2 if max_items <= 4 else 3
    cell = size // grid
    cells = rng.sample(range(grid * grid), rng.randint(1, max_items))
    items = []
    for c in cells:
        row, col = divmod(c, grid)
        side = rng.randint(cell * 5 // 10, cell * 7 // 10)  # leaves >= 15% of the cell as margin
        left = col * cell + rng.randint(cell // 10, cell - side - cell // 10)
        top = row * cell + rng.randint(cell // 10, cell - side - cell // 10)
        items.append(Item(rng.choice(SHAPES), rng.choice(list(COLOURS)), (left, top, left + side, top + side)))
    return Scene(size=size, items=items)


def draw(scene: Scene):
    """The scene as a Pillow RGB image."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    pen = ImageDraw.Draw(img)
    if scene.digit is not None:
        font = ImageFont.load_default(size=int(scene.size * 0.7))
        pen.text((scene.size / 2, scene.size / 2), str(scene.digit), fill=DIGIT_INK, font=font, anchor="mm")
        return img
    for it in scene.items:
        fill = COLOURS[it.colour]
        left, top, right, bottom = it.box
        if it.shape == "circle":
            pen.ellipse((left, top, right - 1, bottom - 1), fill=fill)
        elif it.shape == "square":
            pen.rectangle((left, top, right - 1, bottom - 1), fill=fill)
        else:
            pen.polygon([((left + right - 1) / 2, top), (left, bottom - 1), (right - 1, bottom - 1)], fill=fill)
    return img


def make_scenes(n: int, *, seed: int = 0, size: int = 112, max_items: int = 4, digit_share: float = 0.2) -> list[Scene]:
    """n random scenes, the same ones for the same arguments."""
    if n < 1:
        raise ValueError(f"n must be a positive number of pictures, got {n}")
    rng = random.Random(seed)
    return [random_scene(rng, size=size, max_items=max_items, digit_share=digit_share) for _ in range(n)]


def answer_matches(predicted: str, answer: str) -> bool:
    """Whether a generated answer says the expected one: its first word, case and punctuation aside;
    number words count as their digits ("two" == "2")."""
    words = predicted.strip().lower().replace(".", " ").replace(",", " ").split()
    if not words:
        return False
    first = words[0]
    if first in NUMBER_WORDS:
        first = str(NUMBER_WORDS.index(first))
    return first == answer.lower()


def write_picture_set(out_dir: str | Path, scenes: list[Scene], *, seed: int = 0, overwrite: bool = False) -> Path:
    """PNG per scene plus captions.jsonl and questions.jsonl, written as one directory atomically."""
    from herd.io import atomic_dir

    rng = random.Random(seed)

    def write(tmp: Path) -> None:
        (tmp / "images").mkdir()
        captions, questions = [], []
        for i, scene in enumerate(scenes):
            name = f"images/{i:05d}.png"
            draw(scene).save(tmp / name, format="PNG")
            captions.append({"image": name, "caption": scene.caption()})
            questions += [{"image": name, "question": q, "answer": a} for q, a in scene.questions(rng)]
        (tmp / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
        (tmp / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))

    return atomic_dir(out_dir, write, overwrite=overwrite)
