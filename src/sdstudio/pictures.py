"""Pictures at the doors: base64 to image and back, and fitting an image to a size (A1111's resize modes)."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from sdstudio.errors import RequestError

DEFAULT_UPLOAD_PIXELS = 4096 * 4096  # an uploaded picture's width x height (Limits.max_upload_pixels)


def decode_image(data: Any, field: str, max_pixels: int = DEFAULT_UPLOAD_PIXELS) -> Image.Image:
    """An image from base64, with or without a `data:image/...;base64,` prefix; clear errors otherwise. Its size
    is read from the header and checked against `max_pixels` before any pixel is decoded (a small PNG can
    claim 30000 x 30000)."""
    if not isinstance(data, str) or not data.strip():
        raise RequestError(f"{field} must be a base64-encoded image, got {type(data).__name__}", field)
    text = data.strip()
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise RequestError(f"{field} is a data URL without ';base64': send the image base64-encoded", field)
    text = "".join(text.split())
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field} is not valid base64 (send the image file's bytes base64-encoded)",
                           field) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > max_pixels:
                raise RequestError(f"{field} is {image.width}x{image.height} pixels; the limit for an uploaded "
                                   f"picture is {max_pixels} pixels: send a smaller picture", field)
            image.load()
    except Image.DecompressionBombError:
        raise RequestError(f"{field} claims more pixels than any picture may have (a decompression bomb); "
                           f"the limit is {max_pixels} pixels", field) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(f"{field} is base64 but not an image PIL can read (send PNG, JPEG or WebP)",
                           field) from None
    return image


def fit(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """The control image at width x height: stretched ("just resize"), scaled to cover and centre-cropped
    ("crop"), or scaled to fit and padded with black, which reads as "no control" ("fill")."""
    image = image.convert("RGB")
    if mode == "crop":
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    if mode == "fill":
        return ImageOps.pad(image, (width, height), Image.Resampling.LANCZOS, color=(0, 0, 0))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def image_to_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def fit_mask(mask: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    if mode == "crop":
        return ImageOps.fit(mask, (width, height), Image.Resampling.LANCZOS)
    return ImageOps.pad(mask, (width, height), Image.Resampling.LANCZOS, color=0)
