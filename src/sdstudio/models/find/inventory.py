"""What `sdstudio models list` shows: name, family, A1111 short hash, size and where each model is."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstudio.errors import ModelError
from sdstudio.models.find.catalog import ModelRef
from sdstudio.models.find.hashing import HashCache, short_hash, weight_files
from sdstudio.models.load.checkpoint_io import header_shapes, read_metadata
from sdstudio.models.load.families import FAMILY_INFO, detect_family, sidecar_says_v
from sdstudio.models.load.flow import flow_family, listing_family
from sdstudio.models.load.kandinsky import is_kandinsky_folder, kandinsky_family
from sdstudio.models.load.ldm_layout import read_family_from_folder
from sdstudio.models.tools.convert import FAMILY_KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str       # a FAMILY_INFO key, or a note such as "merge recipe"
    hash: str | None  # A1111 short hash (10 hex), None when not computed
    size: int         # bytes on disk
    path: Path
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "hash": self.hash, "size": self.size,
                "path": str(self.path), "source": self.source}


def family_of(ref: ModelRef) -> str:
    """The family, found without loading weights (a .ckpt is only inspected when loaded)."""
    try:
        if ref.kind != "recipe" and flow_family(ref.path):
            return listing_family(ref.path)
        if ref.kind == "diffusers":
            return kandinsky_family(ref.path) if is_kandinsky_folder(ref.path) else read_family_from_folder(ref.path)
        if ref.kind == "recipe":
            return "merge recipe"
        if ref.path.suffix != ".safetensors":
            return "checkpoint (pickle; detected on load)"
        metadata = read_metadata(ref.path)
        if FAMILY_KEY in metadata:
            return metadata[FAMILY_KEY]
        return detect_family(header_shapes(ref.path), v_prediction=sidecar_says_v(ref.path))
    except (ModelError, OSError, ValueError) as e:
        return f"unknown ({e})"


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in weight_files(path))


def describe(ref: ModelRef, hashes: HashCache | None) -> ModelInfo:
    """hashes None: skip hashing (hashing a multi-GB file takes seconds; results are cached)."""
    digest = short_hash(hashes.model_sha256(ref.path)) if hashes is not None else None
    return ModelInfo(ref.name, family_of(ref), digest, size_of(ref.path), ref.path, ref.source)


FLOW_LABELS = {"sd3": "SD3", "sd3.5-medium": "SD3.5 medium", "sd3.5-large": "SD3.5 large", "flux-dev": "Flux.1 dev",
               "flux-schnell": "Flux.1 schnell"}


def family_label(family: str) -> str:
    return FAMILY_INFO[family].label if family in FAMILY_INFO else FLOW_LABELS.get(family, family)
