"""A GenerationRequest as the JSON the job queue stores, pictures included (base64 PNG), and back.

The queue must be able to rebuild the exact request after a restart, so unlike the image record
(which keeps only a picture's size and hash) the payload carries the pictures themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sdstudio.engine.requests import IMAGES, TUPLE_FIELDS, ControlUnit, GenerationRequest, IpAdapterUnit
from sdstudio.engine.validate import MAX_IP_IMAGES
from sdstudio.errors import RequestError
from sdstudio.pictures import DEFAULT_UPLOAD_PIXELS, image_to_b64
from sdstudio.pictures import decode_image as image_from_b64


def encode_request(req: GenerationRequest) -> dict[str, Any]:
    """JSON-ready fields with every picture as base64 PNG; tensors (init_latents) cannot be queued."""
    if getattr(req, "init_latents", None) is not None:
        raise RequestError("init_latents cannot be sent through the job queue: send an image", "init_latents")
    fields = {k: v for k, v in req.flat_fields().items()
              if k not in (*IMAGES, "init_latents", "controlnets", "ip_adapters")}
    for name in IMAGES:
        image = getattr(req, name)
        fields[name] = image_to_b64(image) if image is not None else None
    fields["controlnets"] = [
        {**{f.name: getattr(u, f.name) for f in dataclasses.fields(u) if f.name != "image"},
         "image": image_to_b64(u.image) if u.image is not None else None}
        for u in req.controlnets]
    fields["ip_adapters"] = [
        {**{f.name: getattr(u, f.name) for f in dataclasses.fields(u) if f.name != "images"},
         "images": [image_to_b64(im) for im in u.images]}
        for u in req.ip_adapters]
    return fields


def decode_request(payload: dict[str, Any], max_pixels: int = DEFAULT_UPLOAD_PIXELS,
                   max_units: int | None = None) -> GenerationRequest:
    """The inverse of encode_request; each picture's size is checked against `max_pixels` before decoding, and
    the number of ControlNet units against `max_units` before any of their pictures is."""
    if not isinstance(payload, dict):
        raise RequestError("the request must be an object of GenerationRequest fields", "request")
    fields = {k: v for k, v in payload.items()
              if k in GenerationRequest.field_names() and k not in ("controlnets", "ip_adapters")}
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
    adapters = ip_adapter_units(payload.get("ip_adapters") or [], max_pixels, max_units)
    # the fields' types are checked by Engine.prepare
    return GenerationRequest.from_flat(**fields, controlnets=tuple(units), ip_adapters=adapters)


def ip_adapter_units(given: object, max_pixels: int, max_units: int | None) -> tuple[IpAdapterUnit, ...]:
    """[{"model": ..., "images": [b64, ...], "weight": ..., "start": ..., "end": ..., "encoder": ...}] -> units;
    counts are checked before any picture is decoded."""
    if not isinstance(given, list) or not all(isinstance(u, dict) for u in given):
        raise RequestError("ip_adapters must be a list of unit objects ({\"model\": ..., \"images\": [...]})",
                           "ip_adapters")
    if max_units is not None and len(given) > max_units:
        raise RequestError(f"{len(given)} IP-Adapter units; the limit is {max_units}", "ip_adapters")
    units = []
    for i, unit in enumerate(given):
        if not isinstance(unit.get("model"), str) or not unit["model"].strip():
            raise RequestError(f"ip_adapters[{i}].model must name an IP-Adapter (GET /api/v1/catalog lists them)",
                               "ip_adapters.model")
        images = unit.get("images") or ([unit["image"]] if unit.get("image") else [])
        if not isinstance(images, list) or not 1 <= len(images) <= MAX_IP_IMAGES:
            raise RequestError(f"ip_adapters[{i}].images must be a list of 1 to {MAX_IP_IMAGES} base64 pictures",
                               "ip_adapters.images")
        pictures = tuple(image_from_b64(im, "ip_adapters.images", max_pixels) for im in images)
        units.append(dataclasses.replace(IpAdapterUnit.from_dict(unit), images=pictures))
    return tuple(units)
