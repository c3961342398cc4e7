"""Outpainting: a larger canvas with the new area pre-filled and masked, run as an inpainting request.

The mask also covers `overlap` pixels of the original along each extended side, so the seam is
repainted and the feathered paste-back (canvas.seam_alpha) blends it into the user's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from sdstudio.engine.requests import GenerationRequest
from sdstudio.engine.sd.inpaint import fill_masked
from sdstudio.errors import RequestError

PREFILLS = ("edge", "blur", "noise")  # edge stretch, blurred surrounding colour, colour-matched noise
GRID = 8  # the canvas is rounded up to a multiple of this (the latent factor of every SD family)


@dataclass(frozen=True)
class Extension:
    """Pixels added on each side."""

    left: int = 0
    right: int = 0
    up: int = 0
    down: int = 0

    def check(self, limit: int) -> None:
        for name in ("left", "right", "up", "down"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
                raise RequestError(f"{name} must be a whole number of pixels between 0 and {limit}, got {value!r}",
                                   name)
        if not (self.left or self.right or self.up or self.down):
            raise RequestError("outpainting needs at least one side to extend: give left, right, up or down", "left")

    def to_grid(self, width: int, height: int) -> Extension:
        """Round the new canvas up to the latent grid, the extra pixels on an extended side."""
        dx, dy = -(width + self.left + self.right) % GRID, -(height + self.up + self.down) % GRID
        left, right = (self.left, self.right + dx) if self.right or not self.left else (self.left + dx, self.right)
        up, down = (self.up, self.down + dy) if self.down or not self.up else (self.up + dy, self.down)
        return Extension(left, right, up, down)


def extend_canvas(image: Image.Image, ext: Extension, prefill: str, overlap: int,
                  seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """The larger canvas (RGB) with the new area pre-filled, and its mask ("L", 255 = repaint)."""
    if prefill not in PREFILLS:
        raise RequestError(f"prefill must be one of {', '.join(PREFILLS)}, got {prefill!r}", "prefill")
    rgb = np.asarray(image.convert("RGB"))
    pad = ((ext.up, ext.down), (ext.left, ext.right), (0, 0))
    height, width = rgb.shape[0] + ext.up + ext.down, rgb.shape[1] + ext.left + ext.right
    mask = Image.new("L", (width, height), 255)
    inner = (ext.left + (overlap if ext.left else 0), ext.up + (overlap if ext.up else 0),
             ext.left + rgb.shape[1] - (overlap if ext.right else 0) - 1,
             ext.up + rgb.shape[0] - (overlap if ext.down else 0) - 1)
    if inner[2] >= inner[0] and inner[3] >= inner[1]:
        ImageDraw.Draw(mask).rectangle(inner, fill=0)
    if prefill == "edge":
        return Image.fromarray(np.pad(rgb, pad, mode="edge")), mask
    new = np.ones((height, width), bool)
    new[ext.up:ext.up + rgb.shape[0], ext.left:ext.left + rgb.shape[1]] = False
    canvas = np.pad(rgb, pad, mode="constant")
    if prefill == "blur":
        area = Image.fromarray((new * 255).astype(np.uint8))
        sigma = min(max(ext.left, ext.right, ext.up, ext.down) / 2, 48.0)  # wider blurs only cost time
        return fill_masked(Image.fromarray(canvas), area, sigma=max(sigma, 2.0)), mask
    # noise with the image's own per-channel mean and spread, so the sampler starts from its palette
    rng = np.random.default_rng(seed)
    flat = rgb.reshape(-1, 3).astype(np.float32)
    noise = rng.normal(flat.mean(0), flat.std(0) + 1.0, size=(height, width, 3))
    canvas = np.where(new[..., None], np.clip(noise, 0, 255).astype(np.uint8), canvas)
    return Image.fromarray(canvas), mask


def outpaint_request(req: GenerationRequest, image: Image.Image, ext: Extension, prefill: str = "blur",
                     overlap: int = 8, limit: int = 4096) -> GenerationRequest:
    """An inpainting request that extends `image` by `ext` (rounded to the latent grid)."""
    ext.check(limit)
    ext = ext.to_grid(*image.size)
    canvas, mask = extend_canvas(image, ext, prefill, overlap, max(req.seed, 0))
    return req.replace(init_image=canvas, mask=mask, width=None, height=None, only_masked=False,
                       invert_mask=False, masked_content="original")
