"""Latents for training: VAE posterior samples z * scaling_factor, cached for finite datasets.

Caching keeps each image's posterior mean and std (computed once), and draws z = mean + std * eps
per step, which is exactly a fresh posterior sample without running the encoder again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from sdstudio.train.data import CaptionedImages, load_batch

log = logging.getLogger(__name__)


class LatentSource:
    def __init__(self, vae: AutoencoderKL, data: CaptionedImages, resolution: int, cache: bool, chunk: int = 64):
        self.vae, self.data, self.resolution = vae, data, resolution
        self.scale = float(vae.config.scaling_factor)
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.captions: list[str] = []
        if cache and data.size is not None:
            self._encode_all(data.size, chunk)

    @torch.no_grad()
    def _encode_all(self, size: int, chunk: int) -> None:
        log.info("encoding %d training images once", size)
        means, stds = [], []
        for start in range(0, size, chunk):
            x, captions = load_batch(self.data, range(start, min(start + chunk, size)), self.resolution)
            posterior = self.vae.encode(x).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            self.captions += captions
        self.mean, self.std = torch.cat(means), torch.cat(stds)  # (N, C, h, w) each

    def pixels(self, indices: Sequence[int]) -> Tensor:
        """(B, 3, H, W) images in [-1, 1], the ones `batch(indices)` returns latents of."""
        return load_batch(self.data, indices, self.resolution)[0]

    @torch.no_grad()
    def batch(self, indices: Sequence[int], g: torch.Generator) -> tuple[Tensor, list[str]]:
        """(B, C, h, w) scaled latents and their captions."""
        if self.mean is not None and self.std is not None:
            idx = torch.as_tensor(list(indices))
            mean, std = self.mean[idx], self.std[idx]
            z = mean + std * torch.randn(mean.shape, generator=g)
            return z * self.scale, [self.captions[i] for i in indices]
        x, captions = load_batch(self.data, indices, self.resolution)
        return self.vae.encode(x).latent_dist.sample(generator=g) * self.scale, captions
