"""Preview pictures kept next to a LoRA or embedding, found as A1111's extra-networks cards find them:
`name.png` or `name.preview.png` (also .jpg, .jpeg, .webp) beside `name.safetensors`."""

from __future__ import annotations

from pathlib import Path

PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def preview_of(path: Path) -> Path | None:
    """The preview picture of the file at `path`, or None."""
    stem = path.with_suffix("").name
    for middle in ("", ".preview"):
        for suffix in PREVIEW_SUFFIXES:
            candidate = path.with_name(f"{stem}{middle}{suffix}")
            if candidate.is_file():
                return candidate
    return None
