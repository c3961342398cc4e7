"""Finding models: a path, or a name looked up in the configured model folders."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sdstudio.errors import ModelError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives. `name` is what users type and what infotext records."""

    name: str
    path: Path

    @property
    def is_diffusers_folder(self) -> bool:
        return (self.path / "model_index.json").is_file()


def is_model_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def scan(models_dirs: Sequence[Path]) -> list[ModelRef]:
    """Models directly inside the given folders: diffusers folders and single files."""
    found: list[ModelRef] = []
    for root in models_dirs:
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if is_model_folder(entry) or (entry.is_file() and entry.suffix in SINGLE_FILE_SUFFIXES):
                found.append(ModelRef(entry.stem if entry.is_file() else entry.name, entry))
    return found


def resolve(name_or_path: str, models_dirs: Sequence[Path]) -> ModelRef:
    """A path to a model, or the name of one in `models_dirs` (with or without its file extension)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _check(ModelRef(path.stem if path.is_file() else path.resolve().name, path))
    wanted = name_or_path.strip().lower()
    known = scan(models_dirs)
    for ref in known:
        if wanted in (ref.name.lower(), ref.path.name.lower()):
            return _check(ref)
    names = ", ".join(r.name for r in known) or "none"
    folders = ", ".join(str(d) for d in models_dirs)
    raise ModelError(
        f"unknown model {name_or_path!r}: not a path, and no model of that name in {folders}. "
        f"Available models: {names}"
    )


def _check(ref: ModelRef) -> ModelRef:
    if ref.path.is_file():
        if ref.path.suffix in SINGLE_FILE_SUFFIXES:
            raise ModelError(
                f"{ref.path.name} is a single-file checkpoint; this version loads diffusers folders "
                "(a folder with model_index.json) only. Single-file loading arrives with model support."
            )
        raise ModelError(f"{ref.path} is not a model: expected a diffusers folder with model_index.json")
    if not ref.is_diffusers_folder:
        raise ModelError(f"{ref.path} is not a model folder: it has no model_index.json")
    try:
        json.loads((ref.path / "model_index.json").read_text())
    except ValueError as e:
        raise ModelError(f"{ref.path / 'model_index.json'} is not valid JSON: {e}") from None
    return ref
