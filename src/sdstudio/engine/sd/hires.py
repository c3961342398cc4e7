"""Hires fix as AUTOMATIC1111 defines it (modules/processing.py, StableDiffusionProcessingTxt2Img): the request
side: checks, the hires size, the second pass's request and sampler. The two passes run in
engine/sd/hires_job.py; the infotext keys are in a1111/hires_infotext.py.

Size: with neither hr_resize_x nor hr_resize_y the first pass (W, H) is upscaled to (int(W * hr_scale),
int(H * hr_scale)); with one of them the other follows the aspect ratio (x * H // W); with both the picture
is upscaled to cover (hr_resize_x, hr_resize_y) and centre-cropped to it. Sizes are then floored to the
latent factor, which is what A1111's `// opt_f` does to them on the way into latent space.

Denoising strength: the request's `strength` (A1111's `denoising_strength`, 0.75 by default) is the second
pass's, exactly as the txt2img API reads it; the infotext's "Denoising strength" maps back to it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from sdstudio.engine.pipelines.upscale import LATENT_UPSCALE_MODES, MAX_SCALE, RESAMPLERS, latent_mode, resampler
from sdstudio.engine.requests import GenerationRequest, HiresFix
from sdstudio.errors import RequestError
from sdstudio.samplers import SamplerChoice, resolve_sampler
from sdstudio.settings import Limits


@dataclass(frozen=True)
class HiresSize:
    """In pixels, multiples of the latent factor: the first pass is upscaled to `upscale_to`, then
    centre-cropped to `target` (the same size unless both resize sides were given)."""

    upscale_to: tuple[int, int]
    target: tuple[int, int]

    def crop_box(self, factor: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the target inside upscale_to, in latent cells (A1111's truncate_x/y)."""
        (w, h), (tw, th) = (self.upscale_to[0] // factor, self.upscale_to[1] // factor), \
            (self.target[0] // factor, self.target[1] // factor)
        left, top = (w - tw) // 2, (h - th) // 2
        return left, top, left + tw, top + th


def hires_size(req: GenerationRequest, factor: int) -> HiresSize:
    """The hires size of a request whose width and height are resolved."""
    assert req.hires is not None and req.width is not None and req.height is not None
    w, h, rx, ry = req.width, req.height, req.hires.resize_x, req.hires.resize_y
    if not rx and not ry:
        to = (int(w * req.hires.scale), int(h * req.hires.scale))
        target = to
    elif not ry:
        to = target = (rx, rx * h // w)
    elif not rx:
        to = target = (ry * w // h, ry)
    else:
        to = (rx, rx * h // w) if w / h < rx / ry else (ry * w // h, ry)
        target = (rx, ry)

    def floor(size: tuple[int, int]) -> tuple[int, int]:
        return max(factor, size[0] // factor * factor), max(factor, size[1] // factor * factor)

    return HiresSize(floor(to), floor(target))


def check_hires_upscaler(name: str) -> None:
    """A latent mode or a resampler; else an "unknown hr_upscaler" error, which the runner reports together
    with the request's other missing names (an A1111 image's "R-ESRGAN 4x+" with its missing LoRAs)."""
    if latent_mode(name) is None and resampler(name) is None:
        names = [m.name for m in LATENT_UPSCALE_MODES] + list(RESAMPLERS)
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}" if close else ""
        raise RequestError(f"unknown hr_upscaler {name!r}{hint}: hires fix takes a latent mode or a resampler: "
                           f"{', '.join(names)}", "hr_upscaler")


def check_hires(req: GenerationRequest, limits: Limits) -> None:
    """Checks that need no model (the hires prompts are parsed by Engine.prepare). Errors name the JSON's keys."""
    hr = req.hires
    if hr is None:
        return
    if not isinstance(hr, HiresFix):
        raise RequestError(f"hires must be a HiresFix, got {type(hr).__name__}", "enable_hr")
    if req.mode != "txt2img":
        raise RequestError("hires fix (enable_hr) is for txt2img: it upscales a first pass and redraws it. For an "
                           "image, run img2img at the larger size instead", "enable_hr")
    for name in ("denoising_end", "denoising_start"):
        if getattr(req, name) is not None:
            raise RequestError(f"{name} cannot be combined with hires fix: leave it unset or turn enable_hr off", name)
    if isinstance(hr.scale, bool) or not isinstance(hr.scale, int | float) or not 1.0 <= hr.scale <= MAX_SCALE:
        raise RequestError(f"hr_scale must be a number between 1 and {MAX_SCALE:g}, got {hr.scale!r}", "hr_scale")
    for name, value in (("hr_resize_x", hr.resize_x), ("hr_resize_y", hr.resize_y)):
        if isinstance(value, bool) or not isinstance(value, int) or not (
                value == 0 or limits.min_side <= value <= limits.max_side):
            raise RequestError(f"{name} must be 0 (use hr_scale) or between {limits.min_side} and {limits.max_side} "
                               f"pixels, got {value!r}", name)
    if not isinstance(hr.upscaler, str):
        raise RequestError(f"hr_upscaler must be a name, got {hr.upscaler!r}", "hr_upscaler")
    if isinstance(hr.steps, bool) or not isinstance(hr.steps, int) or not 0 <= hr.steps <= limits.max_steps:
        raise RequestError(f"hr_second_pass_steps must be 0 (the same as steps) or up to {limits.max_steps}, got "
                           f"{hr.steps!r}", "hr_second_pass_steps")
    choice = requested_choice(req)
    if req.zero_terminal_snr and not choice.supports_zero_snr:
        raise RequestError(f"zero_terminal_snr needs a sampler whose schedule can reach zero SNR; the hires sampler "
                           f"{choice.sampler.name!r} cannot", "hr_sampler_name")


def requested_choice(req: GenerationRequest) -> SamplerChoice:
    """The second pass's sampler from the names as given (before the request is resolved)."""
    try:
        return resolve_sampler(req.hires.sampler or req.sampler, req.hires.schedule or req.schedule)
    except RequestError as e:
        raise RequestError(str(e), "hr_scheduler" if e.field == "schedule" else "hr_sampler_name") from None


def resolve_hires(resolved: GenerationRequest, given: GenerationRequest, factor: int,
                  limits: Limits) -> GenerationRequest:
    """Check the hires size against the limits and write the second pass's sampler, schedule and upscaler
    by their canonical names. `resolved`: size and first sampler resolved; `given`: as the user sent it."""
    if resolved.hires is None or given.hires is None:
        return resolved
    size = hires_size(resolved, factor)
    field = "hr_resize_x" if resolved.hires.resize_x or resolved.hires.resize_y else "hr_scale"
    for side in (*size.upscale_to, *size.target):
        if not limits.min_side <= side <= limits.max_side:
            raise RequestError(f"the hires size {size.target[0]}x{size.target[1]} (upscaled to {size.upscale_to[0]}x"
                               f"{size.upscale_to[1]}) must stay between {limits.min_side} and {limits.max_side} "
                               f"pixels a side: lower {field}", field)
    mode = latent_mode(given.hires.upscaler)
    changes: dict[str, Any] = {"upscaler": mode.name if mode else resampler(given.hires.upscaler)}
    if given.hires.sampler or given.hires.schedule:
        choice = requested_choice(given)
        changes.update(sampler=choice.sampler.name if given.hires.sampler else "", schedule=choice.schedule)
    return resolved.replace(hires=dataclasses.replace(resolved.hires, **changes))


def second_choice(req: GenerationRequest, first: SamplerChoice) -> SamplerChoice:
    """The second pass's sampler of a resolved request: the first pass's unless the hires fix names its own."""
    assert req.hires is not None
    if not req.hires.sampler and not req.hires.schedule:
        return first
    return resolve_sampler(req.hires.sampler or req.sampler, req.hires.schedule or req.schedule)


def second_request(req: GenerationRequest, choice: SamplerChoice, factor: int) -> GenerationRequest:
    """The second pass as img2img at the hires size on the same seeds (its init latents come per batch)."""
    assert req.hires is not None
    width, height = hires_size(req, factor).target
    return req.replace(hires=None, width=width, height=height, steps=req.hires.steps or req.steps,
                       sampler=choice.sampler.name, schedule=choice.schedule, prompt=req.hires.prompt or req.prompt,
                       negative_prompt=req.hires.negative_prompt or req.negative_prompt)


def output_pixels(req: GenerationRequest, factor: int) -> int:
    """Pixels of one output image (the hires size with hires fix), for the VAE tiling policy."""
    if req.hires is not None:
        width, height = hires_size(req, factor).target
        return width * height
    return (req.width or 0) * (req.height or 0)
