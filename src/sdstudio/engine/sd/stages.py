"""Stages around the loop, named by verbs: make noise, set timesteps, encode and decode images.

Reproducibility contract: image i of a job with seed s starts from
torch.randn((1, C, h, w), generator=torch.Generator("cpu").manual_seed(s + i)), moved to the device
afterwards; stochastic samplers keep drawing their step noise from the same per-image CPU generator
(with A1111's eta noise seed delta d > 0: from a fresh generator seeded s + i + d, as A1111's ImageRNG).
So an image does not depend on the batch it was made in, nor on the device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from torch import Tensor

from sdstudio.errors import RequestError
from sdstudio.models.load.memory import device_of


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def step_generators(seeds: Sequence[int], generators: list[torch.Generator], delta: int) -> list[torch.Generator]:
    """The generators step noise comes from: the images' own, or with an eta noise seed delta, seed + delta's."""
    return make_generators([int(s) + delta for s in seeds]) if delta else generators


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, int, int],
                  device: torch.device, dtype: torch.dtype) -> Tensor:
    """(B, C, h, w) standard normal noise, one CPU draw of (1, C, h, w) per image."""
    rows = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(rows).to(device=device, dtype=dtype)


def set_timesteps(scheduler: Any, steps: int, strength: float | None, device: torch.device) -> Tensor:
    """The scheduler's timesteps; for img2img only the last int(steps * strength) steps, as diffusers:

    t_start = steps - min(int(steps * strength), steps); timesteps[t_start * order:].
    strength 1 keeps all steps; a strength under 1/steps keeps none (the init image comes back).
    """
    scheduler.set_timesteps(steps, device=device)
    if strength is None:
        return scheduler.timesteps
    t_start = steps - min(int(steps * strength), steps)
    begin = t_start * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def start_latents(scheduler: Any, noise: Tensor, timesteps: Tensor, init: Tensor | None) -> Tensor:
    """txt2img: noise * init_noise_sigma. img2img: init latents noised to the first kept timestep,
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (scheduler.add_noise, in the scheduler's own convention)."""
    if init is None:
        return noise * scheduler.init_noise_sigma
    init = init.expand(noise.shape[0], -1, -1, -1)
    if len(timesteps) == 0:
        return init.clone()
    return scheduler.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))


def step_kwargs(scheduler: Any, generators: list[torch.Generator], eta: float | None = None) -> dict[str, Any]:
    """Extra arguments for scheduler.step: per-image generators where it draws noise; `eta` where it takes one
    (DDIM's eta, TCD's gamma), None giving the scheduler's default (DDIM 0, TCD 0.3)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "generator" in params:
        kwargs["generator"] = generators
    if "eta" in params:
        kwargs["eta"] = float(params["eta"].default if eta is None else eta)
    return kwargs


def image_processor(factor: int) -> VaeImageProcessor:
    return VaeImageProcessor(vae_scale_factor=factor)


@torch.inference_mode()
def encode_image(vae: Any, image: Image.Image, width: int, height: int, factor: int) -> Tensor:
    """(1, C, h, w) scaled latents of an RGB image resized to width x height.

    Uses the posterior mean (no sampling), so img2img draws nothing from the image's generator and
    the reproducibility contract holds for it too.
    """
    pixels = image_processor(factor).preprocess(image.convert("RGB"), height=height, width=width)
    return encode_pixels(vae, pixels)


@torch.inference_mode()
def encode_pixels(vae: Any, pixels: Tensor) -> Tensor:
    """(B, C, h, w) scaled posterior-mean latents of images (B, 3, H, W) in [-1, 1]."""
    if getattr(vae, "decodes_only", False):  # a tiny VAE read from a decoder file alone (models/load/tiny_vae.py)
        raise RequestError("this tiny VAE has only its decoder: img2img and inpainting need its encoder too "
                           "(taesd_encoder.pth beside taesd_decoder.pth), or choose another VAE", "vae")
    pixels = pixels.to(device=device_of(vae), dtype=vae.dtype)
    encoded = vae.encode(pixels)
    # AutoencoderKL: a posterior; AutoencoderTiny (TAESD): the latents themselves
    mean = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
    shift = getattr(vae.config, "shift_factor", None)  # SD3's and Flux's VAEs: z = (mean - shift) * scale
    return (mean - shift if shift else mean) * vae.config.scaling_factor


@torch.inference_mode()
def decode_latents(vae: Any, latents: Tensor, between: Callable[[], None] | None = None) -> Tensor:
    """(B, 3, H, W) images in [-1, 1] from scaled latents (B, C, h, w), one image at a time; `between` runs
    before each (a cancel check: a large batch's decode stops within one image's time)."""
    z = latents.to(device=device_of(vae), dtype=vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:  # SD3's and Flux's VAEs
        z = z + shift
    out = []
    for i in range(z.shape[0]):
        if between is not None:
            between()
        out.append(vae.decode(z[i: i + 1], return_dict=False)[0])
    return torch.cat(out)


def to_pil(images: Tensor, factor: int) -> list[Image.Image]:
    """[-1, 1] tensors (B, 3, H, W) to 8-bit RGB images (x+1)/2 * 255, rounded."""
    return image_processor(factor).postprocess(images.float().cpu(), output_type="pil")


def set_vae_tiling(vae: Any, policy: str, pixels: int, native_size: int, offloaded: bool) -> None:
    """Tiled VAE encode/decode (diffusers' `enable_tiling`: overlapping tiles, blended seams) bounds the
    VAE's activation memory for large images. auto: tile above 4x the native area or when offloading."""
    tile = policy == "on" or (policy == "auto" and (pixels > 4 * native_size ** 2 or offloaded))
    if tile:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
