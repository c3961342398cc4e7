"""Results to disk and back: PNGs with A1111 infotext + the sdstudio record, captures, animations.

Storage knows the shape of a result (the protocols below), not the engine: engine/requests.py's results have it.
Turning metadata read back into request fields is the engine's (engine/record.py)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from sdstudio.errors import RequestError
from sdstudio.storage.images import dated_folder, read_png_text, save_animation, save_png, text_chunks, write_png

log = logging.getLogger(__name__)

RECORD_CHUNK = "sdstudio"
INFOTEXT_CHUNK = "parameters"
CAPTURE_KINDS = ("xt", "x0", "latents")  # a captured step: decoded x_t, predicted x0, the latent channels
CAPTURE_ANIMATION = "denoise.gif"


class Capture(Protocol):
    """The denoising process of one image: 1-based step numbers and the pictures of each step."""

    steps: list[int]
    decoded: list[Image.Image]
    denoised: list[Image.Image]
    latents: list[Image.Image]


class Savable(Protocol):
    """One generated image with its metadata."""

    image: Image.Image
    seed: int
    infotext: str
    record: dict[str, Any]
    capture: Capture | None


class SavableResult(Protocol):
    @property
    def images(self) -> Sequence[Savable]: ...

    @property
    def mode(self) -> str: ...


@dataclass(frozen=True)
class SavedImage:
    path: Path
    capture_dir: Path | None


def to_json(data: Any) -> str:
    """Strict JSON (readable by browsers): non-finite floats become the strings "inf", "-inf", "nan"."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(data), ensure_ascii=False, allow_nan=False)


def save_result(result: SavableResult, root: Path) -> list[SavedImage]:
    """Save every image into <root>/<mode>-images/<date>/NNNNN-<seed>.png (captures beside it)."""
    folder = dated_folder(root, "img2img" if result.mode == "inpaint" else result.mode)  # as A1111
    saved = []
    for im in result.images:
        text = {INFOTEXT_CHUNK: im.infotext, RECORD_CHUNK: to_json(im.record)}
        path = save_png(im.image, folder, str(im.seed), text)
        capture_dir = save_capture(im.capture, path.with_name(path.stem + "-denoise")) if im.capture else None
        saved.append(SavedImage(path, capture_dir))
    return saved


def save_image(image: Savable, path: Path) -> Path:
    """One image at exactly `path`, carrying its infotext and record (captures are saved by save_result)."""
    return write_png(image.image, path, {INFOTEXT_CHUNK: image.infotext, RECORD_CHUNK: to_json(image.record)})


def save_grid(image: Image.Image, text: dict[str, str], root: Path, mode: str = "txt2img",
              name: str = "grid") -> Path:
    """Save a grid (text chunks given) into <root>/<mode>-grids/<date>/NNNNN-<name>.png, as A1111."""
    day = dated_folder(root, mode).name  # today, as the images' folders
    return save_png(image, root / f"{mode}-grids" / day, name, text)


def save_capture(capture: Capture, folder: Path) -> Path:
    """step-NNN-xt.png (decoded latents), step-NNN-x0.png (predicted x0), step-NNN-latents.png,
    and denoise.gif (x_t beside x0, every captured step)."""
    folder.mkdir(parents=True, exist_ok=True)
    for step, xt, x0, lat in zip(capture.steps, capture.decoded, capture.denoised, capture.latents, strict=True):
        for kind, picture in zip(CAPTURE_KINDS, (xt, x0, lat), strict=True):
            picture.save(folder / capture_frame_name(step, kind))
    save_animation(animation_frames(capture), folder / CAPTURE_ANIMATION)
    return folder


def capture_frame_name(step: int, kind: str) -> str:
    """step-NNN-<kind>.png; kind one of CAPTURE_KINDS."""
    return f"step-{step:03d}-{kind}.png"


def animation_frames(capture: Capture) -> list[Image.Image]:
    """Side-by-side frames for an animation: decoded x_t on the left, predicted x0 on the right."""
    frames = []
    for left, right in zip(capture.decoded, capture.denoised, strict=True):
        frame = Image.new("RGB", (left.width + right.width, left.height))
        frame.paste(left, (0, 0))
        frame.paste(right, (left.width, 0))
        frames.append(frame)
    return frames


def saved_entries(images: Sequence[Savable], saved: Sequence[SavedImage], root: Path) -> dict[str, list[Any]]:
    """Per image, what history keeps: file and capture folder (relative to `root`), captured step numbers,
    seed and infotext; each a list in image order."""
    return {
        "images": [str(s.path.relative_to(root)) for s in saved],
        "seeds": [im.seed for im in images],
        "infotexts": [im.infotext for im in images],
        "captures": [str(s.capture_dir.relative_to(root)) if s.capture_dir else None for s in saved],
        "capture_steps": [list(im.capture.steps) if im.capture else [] for im in images],
    }


@dataclass(frozen=True)
class ImageMetadata:
    infotext: str | None
    record: dict[str, Any] | None


def metadata_from_chunks(chunks: Mapping[str, str]) -> ImageMetadata:
    """ImageMetadata from PNG text chunks: the A1111 infotext and our JSON record (None if unreadable)."""
    record = None
    if RECORD_CHUNK in chunks:
        try:
            record = json.loads(chunks[RECORD_CHUNK])
        except ValueError:
            record = None
    return ImageMetadata(chunks.get(INFOTEXT_CHUNK), record if isinstance(record, dict) else None)


def image_metadata(image: Image.Image) -> ImageMetadata:
    """The metadata of an already opened image (e.g. one sent as base64)."""
    return metadata_from_chunks(text_chunks(image))


def read_metadata(path: Path) -> ImageMetadata:
    try:
        chunks = read_png_text(path)
    except (OSError, Image.DecompressionBombError) as e:
        raise RequestError(f"cannot read image {path}: {e}", "image") from None
    return metadata_from_chunks(chunks)
