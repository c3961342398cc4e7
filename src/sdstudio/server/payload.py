"""A GenerationRequest as the JSON the job queue stores, pictures included (base64 PNG), and back.

The queue must be able to rebuild the exact request after a restart, so unlike the image record
(which keeps only a picture's size and hash) the payload carries the pictures themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sdstudio.engine.requests import IMAGES, TUPLE_FIELDS, ControlUnit, GenerationRequest
from sdstudio.errors import RequestError
from sdstudio.pictures import DEFAULT_UPLOAD_PIXELS, image_to_b64
from sdstudio.pictures import decode_image as image_from_b64


def encode_request(req: GenerationRequest) -> dict[str, Any]:
    """JSON-ready fields with every picture as base64 PNG; tensors (init_latents) cannot be queued."""
    if getattr(req, "init_latents", None) is not None:
        raise RequestError("init_latents cannot be sent through the job queue: send an image", "init_latents")
    fields = {k: v for k, v in req.flat_fields().items() if k not in (*IMAGES, "init_latents", "controlnets")}
    for name in IMAGES:
        image = getattr(req, name)
        fields[name] = image_to_b64(image) if image is not None else None
    fields["controlnets"] = [
        {**{f.name: getattr(u, f.name) for f in dataclasses.fields(u) if f.name != "image"},
         "image": image_to_b64(u.image) if u.image is not None else None}
        for u in req.controlnets]
    return fields


def decode_request(payload: dict[str, Any], max_pixels: int = DEFAULT_UPLOAD_PIXELS,
                   max_units: int | None = None) -> GenerationRequest:
    """The inverse of encode_request; each picture's size is checked against `max_pixels` before decoding, and
    the number of ControlNet units against `max_units` before any of their pictures is."""
    if not isinstance(payload, dict):
        raise RequestError("the request must be an object of GenerationRequest fields", "request")
    fields = {k: v for k, v in payload.items() if k in GenerationRequest.field_names() and k != "controlnets"}
    for name in TUPLE_FIELDS:  # JSON has no tuples
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    for name in IMAGES:
        if payload.get(name):
            fields[name] = image_from_b64(payload[name], name, max_pixels)
    units = []
    given = payload.get("controlnets") or []
    if not isinstance(given, list) or not all(isinstance(u, dict) for u in given):
        raise RequestError("controlnets must be a list of unit objects ({\"model\": ..., \"image\": ...})",
                           "controlnets")
    if max_units is not None and len(given) > max_units:
        raise RequestError(f"{len(given)} ControlNet units; the limit is {max_units}", "controlnets")
    for i, unit in enumerate(given):
        if not isinstance(unit.get("model"), str) or not unit["model"].strip():
            raise RequestError(f"controlnets[{i}].model must name a ControlNet (GET /api/v1/catalog lists them)",
                               "controlnets.model")
        image = image_from_b64(unit["image"], "controlnets.image", max_pixels) if unit.get("image") else None
        units.append(ControlUnit(**{**ControlUnit.from_dict(unit).__dict__, "image": image}))
    return GenerationRequest.from_flat(**fields, controlnets=tuple(units))  # types: checked by Engine.prepare
