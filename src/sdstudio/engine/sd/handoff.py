"""Latent handoff between two jobs at a switch fraction, as diffusers' SDXL base -> refiner ("ensemble of
expert denoisers", Podell et al. 2023, sec. 2.5; StableDiffusionXLPipeline `denoising_end`,
StableDiffusionXLImg2ImgPipeline `denoising_start`).

With T = num_train_timesteps, a fraction d cuts the schedule at the discrete timestep

    cutoff = int(round(T - d * T))

- denoising_end d:   keep the timesteps t >= cutoff (the loop stops early; the result's latents are the
                     partly denoised x_t to hand on).
- denoising_start d: keep the timesteps t < cutoff (one more for a 2nd-order scheduler when the count is
                     even, so a Heun pair is never split), start from `init_latents` as they are: no noise
                     is added, and none is drawn from the images' generators.
Both fractions replace `strength`; with the same steps and sampler on both sides the two schedules meet
exactly where the first one stopped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdstudio.engine.requests import GenerationRequest
from sdstudio.engine.sd.stages import set_timesteps
from sdstudio.errors import RequestError


def cutoff(scheduler: Any, fraction: float) -> int:
    """The discrete timestep at `fraction` of the way through the training schedule (diffusers' rounding)."""
    total = scheduler.config.num_train_timesteps
    return round(total - fraction * total)  # Python rounds half to even, as diffusers does


def schedule_timesteps(scheduler: Any, req: GenerationRequest, has_init: bool, device: torch.device) -> Tensor:
    """The timesteps the loop runs for `req`: all of them (txt2img), the last int(steps * strength) (img2img),
    or those after denoising_start; then cut at denoising_end."""
    if req.denoising_start is None:
        timesteps = set_timesteps(scheduler, req.steps, req.strength if has_init else None, device)
    else:
        scheduler.set_timesteps(req.steps, device=device)
        count = int((scheduler.timesteps < cutoff(scheduler, req.denoising_start)).sum().item())
        if scheduler.order == 2 and count % 2 == 0:
            count += 1  # end after a 2nd-order pair, not between its two evaluations
        begin = len(scheduler.timesteps) - count
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        timesteps = scheduler.timesteps[begin:]
    if req.denoising_end is not None:
        end = cutoff(scheduler, req.denoising_end)
        timesteps = timesteps[:sum(1 for t in timesteps if t >= end)]
    return timesteps


def handoff_start(init: Tensor, batch: int) -> Tensor:
    """The loop's start latents after a handoff: the given latents themselves (B, C, h, w)."""
    return init.expand(batch, -1, -1, -1).clone()


def batch_rows(init: Tensor | None, first: int, batch: int) -> Tensor | None:
    """Rows first .. first+batch-1 of per-image init latents (N, C, h, w); one shared row is kept as it is."""
    if init is None or init.shape[0] == 1:
        return init
    return init[first: first + batch]


def check_handoff(req: GenerationRequest) -> None:
    """Checks that need no model."""
    for name in ("denoising_end", "denoising_start"):
        value = getattr(req, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or
                                  not 0.0 < value < 1.0):
            raise RequestError(f"{name} must be a fraction strictly between 0 and 1 (or unset), got {value!r}", name)
    latents = req.init_latents
    if latents is not None:
        if not isinstance(latents, Tensor) or latents.ndim != 4:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise RequestError(f"init_latents must be a tensor (B, C, h, w), got {shape}", "init_latents")
        if req.init_image is not None:
            raise RequestError("give init_image or init_latents, not both", "init_latents")
        if latents.shape[0] not in (1, req.total_images):
            raise RequestError(f"init_latents holds {latents.shape[0]} images; give one (shared by every image) or "
                               f"one per image ({req.total_images} = batch_size x n_iter)", "init_latents")
        if not torch.isfinite(latents).all():
            raise RequestError("init_latents contains NaN or infinite values", "init_latents")
    if req.denoising_start is not None:
        if latents is None:
            raise RequestError("denoising_start resumes from latents: give init_latents (e.g. the latents of a "
                               "result made with denoising_end)", "denoising_start")
        if req.denoising_end is not None and req.denoising_start >= req.denoising_end:
            raise RequestError(f"denoising_start ({req.denoising_start}) must be below denoising_end "
                               f"({req.denoising_end})", "denoising_start")
    if req.denoising_end is not None and req.mask is not None and req.only_masked:
        raise RequestError("denoising_end hands on the latents of the whole picture; with only_masked they would "
                           "be the crop's: turn only_masked off", "denoising_end")


def latents_size(req: GenerationRequest, factor: int) -> tuple[int, int]:
    """(width, height) of init latents (B, C, h, w) in pixels; a width or height given must agree."""
    assert req.init_latents is not None
    size = (req.init_latents.shape[-1] * factor, req.init_latents.shape[-2] * factor)
    for name, given, actual in (("width", req.width, size[0]), ("height", req.height, size[1])):
        if given is not None and given != actual:
            raise RequestError(f"{name} must match init_latents ({actual} pixels = {actual // factor} latent cells "
                               f"x {factor}) or be left unset, got {given}", name)
    return size


def check_latent_channels(req: GenerationRequest, channels: int) -> None:
    if req.init_latents is not None and req.init_latents.shape[1] != channels:
        raise RequestError(f"init_latents has {req.init_latents.shape[1]} channels but this model's latents have "
                           f"{channels}", "init_latents")
