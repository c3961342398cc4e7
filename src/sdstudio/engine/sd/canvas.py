"""Where an inpainting job's pixels come from and where they go back: "only masked" crops and paste-back.

Masks here are greyscale images, 255 = repaint. The binary mask is `grey >= 128` (seed 000's threshold).
Paste-back improves seed 000's recipe `(1 - m) * init + m * repainted`: the seam is feathered *inside*
the mask, alpha = clamp(2 * blur(m) - 1, 0, 1) * m, so every pixel outside the mask is the user's pixel
exactly while the repainted area fades in over about two blur radii (for a straight edge at distance d
inside, blur(m) = Phi(d / sigma), so alpha rises from 0 at the edge to 0.95 at d = 2 sigma).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)


def user_mask(mask: Image.Image, size: tuple[int, int], invert: bool) -> Image.Image:
    """The mask as greyscale at `size`, inverted as asked; unblurred."""
    grey = mask.convert("L")
    if invert:
        grey = ImageOps.invert(grey)
    return grey if grey.size == size else grey.resize(size, Image.Resampling.LANCZOS)


def blurred(mask: Image.Image, radius: int) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def is_empty(mask: Image.Image, invert: bool, soft: bool = False) -> bool:
    """True when nothing would be repainted: no pixel >= 128 after inverting (soft inpainting: no pixel > 0,
    since every grey value is a strength)."""
    grey = np.asarray(user_mask(mask, mask.size, invert))
    return not (grey > 0 if soft else grey >= 128).any()


def seam_alpha(mask: Image.Image, feather: int) -> Image.Image:
    """Paste-back alpha (module docstring): 0 outside the binary mask, feathered inward by `feather` px."""
    binary = (np.asarray(mask, np.float32) >= 128).astype(np.float32)
    if feather <= 0:
        return Image.fromarray((binary * 255).astype(np.uint8))
    spread = np.asarray(blurred(Image.fromarray((binary * 255).astype(np.uint8)), feather), np.float32) / 255
    alpha = np.clip(2 * spread - 1, 0, 1) * binary
    return Image.fromarray(np.round(alpha * 255).astype(np.uint8))


def crop_box(mask: Image.Image, padding: int, aspect: float) -> Box:
    """A1111's "only masked" region: the bounding box of every non-zero mask pixel, grown by `padding`
    on each side, then grown (centred, within the image) to the width/height ratio `aspect` of the
    resolution the crop is generated at, so scaling it there does not stretch it."""
    width, height = mask.size
    left, top, right, bottom = mask.point(lambda v: 255 if v > 0 else 0).getbbox() or (0, 0, width, height)
    left, top = max(0, left - padding), max(0, top - padding)
    right, bottom = min(width, right + padding), min(height, bottom + padding)
    w, h = right - left, bottom - top
    if w / h < aspect:
        left, right = _grow(left, right, round(h * aspect), width)
    else:
        top, bottom = _grow(top, bottom, round(w / aspect), height)
    return left, top, right, bottom


def _grow(lo: int, hi: int, want: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) to `want` (at most `limit`) around its centre, shifted to stay inside [0, limit)."""
    want = min(want, limit)
    lo = max(0, min(lo - (want - (hi - lo)) // 2, limit - want))
    return lo, lo + want


@dataclass(frozen=True)
class Canvas:
    """How a generated picture goes back into the user's image.

    original: the init image (RGB) at the output size; box: the region the job generated, scaled into
    it (the whole image unless "only masked"); alpha: "L", 255 where generated pixels are kept, None to
    keep the whole generated box (no paste-back)."""

    original: Image.Image
    box: Box
    alpha: Image.Image | None

    @property
    def cropped(self) -> bool:
        return self.box != (0, 0, *self.original.size)

    def finish(self, picture: Image.Image) -> Image.Image:
        left, top, right, bottom = self.box
        size = (right - left, bottom - top)
        if picture.size != size:
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        if size == self.original.size and self.alpha is None:
            return picture
        out = self.original.copy()
        out.paste(picture, (left, top))
        return out if self.alpha is None else Image.composite(out, self.original, self.alpha)


@dataclass(frozen=True)
class InpaintSource:
    """What the job generates from: image and grey mask at the request's resolution, and its canvas."""

    image: Image.Image  # RGB, request size
    mask: Image.Image   # "L", request size, blurred
    canvas: Canvas


def inpaint_source(image: Image.Image, mask: Image.Image, width: int, height: int, *, blur: int, invert: bool,
                   only_masked: bool, padding: int, keep_unmasked: bool, soft: bool) -> InpaintSource:
    """Prepare an inpainting job: the whole picture at width x height, or only the masked region
    (output at the image's own size, the region generated at width x height and scaled back)."""
    image = image.convert("RGB")
    if not only_masked:
        image = image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)
    grey = user_mask(mask, image.size, invert)
    soft_mask = blurred(grey, blur)
    alpha = (soft_mask if soft else seam_alpha(grey, blur)) if keep_unmasked else None
    box = crop_box(soft_mask, padding, width / height) if only_masked else (0, 0, *image.size)
    canvas = Canvas(image, box, alpha)
    if box == (0, 0, width, height) and image.size == (width, height):
        return InpaintSource(image, soft_mask, canvas)
    scale = (width, height)
    return InpaintSource(image.crop(box).resize(scale, Image.Resampling.LANCZOS),
                         soft_mask.crop(box).resize(scale, Image.Resampling.LANCZOS), canvas)
