"""Results to disk and back: PNGs with A1111 infotext + the sdstudio record, captures, animations."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sdstudio.engine.infotext import parse_infotext, request_fields
from sdstudio.engine.record import request_from_record
from sdstudio.engine.requests import Capture, GenerationResult
from sdstudio.errors import RequestError
from sdstudio.storage.images import dated_folder, read_png_text, save_animation, save_png

RECORD_CHUNK = "sdstudio"
INFOTEXT_CHUNK = "parameters"


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


def save_result(result: GenerationResult, root: Path) -> list[SavedImage]:
    """Save every image into <root>/<mode>-images/<date>/NNNNN-<seed>.png (captures beside it)."""
    folder = dated_folder(root, "img2img" if result.request.mode == "inpaint" else result.request.mode)  # as A1111
    saved = []
    for im in result.images:
        text = {INFOTEXT_CHUNK: im.infotext, RECORD_CHUNK: to_json(im.record)}
        path = save_png(im.image, folder, str(im.seed), text)
        capture_dir = save_capture(im.capture, path.with_name(path.stem + "-denoise")) if im.capture else None
        saved.append(SavedImage(path, capture_dir))
    return saved


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
        xt.save(folder / f"step-{step:03d}-xt.png")
        x0.save(folder / f"step-{step:03d}-x0.png")
        lat.save(folder / f"step-{step:03d}-latents.png")
    save_animation(animation_frames(capture), folder / "denoise.gif")
    return folder


def animation_frames(capture: Capture) -> list[Image.Image]:
    """Side-by-side frames for an animation: decoded x_t on the left, predicted x0 on the right."""
    frames = []
    for left, right in zip(capture.decoded, capture.denoised, strict=True):
        frame = Image.new("RGB", (left.width + right.width, left.height))
        frame.paste(left, (0, 0))
        frame.paste(right, (left.width, 0))
        frames.append(frame)
    return frames


@dataclass(frozen=True)
class ImageMetadata:
    infotext: str | None
    record: dict[str, Any] | None

    def request_fields(self) -> dict[str, Any]:
        """Fields that reproduce the image: from the sdstudio record if present, else the infotext."""
        if self.record is not None:
            return request_from_record(self.record)
        if self.infotext is not None:
            return request_fields(parse_infotext(self.infotext))
        return {}


def read_metadata(path: Path) -> ImageMetadata:
    try:
        chunks = read_png_text(path)
    except (OSError, Image.DecompressionBombError) as e:
        raise RequestError(f"cannot read image {path}: {e}", "image") from None
    record = None
    if RECORD_CHUNK in chunks:
        try:
            record = json.loads(chunks[RECORD_CHUNK])
        except ValueError:
            record = None
    return ImageMetadata(chunks.get(INFOTEXT_CHUNK), record)
