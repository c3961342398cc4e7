"""Inpainting inputs for the one loop: the mask at latent size and what the UNet or the blend needs.

Masks are white (or any value >= 0.5 after blurring) where the image is repainted. Two methods:
- 9-channel checkpoints: the UNet input is cat(x_t, mask, masked-image latents), the masked pixels set
  to 0 (grey in [-1, 1]) before encoding, as diffusers' inpainting pipeline does.
- ordinary checkpoints: after every step the kept region is put back, noised to the next timestep:
  x = add_noise(z0, noise, t_next) * (1 - m) + x * m (the last step puts back z0 itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

from sdstudio.engine.stages import encode_pixels, image_processor

Blend = Callable[[Tensor, int], Tensor]


@dataclass(frozen=True)
class InpaintInputs:
    mask: Tensor           # (1, 1, h, w) 0/1 at latent size, 1 = repaint
    image_latents: Tensor  # (1, C, h, w) the init image's latents z0
    condition: Tensor | None  # (1, 1 + C, h, w) mask and masked-image latents, for 9-channel UNets


def prepare_mask(mask: Image.Image, width: int, height: int, blur: int, invert: bool) -> Image.Image:
    """The mask as a greyscale image of the output size, inverted and Gaussian-blurred as asked."""
    grey = mask.convert("L")
    if invert:
        grey = ImageOps.invert(grey)
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.Resampling.LANCZOS)
    return grey.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else grey


@torch.inference_mode()
def inpaint_inputs(vae: Any, image: Image.Image, mask: Image.Image, width: int, height: int, factor: int,
                   nine_channel: bool) -> InpaintInputs:
    pixels = image_processor(factor).preprocess(image.convert("RGB"), height=height, width=width)  # (1, 3, H, W)
    binary = torch.from_numpy((np.asarray(mask, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32))[None, None]
    z0 = encode_pixels(vae, pixels)
    latent_mask = F.interpolate(binary, size=z0.shape[-2:])                           # nearest, as diffusers
    condition = None
    if nine_channel:
        masked = encode_pixels(vae, pixels * (binary < 0.5))
        condition = torch.cat([latent_mask.to(masked), masked], dim=1)
    return InpaintInputs(latent_mask, z0, condition)


def blend_fn(scheduler: Any, timesteps: Tensor, z0: Tensor, noise: Tensor, mask: Tensor) -> Blend:
    """After step i: the kept region of z0 noised to the next timestep, the repainted region from x.
    z0, noise: (B, C, h, w); mask: (1, 1, h, w)."""
    keep = 1 - mask

    def blend(x: Tensor, i: int) -> Tensor:
        known = z0 if i + 1 >= len(timesteps) else scheduler.add_noise(z0, noise, timesteps[i + 1: i + 2])
        return known * keep + x * mask

    return blend
