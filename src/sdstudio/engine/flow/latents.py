"""Latents and schedules of the flow families: Flux's 2x2 packing, the shifted sigma schedule, the VAE's shift.

Latents are (B, 16, H/8, W/8) for both VAEs, z = (E(x) - shift_factor) * scaling_factor. Flux's transformer reads
them packed: each 2x2 block of cells becomes one token of 64 channels, (B, 16, h, w) -> (B, h/2 * w/2, 64),
with position ids (row, column) per token for its rotary embedding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from torch import Tensor

from sdstudio.engine.sd.stages import encode_image as sd_encode_image
from sdstudio.models.load.flow import FlowModel


def pack(z: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): token (r, c) holds cells [2r:2r+2, 2c:2c+2], channel-major."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of `pack` for latents of h x w cells."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int) -> Tensor:
    """(h/2 * w/2, 3) Flux's token positions: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def scheduler_for(model: FlowModel, shift: float) -> FlowMatchEulerDiscreteScheduler:
    """The model's scheduler; `shift` > 0 replaces its shift (and turns resolution-dependent shifting off)."""
    overrides: dict[str, Any] = {"shift": float(shift), "use_dynamic_shifting": False} if shift > 0 else {}
    return FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config, **overrides)


def resolution_shift(config: Any, tokens: int) -> float:
    """mu for dynamic shifting: linear in the image's token count, from base_shift at base_image_seq_len tokens
    to max_shift at max_image_seq_len (Flux: 0.5 at 256 tokens, 1.15 at 4096); sigma -> exp(mu) shifted."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return tokens * slope + config.base_shift - slope * config.base_image_seq_len


def sigmas(model: FlowModel, scheduler: FlowMatchEulerDiscreteScheduler, steps: int, width: int, height: int,
           strength: float | None) -> Tensor:
    """(S + 1,) the sigmas the reference pipeline steps through, the last 0; img2img keeps the last
    min(steps * strength, steps) of them as diffusers' get_timesteps does (t_start = int(steps - that))."""
    kwargs: dict[str, Any] = {}
    if scheduler.config.get("use_dynamic_shifting"):
        kwargs["mu"] = resolution_shift(scheduler.config, (height // 16) * (width // 16))
    if model.family == "flux":  # FluxPipeline: explicit linear sigmas from 1 to 1/steps, then shifted
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(None, **kwargs)
    else:  # StableDiffusion3Pipeline: `steps` timesteps spread over the scheduler's own sigma range
        scheduler.set_timesteps(steps, **kwargs)
    out = scheduler.sigmas.float().cpu()
    if strength is None:
        return out
    start = int(max(steps - min(steps * strength, steps), 0))
    return out[start:]


def encode_image(model: FlowModel, image: Image.Image, width: int, height: int) -> Tensor:
    """(1, 16, h, w) float32 z0 of an RGB image resized to width x height: the posterior mean, shifted and scaled
    (engine/sd/stages.py applies the VAE's shift_factor)."""
    return sd_encode_image(model.vae, image, width, height, model.factor).float()
