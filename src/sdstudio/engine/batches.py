"""The outer loop every runner shares: n_iter batches of batch_size images, each decoded and described.

Image k of a job (k < batch_size * n_iter) is made from seed `image_seed(req, k)` (seed + k; for a variation,
seed itself): the same picture whatever the batch size. A cancel raises between batches; an interrupt keeps
the images already made and makes no more (A1111's Interrupt).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from sdstudio.engine.hooks import CancelToken
from sdstudio.engine.requests import Capture, GeneratedImage, GenerationRequest
from sdstudio.engine.sd.variation import image_seed


@dataclass(frozen=True)
class DecodedBatch:
    latents: Tensor                   # (B, C, h, w) final, before decoding
    pictures: Sequence[Image.Image]   # B decoded pictures, back in their canvas when inpainting
    captures: Sequence[Capture] = ()  # one per picture when the denoising process was captured
    scheduler_config: dict[str, Any] = field(default_factory=dict)


# (iteration, seeds of its images) -> the decoded batch
BatchRunner = Callable[[int, list[int]], DecodedBatch]
# (batch, position k in it, index in the job, seed) -> the described image
Describe = Callable[[DecodedBatch, int, int, int], GeneratedImage]


def run_batches(req: GenerationRequest, cancel: CancelToken | None, run_batch: BatchRunner,
                describe: Describe) -> tuple[list[GeneratedImage], Tensor]:
    """Every batch of the request; the images and all final latents (N, C, h, w) on the CPU."""
    images: list[GeneratedImage] = []
    latents: list[Tensor] = []
    for iteration in range(req.n_iter):
        if cancel:
            cancel.raise_if_cancelled()
            if cancel.interrupted and images:
                break
        first = iteration * req.batch_size
        seeds = [image_seed(req, first + k) for k in range(req.batch_size)]
        batch = run_batch(iteration, seeds)
        images += [describe(batch, k, first + k, seed) for k, seed in enumerate(seeds)]
        latents.append(batch.latents.float().cpu())
    return images, torch.cat(latents)
