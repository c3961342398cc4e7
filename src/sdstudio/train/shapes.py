"""A procedural dataset: one coloured shape on a plain background, with a caption.

    "a small red circle at the top left on a blue background"

Shapes x colours x sizes x 3x3 positions x background colours, drawn anti-aliased (4x supersampling)
with a little positional jitter. Everything is a pure function of (seed, index), so the dataset is
deterministic, can be streamed without files, and resumes at any index.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SIZES = {"small": 0.30, "large": 0.48}  # shape side / image side
# 3x3 grid: (row, column) -> phrase
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "at the left", (1, 1): "in the center", (1, 2): "at the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    background: str
    size: str
    position: tuple[int, int]
    jitter: tuple[float, float] = (0.0, 0.0)  # centre offset as a fraction of the image side

    def caption(self, with_size: bool = True, with_position: bool = True) -> str:
        size = f"{self.size} " if with_size else ""
        where = f" {POSITIONS[self.position]}" if with_position else ""
        return f"a {size}{self.colour} {self.shape}{where} on a {self.background} background"


@cache
def held_out() -> frozenset[tuple[str, str, str]]:
    """(shape, colour, background) triples never drawn for training: the evaluation's test set.

    Every shape, colour and background is still seen in training, only not in these combinations."""
    rng = random.Random(2024)
    triples = [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if c != b]
    return frozenset(rng.sample(triples, 24))


def sample_spec(rng: random.Random, exclude: frozenset[tuple[str, str, str]] = frozenset()) -> ShapeSpec:
    while True:
        shape, colour, background = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(COLOURS))
        if colour != background and (shape, colour, background) not in exclude:
            break
    position = (rng.randrange(3), rng.randrange(3))
    jitter = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
    return ShapeSpec(shape, colour, background, rng.choice(list(SIZES)), position, jitter)


def centre(spec: ShapeSpec) -> tuple[float, float]:
    """Centre (x, y) as fractions of the side: thirds of the image, kept inside the frame."""
    half = SIZES[spec.size] / 2
    row, col = spec.position
    x = min(max((col + 0.5) / 3 + spec.jitter[0], half + 0.02), 1 - half - 0.02)
    y = min(max((row + 0.5) / 3 + spec.jitter[1], half + 0.02), 1 - half - 0.02)
    return x, y


def draw(spec: ShapeSpec, size: int = 64) -> Image.Image:
    big = size * SUPERSAMPLE
    im = Image.new("RGB", (big, big), COLOURS[spec.background])
    cx, cy = (v * big for v in centre(spec))
    h = SIZES[spec.size] * big / 2
    box = (cx - h, cy - h, cx + h, cy + h)
    fill = COLOURS[spec.colour]
    d = ImageDraw.Draw(im)
    if spec.shape == "circle":
        d.ellipse(box, fill=fill)
    elif spec.shape == "square":
        d.rectangle(box, fill=fill)
    elif spec.shape == "triangle":
        d.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif spec.shape == "diamond":
        d.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    return im.resize((size, size), Image.Resampling.BOX)


@dataclass(frozen=True)
class ShapesDataset:
    """Item i is a pure function of (seed, i): (image, caption). Captions sometimes leave out the size
    and the position (30% each), so that prompts naming fewer attributes work too."""

    seed: int = 0
    size: int = 64
    exclude_held_out: bool = True

    def spec(self, index: int) -> tuple[ShapeSpec, str]:
        rng = random.Random(f"{self.seed}:{index}")
        spec = sample_spec(rng, held_out() if self.exclude_held_out else frozenset())
        return spec, spec.caption(with_size=rng.random() > 0.3, with_position=rng.random() > 0.3)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        spec, caption = self.spec(index)
        return draw(spec, self.size), caption


def write_dataset(out: Path, count: int, seed: int = 0, size: int = 64) -> Path:
    """NNNNN.png + NNNNN.txt pairs (the kohya / A1111 captioned-folder convention)."""
    out.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(seed, size)
    for i in range(count):
        image, caption = data[i]
        image.save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(caption + "\n")
    return out
