"""AUTOMATIC1111 `/sdapi/v1` txt2img/img2img JSON <-> our typed requests and results. Pure translation:
no server, no engine calls (server routes validate a body, call `to_generation_request`, queue the job,
and answer with `a1111_response`).

Field names and defaults are A1111's (modules/api/models.py, modules/processing.py); unknown fields are
ignored, as clients send many. What sdstudio cannot honour (restore_faces, tiling, scripts, ...) is a
RequestError naming the field, which the routes answer with 422.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from datetime import datetime
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdstudio.engine.control import fit
from sdstudio.engine.infotext import parse_infotext
from sdstudio.engine.output import INFOTEXT_CHUNK, RECORD_CHUNK, to_json
from sdstudio.engine.requests import ControlUnit, GenerationRequest, GenerationResult
from sdstudio.errors import RequestError
from sdstudio.samplers import resolve_sampler
from sdstudio.server.a1111_options import A1111Options
from sdstudio.storage.images import png_info

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3
IMG2IMG_RESIZE = ("just resize", "crop", "fill", "just resize")  # resize_mode 0..3 (3: "latent upscale")
SAME_SAMPLER = ("", "use same sampler")
SAME_SCHEDULER = ("", "use same scheduler")
SAME_CHECKPOINT = ("", "use same checkpoint")
CONTROLNET_SCRIPT = "controlnet"


class _Body(BaseModel):
    """Fields txt2img and img2img share, with A1111's defaults. Nullable where A1111 clients send null."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None           # ignored: sdstudio has no saved styles
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"               # A1111's deprecated name; used when sampler_name is empty
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    denoising_strength: float | None = 0.75
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)


class Txt2ImgBody(_Body):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionTxt2ImgProcessingAPI)."""

    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgBody(_Body):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionImg2ImgProcessingAPI); inpainting when `mask` is set."""

    init_images: list[Any] | None = None
    resize_mode: int = Field(0, ge=0, le=3)
    mask: str | None = None
    mask_blur: int | None = None
    mask_blur_x: int = 4
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


def parse_body(model: type[_Body], data: Any) -> _Body:
    """A body model from decoded JSON; pydantic's complaint becomes a RequestError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(f"{name}: {first['msg']} (got {first.get('input')!r:.80})", name) from None


def decode_image(data: Any, field: str) -> Image.Image:
    """An image from base64, with or without a `data:image/...;base64,` prefix; clear errors otherwise."""
    if not isinstance(data, str) or not data.strip():
        raise RequestError(f"{field} must be a base64-encoded image, got {type(data).__name__}", field)
    text = data.strip()
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise RequestError(f"{field} is a data URL without ';base64': send the image base64-encoded", field)
    text = "".join(text.split())
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field} is not valid base64 (send the image file's bytes base64-encoded)",
                           field) from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError):
        raise RequestError(f"{field} is base64 but not an image PIL can read (send PNG, JPEG or WebP)",
                           field) from None
    return image


def check_supported(body: _Body) -> None:
    """Refuse what sdstudio cannot do rather than silently doing something else."""
    if body.restore_faces:
        raise RequestError("restore_faces is not supported by sdstudio: send restore_faces false", "restore_faces")
    if body.tiling:
        raise RequestError("tiling is not supported by sdstudio: send tiling false", "tiling")
    if body.script_name:
        raise RequestError(f"script {body.script_name!r} is not supported: sdstudio runs no A1111 scripts; "
                           "send script_name null", "script_name")
    for name, script in body.alwayson_scripts.items():
        if name.lower() != CONTROLNET_SCRIPT and _script_args(script, name):
            raise RequestError(f"alwayson_scripts: {name!r} is not supported; only ControlNet is "
                               "(remove the entry, or send it with empty or false args)", "alwayson_scripts")
    if isinstance(body, Txt2ImgBody) and (body.hr_checkpoint_name or "").lower() not in SAME_CHECKPOINT:
        raise RequestError("hr_checkpoint_name is not supported: hires fix uses the same checkpoint; "
                           "send null", "hr_checkpoint_name")


def _script_args(script: Any, name: str) -> list[Any]:
    """A script's args with falsy ones dropped (clients send {"args": [False]} for installed but off scripts)."""
    if not isinstance(script, dict) or not isinstance(script.get("args", []), list):
        raise RequestError(f"alwayson_scripts.{name} must be {{\"args\": [...]}}", "alwayson_scripts")
    return [a for a in script.get("args", []) if a]


