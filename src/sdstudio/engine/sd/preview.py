"""Pictures of latents: a tiny VAE's decode (TinyPreview) when the model has one, else a cheap latent-to-RGB
approximation; and the raw channels.

The approximation is a per-model linear map rgb = W z + b (W: (3, C)), fitted by least squares on
calibration images encoded by the model's own VAE; a latent cell covers factor x factor pixels, so the
target is the image average-pooled by the factor. It replaces a VAE decode for live previews at
~C*3 multiply-adds per latent cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdstudio.models.load.memory import device_of


@dataclass(frozen=True)
class LatentRGB:
    weight: Tensor  # (3, C)
    bias: Tensor    # (3,)

    def __call__(self, latents: Tensor) -> Image.Image:
        """One latent (C, h, w) -> an (h, w) RGB image."""
        z = latents.detach().float().cpu()
        rgb = torch.einsum("rc,chw->rhw", self.weight, z) + self.bias[:, None, None]  # (3, h, w) in [-1, 1]
        return _to_image(rgb)


@dataclass(frozen=True)
class TinyPreview:
    """A live preview decoded by a tiny VAE (TAESD; models/load/tiny_vae.py): the picture at full size."""

    vae: Any  # AutoencoderTiny

    @torch.inference_mode()
    def __call__(self, latents: Tensor) -> Image.Image:
        """One scaled latent (C, h, w) -> an (H, W) RGB image."""
        z = latents[None].to(device=device_of(self.vae), dtype=self.vae.dtype)
        return _to_image(self.vae.decode(z).sample[0].float().cpu())


def calibration_images(size: int, count: int = 24, seed: int = 0) -> Tensor:
    """(N, 3, size, size) smooth random colour fields in [-1, 1]: bilinear upsampling of 3x3 grids."""
    g = torch.Generator("cpu").manual_seed(seed)
    coarse = torch.rand((count, 3, 3, 3), generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)


@torch.inference_mode()
def fit_latent_rgb(vae, factor: int, size: int | None = None) -> LatentRGB:
    """Least-squares fit of RGB (average-pooled) on scaled VAE latents of calibration images."""
    size = size or factor * 8
    images = calibration_images(size)
    z = vae.encode(images.to(device_of(vae), vae.dtype)).latent_dist.mode().float().cpu()
    z = z * vae.config.scaling_factor                        # (N, C, h, w)
    target = F.avg_pool2d(images, factor)                    # (N, 3, h, w)
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])        # (N*h*w, C)
    x = torch.cat([x, torch.ones(len(x), 1)], 1)             # bias column
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)            # (N*h*w, 3)
    solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()  # (C+1, 3)
    return LatentRGB(solution[:-1].T.contiguous(), solution[-1].contiguous())


def latent_channels_picture(latents: Tensor, scale: int) -> Image.Image:
    """One latent (C, h, w) as a strip: channels 0-2 as RGB, then every channel in grey.

    Each channel is min-max normalised on its own; cells are upscaled `scale` times (nearest)."""
    z = latents.detach().float().cpu()
    lo = z.amin(dim=(1, 2), keepdim=True)
    hi = z.amax(dim=(1, 2), keepdim=True)
    norm = (z - lo) / (hi - lo).clamp(min=1e-6) * 2 - 1                 # (C, h, w) in [-1, 1]
    tiles = [norm[:3]] if z.shape[0] >= 3 else []
    tiles += [c.expand(3, -1, -1) for c in norm]
    strip = torch.cat(tiles, dim=2)                                     # (3, h, w * tiles)
    strip = F.interpolate(strip[None], scale_factor=scale, mode="nearest")[0]
    return _to_image(strip)


def _to_image(rgb: Tensor) -> Image.Image:
    """(3, h, w) in [-1, 1] -> 8-bit RGB."""
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")
