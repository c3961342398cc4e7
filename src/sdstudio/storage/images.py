"""Writing images atomically and never over an existing file.

A file is written to a hidden temporary name in the target folder, flushed, then hard-linked to its
final name: the link fails if the name exists (we take the next number), so two writers never clobber
each other and a reader never sees half a file. Names follow A1111: NNNNN-<seed>.png, numbered on.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdstudio.errors import RequestError

_NUMBERED = re.compile(r"^(\d{5,})-")


def dated_folder(root: Path, kind: str, day: date | None = None) -> Path:
    """A1111's layout: <root>/<kind>-images/<YYYY-MM-DD>."""
    return root / f"{kind}-images" / (day or date.today()).isoformat()


def next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))] \
        if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def write_unique(folder: Path, suffix: str, write: Callable[[Path], None]) -> Path:
    """Write with `write(tmp_path)`, then publish as the first free <folder>/NNNNN<suffix>."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{uuid.uuid4().hex}{Path(suffix).suffix}"
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        number = next_number(folder)
        while True:
            final = folder / f"{number:05d}{suffix}"
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                number += 1
    finally:
        tmp.unlink(missing_ok=True)


def png_info(text: Mapping[str, str]) -> PngInfo:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info


def save_png(image: Image.Image, folder: Path, name: str, text: Mapping[str, str]) -> Path:
    """Save as <folder>/NNNNN-<name>.png with the given text chunks; returns the path."""
    return write_unique(folder, f"-{name}.png", lambda p: image.save(p, format="PNG", pnginfo=png_info(text)))


def write_png(image: Image.Image, path: Path, text: Mapping[str, str]) -> Path:
    """Write exactly `path` (replacing it, as PIL's save does) with the given text chunks, atomically: a reader
    sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}.png")
    try:
        image.save(tmp, format="PNG", pnginfo=png_info(text))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_animation(frames: Sequence[Image.Image], path: Path, ms_per_frame: int = 250) -> Path:
    """An animated GIF that loops forever, the last frame held three times as long."""
    durations = [ms_per_frame] * (len(frames) - 1) + [ms_per_frame * 3]
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}.gif")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=list(frames[1:]), duration=durations, loop=0)
    os.replace(tmp, path)
    return path


def read_png_text(path: Path) -> dict[str, str]:
    """The text chunks of an image file (empty for formats without them)."""
    with Image.open(path) as im:
        im.load()
        return text_chunks(im)


def text_chunks(image: Image.Image) -> dict[str, str]:
    """The text chunks of an opened (and loaded) image: PNG tEXt/iTXt, as PIL puts them in `info`; a JPEG's or
    WebP's EXIF UserComment (where A1111 writes the infotext of those) as "parameters"."""
    chunks = {k: v for k, v in image.info.items() if isinstance(v, str)}
    comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes) and "parameters" not in chunks:
        chunks["parameters"] = read_user_comment(comment)
    return chunks


EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD and its UserComment tag
_UNICODE = b"UNICODE\0"                  # UserComment's 8-byte character code: UTF-16 big-endian follows


def user_comment(text: str) -> Image.Exif:
    """EXIF holding `text` as UserComment, encoded as A1111 writes it (piexif's "unicode")."""
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = _UNICODE + text.encode("utf-16-be")
    return exif


def read_user_comment(data: bytes) -> str:
    code, text = data[:8], data[8:]
    if code == _UNICODE:
        return text.decode("utf-16-be", errors="replace")
    return text.decode("ascii" if code.startswith(b"ASCII") else "utf-8", errors="replace").rstrip("\0")


def open_image(path: Path) -> Image.Image:
    """An RGB image from a file, or a RequestError that names the file and the problem."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise RequestError(f"image not found: {path}", "image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"cannot read image {path}: {e}", "image") from None