def to_generation_request(body: _Body, options: A1111Options | None = None) -> GenerationRequest:
    """Our request for an A1111 txt2img or img2img body; `options` fills what override_settings leaves."""
    check_supported(body)
    opts = (options or A1111Options()).updated(body.override_settings or {})
    sampler = (body.sampler_name or body.sampler_index or "Euler").strip()
    schedule = (body.scheduler or "Automatic").strip()
    try:
        choice = resolve_sampler(sampler, schedule)
    except RequestError as e:
        raise RequestError(str(e), "sampler_name" if e.field == "sampler" else "scheduler") from None
    fields: dict[str, Any] = dict(
        prompt=body.prompt, negative_prompt=body.negative_prompt or "", width=body.width, height=body.height,
        steps=body.steps, cfg_scale=body.cfg_scale, sampler=choice.sampler.name, schedule=choice.requested_schedule,
        seed=body.seed, subseed=body.subseed, subseed_strength=body.subseed_strength,
        seed_resize_from_w=max(body.seed_resize_from_w, 0), seed_resize_from_h=max(body.seed_resize_from_h, 0),
        batch_size=body.batch_size, n_iter=body.n_iter, model=opts.sd_model_checkpoint, vae=opts.vae,
        clip_skip=opts.clip_skip,
        strength=0.75 if body.denoising_strength is None else body.denoising_strength,
    )
    if isinstance(body, Txt2ImgBody):
        fields.update(_hires_fields(body))
    elif isinstance(body, Img2ImgBody):
        fields.update(_img2img_fields(body))
    fields["controlnets"] = tuple(controlnet_units(body.alwayson_scripts))
    return GenerationRequest(**fields)


def _hires_fields(body: Txt2ImgBody) -> dict[str, Any]:
    if not body.enable_hr:
        return {}
    hr_sampler = body.hr_sampler_name or ""
    hr_scheduler = body.hr_scheduler or ""
    return dict(enable_hr=True, hr_scale=body.hr_scale, hr_resize_x=body.hr_resize_x, hr_resize_y=body.hr_resize_y,
                hr_upscaler=body.hr_upscaler or "Latent", hr_second_pass_steps=body.hr_second_pass_steps,
                hr_sampler_name="" if hr_sampler.lower() in SAME_SAMPLER else hr_sampler,
                hr_scheduler="" if hr_scheduler.lower() in SAME_SCHEDULER else hr_scheduler,
                hr_prompt=body.hr_prompt, hr_negative_prompt=body.hr_negative_prompt)


def _img2img_fields(body: Img2ImgBody) -> dict[str, Any]:
    """The init image (and mask) fitted to width x height by A1111's resize_mode, and the inpaint fields."""
    images = body.init_images or []
    if len(images) != 1:
        raise RequestError(f"init_images must hold exactly one base64 image, got {len(images)}", "init_images")
    init = decode_image(images[0], "init_images[0]").convert("RGB")
    mask = decode_image(body.mask, "mask").convert("L") if body.mask else None
    only_masked = mask is not None and body.inpaint_full_res
    mode = IMG2IMG_RESIZE[body.resize_mode]
    if mode != "just resize" and not only_masked:  # "just resize" is the engine's own stretch
        init = fit(init, body.width, body.height, mode)
        if mask is not None:
            mask = _fit_mask(mask, body.width, body.height, mode)
    fields: dict[str, Any] = {"init_image": init}
    if mask is not None:
        fields.update(mask=mask, mask_blur=body.mask_blur_x if body.mask_blur is None else body.mask_blur,
                      masked_content=MASKED_CONTENT[body.inpainting_fill], only_masked=only_masked,
                      only_masked_padding=body.inpaint_full_res_padding,
                      invert_mask=bool(body.inpainting_mask_invert))
    return fields


