"""Request validation at the door: every message says what to fix."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from PIL import Image

from sdstudio.a1111.names import MASKED_CONTENT  # our masked-content modes are A1111's
from sdstudio.engine.requests import HIRES_KEYS, VARIATION_KEYS, ControlUnit, GenerationRequest
from sdstudio.engine.sd.control import RESIZE_MODES
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
    if not isinstance(req.cfg_scale, int | float) or not req.cfg_scale >= 0:
        raise RequestError(f"cfg_scale must be a number >= 0, got {req.cfg_scale!r}", "cfg_scale")
    if not isinstance(req.strength, int | float) or not 0.0 <= req.strength <= 1.0:
        raise RequestError(f"strength must be between 0 and 1, got {req.strength!r}", "strength")
    check_int(req.seed, "seed", -1, MAX_SEED - req.total_images)
    check_variation(req, limits)
    if not isinstance(req.prompt, str) or not isinstance(req.negative_prompt, str):
        raise RequestError("prompt and negative_prompt must be text", "prompt")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(req, name)) > limits.max_prompt_chars:
            raise RequestError(f"{name} is {len(getattr(req, name))} characters; the limit is "
                               f"{limits.max_prompt_chars}", name)
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
    if not isinstance(req.guidance_rescale, int | float) or not 0.0 <= req.guidance_rescale <= 1.0:
        raise RequestError(f"guidance_rescale must be between 0 and 1, got {req.guidance_rescale!r}",
                           "guidance_rescale")
    _check_pair(req.original_size, "original_size", "(width, height)", 1, allow_none=True)
    _check_pair(req.crop_left_top, "crop_left_top", "(left, top)", 0)
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if not isinstance(getattr(req, name), int | float):
            raise RequestError(f"{name} must be a number, got {getattr(req, name)!r}", name)
    if not isinstance(req.controlnets, tuple | list):
        raise RequestError(f"controlnets must be a list of ControlNet units, got {req.controlnets!r}", "controlnets")
    for unit in req.controlnets:
        _check_unit(unit)
        if unit.preprocessor == "inpaint" and req.mask is None:
            raise RequestError("the inpaint preprocessor needs an init image and a mask (inpainting)",
                               "controlnets.preprocessor")
        if unit.image is None and req.init_image is None:
            raise RequestError("a ControlNet unit needs a control image (or an init image to take it from)",
                               "controlnets.image")
    check_handoff(req)
    check_hires(req, limits)
    choice = resolve_sampler(req.sampler, req.schedule)
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
        if value % geometry.factor:
            raise RequestError(
                f"{name} must be a multiple of {geometry.factor}, got {value} "
                f"(nearest: {value // geometry.factor * geometry.factor or geometry.factor})", name)
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


def check_choice(value: object, choices: Iterable[str], name: str) -> None:
    if value not in choices:
        raise RequestError(f"{name.rpartition('.')[2]} must be one of {', '.join(choices)}, got {value!r}", name)


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
