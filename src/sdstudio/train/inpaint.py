"""Training an inpainting variant (UNet with 9 input channels), as the SD 1.5 inpainting model was made.

The UNet input is cat(noisy latents (4), mask (1), masked-image latents (4)). A base model's UNet is
widened by zero-initialising the 5 new input channels of conv_in, so training starts from exactly the
base model's behaviour. Masks (1 = repaint) are drawn per sample: 25% the whole image (the model stays
a text-to-image model), otherwise a random rectangle or ellipse; masked pixels are set to 0 (grey in
[-1, 1]) before encoding, as diffusers' inpainting pipeline prepares them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor

INPAINT_CHANNELS = 9  # 4 latents + 1 mask + 4 masked-image latents


def widen_conv_in(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The same UNet taking 9 input channels; the 5 new ones start at zero (no effect until trained)."""
    if unet.config.in_channels == INPAINT_CHANNELS:
        return unet
    state = unet.state_dict()
    w = state["conv_in.weight"]  # (C, 4, 3, 3)
    extra = torch.zeros(w.shape[0], INPAINT_CHANNELS - w.shape[1], *w.shape[2:], dtype=w.dtype)
    state["conv_in.weight"] = torch.cat([w, extra], dim=1)
    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": INPAINT_CHANNELS})
    wide.load_state_dict(state)
    return wide


def random_masks(batch: int, size: int, g: torch.Generator) -> Tensor:
    """(B, 1, size, size) masks of 0/1: 25% full, else a rectangle or an ellipse covering 10-80% per side."""
    masks = torch.zeros(batch, 1, size, size)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for b in range(batch):
        kind = float(torch.rand((), generator=g))
        if kind < 0.25:
            masks[b] = 1.0
            continue
        h, w = (0.1 + 0.7 * torch.rand(2, generator=g)) * size
        cy, cx = torch.rand(2, generator=g) * size
        if kind < 0.6:
            masks[b, 0] = ((ys - cy).abs() <= h / 2) & ((xs - cx).abs() <= w / 2)
        else:
            masks[b, 0] = ((ys - cy) / (h / 2)) ** 2 + ((xs - cx) / (w / 2)) ** 2 <= 1
    return masks


@torch.no_grad()
def inpaint_condition(vae: AutoencoderKL, pixels: Tensor, masks: Tensor) -> Tensor:
    """(B, 5, h, w): the mask at latent size, then the latents of the image with the masked pixels at 0."""
    masked = pixels * (masks < 0.5)
    z = vae.encode(masked).latent_dist.mode() * vae.config.scaling_factor  # (B, 4, h, w)
    return torch.cat([F.interpolate(masks, size=z.shape[-2:], mode="nearest"), z], dim=1)