def _fit_mask(mask: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    if mode == "crop":
        return ImageOps.fit(mask, (width, height), Image.Resampling.LANCZOS)
    return ImageOps.pad(mask, (width, height), Image.Resampling.LANCZOS, color=0)


# ---- ControlNet (the sd-webui-controlnet extension's API unit) ----

# A1111 module names by prefix -> our preprocessors; inpaint_only+lama fills with LaMa, which we lack.
_MODULE_PREFIXES = (("inpaint_only+lama", None), ("inpaint", "inpaint"), ("canny", "canny"),
                    ("scribble", "scribble"), ("invert", "invert"), ("lineart", "lineart"), ("tile", "tile"),
                    ("blur", "blur"), ("shuffle", "shuffle"), ("openpose", "openpose"), ("dw_openpose", "openpose"),
                    ("depth", "depth"))
_RESIZE_MODES = {"just resize": "just resize", "crop and resize": "crop", "resize and fill": "fill",
                 "envelope (outer fit)": "crop", "scale to fit (inner fit)": "fill",
                 "0": "just resize", "1": "crop", "2": "fill"}
_CONTROL_MODES = {"balanced": False, "controlnet is more important": True, "0": False, "2": True}


def controlnet_module(name: str | None) -> str:
    """A1111 ControlNet module -> our preprocessor: "canny" -> canny, "inpaint_only" -> inpaint, ..."""
    key = (name or "none").strip().lower()
    if key in ("none", ""):
        return "none"
    for prefix, ours in _MODULE_PREFIXES:
        if key.startswith(prefix):
            if ours is None:
                break
            return ours
    known = ", ".join(p for p, ours in _MODULE_PREFIXES if ours)
    raise RequestError(f"ControlNet module {name!r} is not supported; use none or one of (any variant of): {known}",
                       "alwayson_scripts.ControlNet.module")


def controlnet_units(scripts: dict[str, Any]) -> list[ControlUnit]:
    """The enabled units of `alwayson_scripts.ControlNet.args`."""
    entry = next((v for k, v in scripts.items() if k.lower() == CONTROLNET_SCRIPT), None)
    if entry is None:
        return []
    units = []
    for i, arg in enumerate(_script_args(entry, "ControlNet")):
        if not isinstance(arg, dict):
            raise RequestError(f"alwayson_scripts.ControlNet.args[{i}] must be an object with named fields "
                               "(enabled, image, module, model, weight, ...)", "alwayson_scripts")
        if arg.get("enabled", True):
            units.append(controlnet_unit(arg, i))
    return units


def controlnet_unit(arg: dict[str, Any], index: int = 0) -> ControlUnit:
    where = f"alwayson_scripts.ControlNet.args[{index}]"
    model = arg.get("model")
    if not isinstance(model, str) or model.strip().lower() in ("", "none"):
        raise RequestError(f"{where}.model must name a ControlNet model, got {model!r}", f"{where}.model")
    image = arg.get("image", arg.get("input_image"))
    if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...} form
        image, unit_mask = image.get("image"), image.get("mask")
    else:
        unit_mask = arg.get("mask") or arg.get("mask_image")
    if unit_mask:
        raise RequestError(f"{where}: per-unit ControlNet masks are not supported; send mask null", f"{where}.mask")
    preprocessor = controlnet_module(arg.get("module"))
    low, high = arg.get("threshold_a", -1), arg.get("threshold_b", -1)
    canny = preprocessor == "canny"
    return ControlUnit(
        model=model.strip(), image=decode_image(image, f"{where}.image") if image else None,
        preprocessor=preprocessor, weight=_number(arg, "weight", 1.0, where),
        start=_number(arg, "guidance_start", 0.0, where), end=_number(arg, "guidance_end", 1.0, where),
        guess_mode=_control_mode(arg, where), resize_mode=_lookup(_RESIZE_MODES, arg.get("resize_mode", 1), where,
                                                                  "resize_mode"),
        low_threshold=int(low) if canny and _given(low) else 100,
        high_threshold=int(high) if canny and _given(high) else 200,
    )


