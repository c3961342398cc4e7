"""Inpainting inputs for the one loop: the mask at latent size and what the UNet or the blend needs.

Masks are white (or any value >= 0.5 after blurring) where the image is repainted. Two methods:
- "condition" (9-channel checkpoints): the UNet input is cat(x_t, mask, masked-image latents), the masked
  pixels set to 0 (grey in [-1, 1]) before encoding, as diffusers' inpainting pipeline does.
- "blend" (any checkpoint): after every step the kept region is put back, noised to the next timestep:
  x = add_noise(z0, noise, t_next) * (1 - m) + x * m (the last step puts back z0 itself).
Soft inpainting replaces the 0/1 mask by a per-pixel strength s in [0, 1] (the grey mask): a pixel is
held to the noised original until step ceil(N * (1 - s)) of the N steps and free after it, so s acts
like img2img strength pixel by pixel (as differential diffusion, Levin & Fried 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdstudio.engine.sd.stages import encode_pixels, image_processor

Blend = Callable[[Tensor, int], Tensor]


@dataclass(frozen=True)
class InpaintInputs:
    mask: Tensor           # (1, 1, h, w) 0/1 at latent size, 1 = repaint
    image_latents: Tensor  # (1, C, h, w) the init image's latents z0
    condition: Tensor | None  # (1, 1 + C, h, w) mask and masked-image latents, for 9-channel UNets
    strength: Tensor       # (1, 1, h, w) the grey mask area-averaged to latent size, in [0, 1]

    def to(self, **place: Any) -> InpaintInputs:
        condition = None if self.condition is None else self.condition.to(**place)
        return InpaintInputs(self.mask.to(**place), self.image_latents.to(**place), condition,
                             self.strength.to(**place))


INPAINT_METHODS = ("auto", "condition", "blend")


def fill_masked(image: Image.Image, mask: Image.Image, sigma: float = 8.0) -> Image.Image:
    """A1111's "fill": the masked pixels replaced by a wide blur of the unmasked ones around them,
    blur(image * keep) / blur(keep), so the masked area starts from the surrounding colours."""
    keep = torch.from_numpy((np.asarray(mask, np.float32) / 255.0 < 0.5).astype(np.float32))[None, None]  # (1,1,H,W)
    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32)).permute(2, 0, 1)[None]        # (1,3,H,W)
    weight = _gaussian_blur(keep, sigma)
    spread = _gaussian_blur(rgb * keep, sigma) / weight.clamp(min=1e-6)
    fallback = (rgb * keep).sum((2, 3), keepdim=True) / keep.sum().clamp(min=1)  # far from any kept pixel
    out = torch.where(keep > 0, rgb, torch.where(weight > 1e-3, spread, fallback))
    return Image.fromarray(out[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy())


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (1, C, H, W) with zero padding (the normalised fill divides it out)."""
    half = int(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float32) / sigma) ** 2)
    taps = (taps / taps.sum()).repeat(x.shape[1], 1, 1)                                     # (C, 1, K)
    x = F.conv2d(x, taps[:, :, None, :], padding=(0, half), groups=x.shape[1])
    return F.conv2d(x, taps[:, :, :, None], padding=(half, 0), groups=x.shape[1])


def masked_start(z0: Tensor, mask: Tensor, content: str, extra_noise: Tensor) -> Tensor:
    """The init latents the masked area starts from: z0 ("fill", "original"), noise or zeros. (B, C, h, w)."""
    if content == "latent noise":
        return z0 * (1 - mask) + extra_noise * mask
    if content == "latent nothing":
        return z0 * (1 - mask)
    return z0.expand_as(extra_noise)


@torch.inference_mode()
def inpaint_inputs(vae: Any, image: Image.Image, mask: Image.Image, width: int, height: int, factor: int,
                   nine_channel: bool) -> InpaintInputs:
    pixels = image_processor(factor).preprocess(image.convert("RGB"), height=height, width=width)  # (1, 3, H, W)
    grey = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]    # (1, 1, H, W)
    binary = (grey >= 0.5).float()
    z0 = encode_pixels(vae, pixels)
    latent_mask = F.interpolate(binary, size=z0.shape[-2:])                           # nearest, as diffusers
    condition = None
    if nine_channel:
        masked = encode_pixels(vae, pixels * (binary < 0.5))
        condition = torch.cat([latent_mask.to(masked), masked], dim=1)
    return InpaintInputs(latent_mask, z0, condition, F.adaptive_avg_pool2d(grey, z0.shape[-2:]))


def blend_fn(scheduler: Any, timesteps: Tensor, z0: Tensor, noise: Tensor, mask: Tensor) -> Blend:
    """After step i: the kept region of z0 noised to the next timestep, the repainted region from x.
    z0, noise: (B, C, h, w); mask: (1, 1, h, w)."""
    keep = 1 - mask

    def blend(x: Tensor, i: int) -> Tensor:
        known = z0 if i + 1 >= len(timesteps) else scheduler.add_noise(z0, noise, timesteps[i + 1: i + 2])
        return known * keep + x * mask

    return blend


def soft_blend_fn(scheduler: Any, timesteps: Tensor, z0: Tensor, noise: Tensor, strength: Tensor) -> Blend:
    """Per-pixel strength s (1, 1, h, w): before step j a pixel is free when s > 0 and j >= N * (1 - s),
    otherwise it is set to z0 noised to t_j (after the last step, j = N: z0 itself where s = 0)."""
    steps = len(timesteps)

    def blend(x: Tensor, i: int) -> Tensor:
        j = i + 1
        free = ((strength > 0) & (j >= steps * (1 - strength))).to(x.dtype)
        known = z0 if j >= steps else scheduler.add_noise(z0, noise, timesteps[j: j + 1])
        return known * (1 - free) + x * free

    return blend
