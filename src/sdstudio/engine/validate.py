"""Request validation at the door: every message says what to fix."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from PIL import Image

from sdstudio.a1111.names import MASKED_CONTENT  # our masked-content modes are A1111's
from sdstudio.engine.requests import HIRES_KEYS, VARIATION_KEYS, ControlUnit, GenerationRequest, IpAdapterUnit
from sdstudio.engine.sd.control import RESIZE_MODES
from sdstudio.engine.sd.guidance import check_guidance
from sdstudio.engine.sd.handoff import check_handoff, check_latent_channels, latents_size
from sdstudio.engine.sd.hires import check_hires, resolve_hires
from sdstudio.engine.sd.inpaint import INPAINT_METHODS
from sdstudio.engine.sd.preprocess import ALL_PREPROCESSORS
from sdstudio.engine.sd.variation import MAX_SEED, check_variation, resolve_variation
from sdstudio.errors import RequestError
from sdstudio.prompts.build import PROMPT_SYNTAXES
from sdstudio.samplers import SamplerChoice, resolve_sampler, zero_snr_samplers
from sdstudio.settings import Limits


@dataclass(frozen=True)
class ModelGeometry:
    """What validation needs to know about the model: its latent factor and native size."""

    factor: int
    native_size: int
    text_layers: int = 12  # the shallowest text encoder's depth: clip skip must stay within it
    latent_channels: int = 4


_NONE = type(None)
_BREAK = re.compile(r"\bBREAK\b")
MAX_CFG = 100.0  # classifier-free guidance scale; A1111's UI stops at 30
MAX_SHIFT = 100.0  # a flow model's sigma shift (SD3.5: 3, Flux-schnell: 1)
MAX_IP_IMAGES = 4  # pictures per IP-Adapter unit: each is one CLIP encoder pass, and tokens in every attention
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {  # declared type -> (accepted, how messages say it)
    "str": ((str,), "text"), "str | None": ((str, _NONE), "text or null"),
    "int": ((int,), "a whole number"), "int | None": ((int, _NONE), "a whole number or null"),
    "float": ((int, float), "a number"), "float | None": ((int, float, _NONE), "a number or null"),
    "bool": ((bool,), "true or false"),
}


def check_types(req: GenerationRequest) -> None:
    """Every plain field holds its declared type (JSON doors can send anything): a clear error otherwise.
    The groups' fields are named by the JSON's keys (hr_scale, subseed, ...)."""
    _check_plain_types(req, lambda name: name)
    for group, keys in ((req.hires, HIRES_KEYS), (req.variation, VARIATION_KEYS)):
        if dataclasses.is_dataclass(group):
            json_key = {ours: key for key, ours in keys.items()}
            _check_plain_types(group, json_key.__getitem__)


def _check_plain_types(obj: object, key: Callable[[str], str]) -> None:
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if str(f.type) not in _TYPES:
            continue
        allowed, kind = _TYPES[str(f.type)]
        value = getattr(obj, f.name)
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            raise RequestError(f"{key(f.name)} must be {kind}, got {value!r:.60}", key(f.name))


def check_fields(req: GenerationRequest, limits: Limits) -> SamplerChoice:
    """Checks that need no model: ranges, counts and sampler names (`check_types` has passed)."""
    check_int(req.steps, "steps", 1, limits.max_steps)
    check_int(req.batch_size, "batch_size", 1, limits.max_batch_size)
    check_int(req.n_iter, "n_iter", 1, limits.max_n_iter)
    check_int(req.capture_every, "capture_every", 0, limits.max_steps)
    if not isinstance(req.cfg_scale, int | float) or not 0 <= req.cfg_scale <= MAX_CFG:
        raise RequestError(f"cfg_scale must be a number from 0 to {MAX_CFG}, got {req.cfg_scale!r}", "cfg_scale")
    for name, top in (("distilled_cfg_scale", MAX_CFG), ("shift", MAX_SHIFT)):
        value = getattr(req, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= top:
            raise RequestError(f"{name} must be a number from 0 to {top}, got {value!r}", name)
    if not isinstance(req.strength, int | float) or not 0.0 <= req.strength <= 1.0:
        raise RequestError(f"strength must be between 0 and 1, got {req.strength!r}", "strength")
    check_int(req.seed, "seed", -1, MAX_SEED - req.total_images)
    check_variation(req, limits)
    if not isinstance(req.prompt, str) or not isinstance(req.negative_prompt, str):
        raise RequestError("prompt and negative_prompt must be text", "prompt")
    for name in ("prompt", "negative_prompt"):
        check_text(getattr(req, name), name, limits)
    if req.total_images > limits.max_images:
        raise RequestError(f"batch_size x n_iter is {req.total_images}; the limit is {limits.max_images} images "
                           "per job", "n_iter")
    for name in ("width", "height"):
        value = getattr(req, name)
        if value is not None:
            check_int(value, name, limits.min_side, limits.max_side)
    if req.width and req.height and req.width * req.height > limits.max_pixels:
        raise RequestError(f"{req.width}x{req.height} is {req.width * req.height} pixels; the limit is "
                           f"{limits.max_pixels}", "width")
    check_choice(req.prompt_syntax, PROMPT_SYNTAXES, "prompt_syntax")
    check_int(req.clip_skip, "clip_skip", 1, 12)
    check_int(req.eta_noise_seed_delta, "eta_noise_seed_delta", 0, 2**32 - 1)
    if req.mask is not None and req.init_image is None:
        raise RequestError("a mask needs an init image to inpaint", "mask")
    check_int(req.mask_blur, "mask_blur", 0, 64)
    check_choice(req.masked_content, MASKED_CONTENT, "masked_content")
    check_choice(req.inpaint_method, INPAINT_METHODS, "inpaint_method")
    check_int(req.only_masked_padding, "only_masked_padding", 0, limits.max_side)
    for name in ("invert_mask", "only_masked", "keep_unmasked", "soft_inpainting", "zero_terminal_snr"):
        if not isinstance(getattr(req, name), bool):
            raise RequestError(f"{name} must be true or false, got {getattr(req, name)!r}", name)
    if req.eta is not None and not 0.0 <= req.eta <= 1.0:  # the type: check_types
        raise RequestError(f"eta must be between 0 and 1 (or null for the sampler's own), got {req.eta!r}", "eta")
    if not isinstance(req.guidance_rescale, int | float) or not 0.0 <= req.guidance_rescale <= 1.0:
        raise RequestError(f"guidance_rescale must be between 0 and 1, got {req.guidance_rescale!r}",
                           "guidance_rescale")
    _check_pair(req.original_size, "original_size", "(width, height)", 1, allow_none=True)
    _check_pair(req.crop_left_top, "crop_left_top", "(left, top)", 0)
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if not isinstance(getattr(req, name), int | float) or not 0 <= getattr(req, name) <= 10:
            raise RequestError(f"{name} must be a number from 0 to 10, got {getattr(req, name)!r}", name)
    if not isinstance(req.controlnets, tuple | list):
        raise RequestError(f"controlnets must be a list of ControlNet units, got {req.controlnets!r}", "controlnets")
    if len(req.controlnets) > limits.max_controlnet_units:
        raise RequestError(f"{len(req.controlnets)} ControlNet units; the limit is {limits.max_controlnet_units}",
                           "controlnets")
    for unit in req.controlnets:
        _check_unit(unit)
        if unit.preprocessor == "inpaint" and req.mask is None:
            raise RequestError("the inpaint preprocessor needs an init image and a mask (inpainting)",
                               "controlnets.preprocessor")
        if unit.image is None and req.init_image is None:
            raise RequestError("a ControlNet unit needs a control image (or an init image to take it from)",
                               "controlnets.image")
    check_ip_adapters(req.ip_adapters, limits)
    check_pictures(req, limits)
    check_handoff(req)
    check_hires(req, limits)
    check_guidance(req)
    check_work(req, limits)
    choice = resolve_sampler(req.sampler, req.schedule)
    if choice.sampler.cfg_pp and req.guidance != "cfg":
        raise RequestError(f"{choice.sampler.name} is its own guidance rule; use guidance 'cfg' with it, or another "
                           "sampler", "guidance")
    if req.zero_terminal_snr and not choice.supports_zero_snr:
        raise RequestError(f"zero_terminal_snr needs a sampler whose schedule can reach zero SNR; "
                           f"{choice.sampler.name!r} cannot. Use one of: {', '.join(zero_snr_samplers())}",
                           "zero_terminal_snr")
    return choice


def resolve_request(req: GenerationRequest, choice: SamplerChoice, geometry: ModelGeometry, limits: Limits,
                    model_name: str) -> GenerationRequest:
    """Check a prepared request against the model and fill in what it left open (size, seed, model name)."""
    if req.clip_skip > geometry.text_layers:
        raise RequestError(f"clip_skip must be at most {geometry.text_layers} for this model (its text encoder has "
                           f"{geometry.text_layers} layers), got {req.clip_skip}", "clip_skip")
    check_latent_channels(req, geometry.latent_channels)
    width, height = _resolve_size(req, geometry)
    for name, value in (("width", width), ("height", height)):
        check_int(value, name, limits.min_side, limits.max_side)
        check_multiple(value, name, geometry.factor)
    seed = req.seed if req.seed != -1 else random.randrange(2**32)
    resolved = req.replace(width=width, height=height, seed=seed, model=model_name,
                           sampler=choice.sampler.name, schedule=choice.schedule)
    return resolve_hires(resolve_variation(resolved, geometry.factor), req, geometry.factor, limits)


def _resolve_size(req: GenerationRequest, geometry: ModelGeometry) -> tuple[int, int]:
    """txt2img and "only masked": the model's native size; img2img: the init image's, to the latent grid,
    or the init latents' size."""
    if req.init_latents is not None:
        return latents_size(req, geometry.factor)
    if req.init_image is not None and not (req.mask is not None and req.only_masked) and (
            req.width is None or req.height is None):
        w, h = req.init_image.size
        f = geometry.factor
        w, h = max(f, w // f * f), max(f, h // f * f)
        return req.width or w, req.height or h
    return req.width or geometry.native_size, req.height or geometry.native_size


def default_size(req: GenerationRequest, grid: int, native: int, limits: Limits) -> tuple[int, int]:
    """width x height as given, else the init image's size rounded down to `grid`, else `native`; each side a whole
    number within the limits (families with their own runner: Kandinsky, SD3, Flux)."""
    width, height = req.width, req.height
    if req.init_image is not None:
        w, h = req.init_image.size
        width, height = width or max(grid, w // grid * grid), height or max(grid, h // grid * grid)
    width, height = width or native, height or native
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or not limits.min_side <= value <= limits.max_side:
            raise RequestError(f"{name} must be a whole number between {limits.min_side} and {limits.max_side}, "
                               f"got {value!r}", name)
    return width, height


def check_choice(value: object, choices: Iterable[str], name: str) -> None:
    if value not in choices:
        raise RequestError(f"{name.rpartition('.')[2]} must be one of {', '.join(choices)}, got {value!r}", name)


def check_multiple(value: int, name: str, factor: int) -> None:
    if value % factor:
        raise RequestError(f"{name} must be a multiple of {factor}, got {value} "
                           f"(nearest: {value // factor * factor or factor})", name)


def check_text(text: str, name: str, limits: Limits) -> None:
    """Within the length, BREAK and nesting limits, and valid Unicode (a lone UTF-16 surrogate cannot be
    encoded or tokenized)."""
    if len(text) > limits.max_prompt_chars:
        raise RequestError(f"{name} is {len(text)} characters; the limit is {limits.max_prompt_chars}", name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{name} is not valid text (bytes that are not UTF-8, or a lone UTF-16 surrogate): "
                           "send valid Unicode", name) from None
    breaks = len(_BREAK.findall(text))
    if breaks > limits.max_prompt_breaks:
        raise RequestError(f"{name} has {breaks} BREAKs; the limit is {limits.max_prompt_breaks}", name)
    depth = deepest = 0
    for char in text:  # escaped brackets count too: a bound, not a parse
        depth = depth + 1 if char in "([{" else max(depth - 1, 0) if char in ")]}" else depth
        deepest = max(deepest, depth)
    if deepest > limits.max_prompt_nesting:
        raise RequestError(f"{name} nests brackets {deepest} deep; the limit is {limits.max_prompt_nesting}", name)


def check_work(req: GenerationRequest, limits: Limits) -> None:
    """The job's pixel-steps (Limits.max_work) within the operator's limit; the hires pass counts at its size."""
    units = 1 + len(req.controlnets) + (req.pag_scale > 0)  # PAG: one more UNet evaluation
    pixels = (req.width or 1024) * (req.height or 1024)
    work = pixels * req.steps * req.total_images * units
    hr = req.hires
    if hr is not None:
        size = hr.resize_x * hr.resize_y or pixels * hr.scale**2
        work += size * (hr.steps or req.steps) * req.total_images * units
    if work > limits.max_work:
        raise RequestError(f"this job is {work:.3g} pixel-steps (width x height x steps x images x (1 + ControlNet "
                           f"units + 1 with PAG), hires included); this server's limit is {limits.max_work:.3g}: use "
                           "fewer steps, images or pixels", "steps")


def check_pictures(req: GenerationRequest, limits: Limits) -> None:
    """Init image, mask and control images within the upload pixel limit (the HTTP doors check it before
    decoding; this holds for the Python API too)."""
    named = [("init_image", req.init_image), ("mask", req.mask),
             *(("controlnets.image", u.image) for u in req.controlnets),
             *(("ip_adapters.images", im) for u in req.ip_adapters for im in u.images)]
    for name, picture in named:
        size = getattr(picture, "size", None)
        if size and size[0] * size[1] > limits.max_upload_pixels:
            raise RequestError(f"{name} is {size[0]}x{size[1]} pixels; the limit is {limits.max_upload_pixels}",
                               name)
    size = getattr(req.init_image, "size", None)
    if size and (req.width is None or req.height is None) and min(size) < limits.min_side:
        raise RequestError(f"init_image is {size[0]}x{size[1]}; with no width and height the output takes its size, "
                           f"which must be at least {limits.min_side} pixels a side: give width and height, or a "
                           "larger picture", "init_image")


def check_ip_adapters(units: object, limits: Limits) -> None:
    """IP-Adapter units: as many as ControlNet units may be, each with 1 to MAX_IP_IMAGES pictures."""
    if not isinstance(units, tuple | list) or not all(isinstance(u, IpAdapterUnit) for u in units):
        raise RequestError(f"ip_adapters must be a list of IP-Adapter units, got {units!r}", "ip_adapters")
    if len(units) > limits.max_controlnet_units:
        raise RequestError(f"{len(units)} IP-Adapter units; the limit is {limits.max_controlnet_units}",
                           "ip_adapters")
    for unit in units:
        if not isinstance(unit.model, str) or not unit.model.strip():
            raise RequestError("an IP-Adapter unit needs a model (an IP-Adapter file by name)", "ip_adapters.model")
        if not isinstance(unit.encoder, str):
            raise RequestError(f"an IP-Adapter unit's encoder must be a name (or empty), got {unit.encoder!r}",
                               "ip_adapters.encoder")
        pictures = unit.images if isinstance(unit.images, tuple | list) else ()
        if not 1 <= len(pictures) <= MAX_IP_IMAGES or not all(isinstance(im, Image.Image) for im in pictures):
            raise RequestError(f"an IP-Adapter unit needs 1 to {MAX_IP_IMAGES} pictures, got {unit.images!r}",
                               "ip_adapters.images")
        if not isinstance(unit.weight, int | float) or not 0.0 <= unit.weight <= 2.0:
            raise RequestError(f"an IP-Adapter weight must be between 0 and 2, got {unit.weight!r}",
                               "ip_adapters.weight")
        ok = all(isinstance(v, int | float) for v in (unit.start, unit.end)) and 0.0 <= unit.start < unit.end <= 1.0
        if not ok:
            raise RequestError(f"IP-Adapter start and end must satisfy 0 <= start < end <= 1, got {unit.start!r} "
                               f"and {unit.end!r}", "ip_adapters.start")


def check_int(value: object, name: str, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be a whole number, got {value!r}", name)
    if not lo <= value <= hi:
        raise RequestError(f"{name} must be between {lo} and {hi}, got {value}", name)


def _check_pair(value: object, name: str, what: str, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, tuple | list) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)
    if not ok:
        raise RequestError(f"{name} must be two whole numbers {what} >= {low}, got {value!r}", name)


def _check_unit(unit: object) -> None:
    """One ControlNet unit; errors name the unit's field as `controlnets.<field>`."""
    if not isinstance(unit, ControlUnit):
        raise RequestError(f"controlnets must hold ControlUnit entries, got {type(unit).__name__}", "controlnets")
    if unit.image is not None and not isinstance(unit.image, Image.Image):
        raise RequestError(f"a ControlNet unit's image must be a picture, got {type(unit.image).__name__}",
                           "controlnets.image")
    if not isinstance(unit.model, str) or not unit.model.strip():
        raise RequestError("a ControlNet unit needs a model (a ControlNet folder or file, by name or path)",
                           "controlnets.model")
    if unit.preprocessor not in ALL_PREPROCESSORS:
        raise RequestError(f"unknown preprocessor {unit.preprocessor!r}; choose one of {', '.join(ALL_PREPROCESSORS)}",
                           "controlnets.preprocessor")
    check_choice(unit.resize_mode, RESIZE_MODES, "controlnets.resize_mode")
    if not isinstance(unit.weight, int | float) or not 0.0 <= unit.weight <= 2.0:
        raise RequestError(f"a ControlNet weight must be between 0 and 2, got {unit.weight!r}", "controlnets.weight")
    ok = all(isinstance(v, int | float) for v in (unit.start, unit.end)) and 0.0 <= unit.start < unit.end <= 1.0
    if not ok:
        raise RequestError(f"ControlNet start and end must satisfy 0 <= start < end <= 1, got {unit.start!r} and "
                           f"{unit.end!r}", "controlnets.start")
    if not isinstance(unit.guess_mode, bool):
        raise RequestError(f"guess_mode must be true or false, got {unit.guess_mode!r}", "controlnets.guess_mode")
    check_int(unit.low_threshold, "controlnets.low_threshold", 1, 255)
    check_int(unit.high_threshold, "controlnets.high_threshold", unit.low_threshold, 255)
