"""Labelled image grids (the X/Y/Z plot's): a title on top, column labels under it, row labels on the left.

Drawn with PIL's default font at A1111's size, (cell width + cell height) // 25, at least 10 px; labels
wrap at word boundaries to the space they have. Images of different sizes sit centred in equal cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass(frozen=True)
class GridLayout:
    left: int                  # row-label margin, pixels (0 without row labels)
    top: int                   # title + column-label margin, pixels
    cell_size: tuple[int, int]


def grid_font(cell_width: int, cell_height: int) -> Any:
    return ImageFont.load_default(max(10, (cell_width + cell_height) // 25))


def text_width(text: str, font: Any) -> int:
    return math.ceil(font.getlength(text))


def wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than that gets a line of its own."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and text_width(trial, font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines or [""]


def draw_grid(rows: Sequence[Sequence[Image.Image]], column_labels: Sequence[str], row_labels: Sequence[str],
              title: str | None = None) -> tuple[Image.Image, GridLayout]:
    """rows[j][i] is the image in row j, column i; labels may be empty (no margin is drawn for them)."""
    cw = max(im.width for row in rows for im in row)
    ch = max(im.height for row in rows for im in row)
    nx, ny = max(len(row) for row in rows), len(rows)
    font = grid_font(cw, ch)
    line_h = font.getbbox("Ag")[3] + 2
    pad = max(2, line_h // 3)
    columns = [wrap(t, font, cw - 2 * pad) for t in column_labels]
    side = [wrap(t, font, max(cw, 96)) for t in row_labels]
    left = max(text_width(s, font) for lines in side for s in lines) + 2 * pad if row_labels else 0
    labels_h = max(len(c) for c in columns) * line_h + 2 * pad if column_labels else 0
    width = left + nx * cw
    heading = wrap(title, font, width - 2 * pad) if title else []
    title_h = len(heading) * line_h + 2 * pad if title else 0
    top = title_h + labels_h
    grid = Image.new("RGB", (width, top + ny * ch), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    _centred(draw, heading, font, width / 2, pad, line_h)
    for i, lines in enumerate(columns):  # bottom-aligned above their column
        y = title_h + labels_h - pad - len(lines) * line_h
        _centred(draw, lines, font, left + i * cw + cw / 2, y, line_h)
    for j, lines in enumerate(side):     # vertically centred beside their row
        _centred(draw, lines, font, left / 2, top + j * ch + (ch - len(lines) * line_h) / 2, line_h)
    for j, row in enumerate(rows):
        for i, im in enumerate(row):
            grid.paste(im.convert("RGB"), (left + i * cw + (cw - im.width) // 2, top + j * ch + (ch - im.height) // 2))
    return grid, GridLayout(left, top, (cw, ch))


def _centred(draw: ImageDraw.ImageDraw, lines: Sequence[str], font: Any, cx: float, y: float, line_h: int) -> None:
    for k, line in enumerate(lines):
        draw.text((round(cx - text_width(line, font) / 2), round(y + k * line_h)), line, font=font, fill=INK)
