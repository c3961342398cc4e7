"""The machine-readable record stored with every image (the `sdstudio` PNG chunk, JSON).

It holds the whole resolved request, the image's own seed and index, the model and its hash, the
sampler with the exact scheduler config, library versions, device and dtype: enough to re-run.
"""

from __future__ import annotations

import logging
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from sdstudio.a1111.infotext import parse_infotext, request_fields
from sdstudio.engine.requests import GenerationRequest
from sdstudio.storage.results import ImageMetadata

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RECORD_FORMAT = "sdstudio/1"
LIBRARIES = ("sdstudio", "torch", "diffusers", "transformers")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {**library_versions(), "device": str(device), "dtype": str(dtype).removeprefix("torch.")}


def image_record(req: GenerationRequest, index: int, seed: int, model: dict[str, Any],
                 sampler: dict[str, Any], env: dict[str, Any], addons: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": RECORD_FORMAT,
        "request": req.to_dict(),
        "image": {"index": index, "seed": seed},
        "model": model,
        "sampler": sampler,
        "environment": env,
        **({"addons": addons} if addons else {}),
    }


def request_from_record(record: dict[str, Any]) -> dict[str, Any]:
    """Request fields that re-create exactly this image: its own seed, as a batch of one."""
    if record.get("format") != RECORD_FORMAT:
        raise ValueError(f"unknown record format {record.get('format')!r}")
    fields = {k: v for k, v in record["request"].items() if k in GenerationRequest.field_names()}
    fields.update(seed=record["image"]["seed"], batch_size=1, n_iter=1)
    if fields.get("subseed_strength", 0) > 0:  # a variation: the image's own variation seed (A1111's subseed + k)
        fields["subseed"] += record["image"]["index"]
    return fields


def read_fields(meta: ImageMetadata) -> tuple[str | None, dict[str, Any]]:
    """(source, fields) that reproduce an image: source "sdstudio" (read from our record), "a1111" (from the
    infotext) or None (the image states no parameters; fields {})."""
    if meta.record is not None:
        try:
            return "sdstudio", request_from_record(meta.record)
        except (ValueError, KeyError, TypeError) as e:  # a record of another format: fall back to the text
            log.warning("ignoring the image's sdstudio record: %s", e)
    if meta.infotext is not None:
        return "a1111", request_fields(parse_infotext(meta.infotext))
    return None, {}


def image_fields(meta: ImageMetadata) -> dict[str, Any]:
    """Fields that reproduce the image: from the sdstudio record if present, else the infotext."""
    return read_fields(meta)[1]
