"""A deterministic analyser for shape images: background colour, shape colour, position, shape type.

Background: the median colour of the 2-pixel border. Shape: pixels far (> 80 in RGB distance) from
the background; colour: their median. Position: the centre of the mask's bounding box, in thirds
of the image.
Type: the shape template, fitted to the mask's bounding box, with the best intersection over union.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdstudio.train.shapes import COLOURS, POSITIONS

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], np.float32)  # (8, 3)


@dataclass(frozen=True)
class Analysis:
    background: str
    colour: str | None      # None when no shape was found
    position: tuple[int, int] | None
    shape: str | None

    @property
    def position_phrase(self) -> str | None:
        return POSITIONS[self.position] if self.position else None


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(1)))]


def analyse(image: Image.Image) -> Analysis:
    px = np.asarray(image.convert("RGB"), np.float32)  # (H, W, 3)
    h, w, _ = px.shape
    border = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3), px[:, :2].reshape(-1, 3),
                             px[:, -2:].reshape(-1, 3)])
    bg = np.median(border, 0)
    mask = np.sqrt(((px - bg) ** 2).sum(-1)) > 80
    if mask.sum() < 4:
        return Analysis(nearest_colour(bg), None, None, None)
    ys, xs = np.nonzero(mask)
    colour = nearest_colour(np.median(px[mask], 0))
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    position = (min(int(cy / h * 3), 2), min(int(cx / w * 3), 2))
    return Analysis(nearest_colour(bg), colour, position, shape_type(mask))


def shape_type(mask: np.ndarray) -> str:
    """The template (circle, square, triangle apex up, diamond) filling the mask's bounding box that
    overlaps the mask best (intersection over union)."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = box.shape
    v, u = np.mgrid[0:h, 0:w]
    v, u = (v + 0.5) / h * 2 - 1, (u + 0.5) / w * 2 - 1   # [-1, 1] box coordinates, y down
    templates = {
        "circle": u * u + v * v <= 1,
        "square": np.ones_like(box),
        "triangle": np.abs(u) <= (v + 1) / 2,
        "diamond": np.abs(u) + np.abs(v) <= 1,
    }
    iou = {name: (t & box).sum() / (t | box).sum() for name, t in templates.items()}
    return max(iou, key=iou.get)