def _number(arg: dict[str, Any], name: str, default: float, where: str) -> float:
    value = arg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{where}.{name} must be a number, got {value!r}", f"{where}.{name}")
    return float(value)


def _given(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _control_mode(arg: dict[str, Any], where: str) -> bool:
    if arg.get("guess_mode"):  # the extension's pre-1.1 name for "ControlNet is more important"
        return True
    mode = str(arg.get("control_mode", 0)).strip().lower()
    if mode in ("1", "my prompt is more important"):
        raise RequestError(f"{where}.control_mode 'My prompt is more important' is not supported; use Balanced "
                           "or 'ControlNet is more important'", f"{where}.control_mode")
    return _lookup(_CONTROL_MODES, mode, where, "control_mode")


def _lookup(table: dict[str, Any], value: Any, where: str, name: str) -> Any:
    key = str(value).strip().lower()
    if key not in table:
        raise RequestError(f"{where}.{name} {value!r} is not one of {', '.join(repr(k) for k in table)}",
                           f"{where}.{name}")
    return table[key]


# ---- responses ----

def encode_png(image: Image.Image, infotext: str, record: dict[str, Any] | None = None) -> str:
    """Base64 PNG carrying the infotext as the `parameters` chunk (as A1111's API does) and our record."""
    text = {INFOTEXT_CHUNK: infotext, **({RECORD_CHUNK: to_json(record)} if record else {})}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(text))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def echoed_parameters(body: _Body) -> dict[str, Any]:
    """The request as A1111 echoes it; img2img drops the pictures unless include_init_images."""
    params = body.model_dump(mode="json")
    if isinstance(body, Img2ImgBody) and not body.include_init_images:
        params.update(init_images=None, mask=None)
    return params


# Infotext keys A1111 reports as top-level `info` fields rather than in extra_generation_params.
_INFO_KEYS = ("Steps", "Sampler", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash", "Model", "VAE hash", "VAE",
              "Variation seed", "Variation seed strength", "Seed resize from-1", "Seed resize from-2",
              "Denoising strength", "Clip skip", "Version")


def a1111_info(result: GenerationResult, styles: list[str] | None = None,
               timestamp: datetime | None = None) -> dict[str, Any]:
    """A1111's `info` object (Processed.js()) for a finished job."""
    req = result.request
    params = parse_infotext(result.images[0].infotext).params if result.images else {}
    n = len(result.images)
    subseeds = [req.subseed + im.index if req.subseed >= 0 else -1 for im in result.images]
    uses_strength = req.enable_hr or req.mode != "txt2img"
    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * n,
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * n,
        "seed": result.images[0].seed if n else req.seed, "all_seeds": [im.seed for im in result.images],
        "subseed": subseeds[0] if n else req.subseed, "all_subseeds": subseeds,
        "subseed_strength": req.subseed_strength, "width": req.width, "height": req.height,
        "sampler_name": req.sampler, "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": params.get("Model", req.model), "sd_model_hash": params.get("Model hash"),
        "sd_vae_name": params.get("VAE"), "sd_vae_hash": params.get("VAE hash"),
        "seed_resize_from_w": req.seed_resize_from_w or -1, "seed_resize_from_h": req.seed_resize_from_h or -1,
        "denoising_strength": req.strength if uses_strength else None,
        "extra_generation_params": {k: v for k, v in params.items() if k not in _INFO_KEYS},
        "index_of_first_image": 0, "infotexts": [im.infotext for im in result.images],
        "styles": list(styles or []), "job_timestamp": (timestamp or datetime.now()).strftime("%Y%m%d%H%M%S"),
        "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": req.mode == "inpaint" and req.inpaint_method == "condition",
        "version": params.get("Version", ""),
    }


def a1111_response(body: _Body, result: GenerationResult, timestamp: datetime | None = None) -> dict[str, Any]:
    """A1111's txt2img/img2img response: {images: [base64 PNG], parameters: the body, info: a JSON string}."""
    images = [encode_png(im.image, im.infotext, im.record) for im in result.images] if body.send_images else []
    info = a1111_info(result, body.styles, timestamp)
    return {"images": images, "parameters": echoed_parameters(body), "info": json.dumps(info, ensure_ascii=False)}
