"""AUTOMATIC1111's txt2img/img2img response ({images, parameters, info}) from our durable job record."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from PIL import Image

from sdstudio.a1111.bodies import Body, Img2ImgBody
from sdstudio.a1111.infotext import parse_infotext
from sdstudio.storage.images import text_chunks, user_comment


def echoed_parameters(body: Body) -> dict[str, Any]:
    """The request as A1111 echoes it; img2img drops the pictures unless include_init_images."""
    params = body.model_dump(mode="json")
    if isinstance(body, Img2ImgBody) and not body.include_init_images:
        params.update(init_images=None, mask=None)
    return params


# Infotext keys A1111 reports as top-level `info` fields rather than in extra_generation_params.
_INFO_KEYS = ("Steps", "Sampler", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash", "Model", "VAE hash", "VAE",
              "Variation seed", "Variation seed strength", "Seed resize from-1", "Seed resize from-2",
              "Denoising strength", "Clip skip", "Version")


def encoded(png: bytes, image_format: str) -> str:
    """A stored PNG as base64 in `image_format`: png as stored; jpg/jpeg/webp as A1111's API encodes them
    (RGB, quality 80 for JPEG, the infotext as EXIF UserComment)."""
    if image_format.lower() == "png":
        return base64.b64encode(png).decode("ascii")
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        infotext = text_chunks(image).get("parameters", "")
        buffer = io.BytesIO()
        kind = "JPEG" if image_format.lower() in ("jpg", "jpeg") else "WEBP"
        image.convert("RGB").save(buffer, format=kind, quality=80, exif=user_comment(infotext))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def a1111_info(record: Mapping[str, Any], styles: list[str] | None = None,
               timestamp: datetime | None = None) -> dict[str, Any]:
    """A1111's `info` object (Processed.js()) for a finished job's durable record (`request`: the resolved
    request as `GenerationRequest.to_dict()` gives it; `seeds` and `infotexts`: one per image)."""
    req, seeds, infotexts = record["request"], record["seeds"], record["infotexts"]
    params = parse_infotext(infotexts[0]).params if infotexts else {}
    n = len(seeds)
    subseeds = [req["subseed"] + i if req["subseed"] >= 0 else -1 for i in range(n)]
    uses_strength = req["enable_hr"] or req["mode"] != "txt2img"
    return {
        "prompt": req["prompt"], "all_prompts": [req["prompt"]] * n,
        "negative_prompt": req["negative_prompt"], "all_negative_prompts": [req["negative_prompt"]] * n,
        "seed": seeds[0] if n else req["seed"], "all_seeds": list(seeds),
        "subseed": subseeds[0] if n else req["subseed"], "all_subseeds": subseeds,
        "subseed_strength": req["subseed_strength"], "width": req["width"], "height": req["height"],
        "sampler_name": req["sampler"], "cfg_scale": req["cfg_scale"], "steps": req["steps"],
        "batch_size": req["batch_size"], "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": params.get("Model", req["model"]), "sd_model_hash": params.get("Model hash"),
        "sd_vae_name": params.get("VAE"), "sd_vae_hash": params.get("VAE hash"),
        "seed_resize_from_w": req["seed_resize_from_w"] or -1, "seed_resize_from_h": req["seed_resize_from_h"] or -1,
        "denoising_strength": req["strength"] if uses_strength else None,
        "extra_generation_params": {k: v for k, v in params.items() if k not in _INFO_KEYS},
        "index_of_first_image": 0, "infotexts": list(infotexts),
        "styles": list(styles or []), "job_timestamp": (timestamp or datetime.now()).strftime("%Y%m%d%H%M%S"),
        "clip_skip": req["clip_skip"],
        "is_using_inpainting_conditioning": req["mode"] == "inpaint" and req["inpaint_method"] == "condition",
        "version": params.get("Version", ""),
    }


def a1111_response(body: Body, record: Mapping[str, Any], pngs: Sequence[bytes],
                   timestamp: datetime | None = None, notes: Sequence[str] = (),
                   image_format: str = "png") -> dict[str, Any]:
    """A1111's txt2img/img2img response: {images: [base64], parameters: the body, info: a JSON string}.
    `pngs`: the job's stored files (they carry the infotext and our record, as A1111's API images do), sent as
    they are, or in A1111's `samples_format` (jpg/webp, the infotext in EXIF). info also lists `warnings`
    (ours: names that fell back, adjustments the engine made), which A1111 lacks."""
    images = [encoded(png, image_format) for png in pngs] if body.send_images else []
    info = a1111_info(record, body.styles, timestamp)
    info["warnings"] = [*notes, *record.get("warnings", [])]
    return {"images": images, "parameters": echoed_parameters(body), "info": json.dumps(info, ensure_ascii=False)}
