"""Hires fix on the flow families: AUTOMATIC1111's two passes (engine/sd/hires_job.py) with the flow loop.

    pass 1   the request as txt2img at width x height                             (B, 16, h, w)
    upscale  latent mode: F.interpolate the latents; image upscaler: decode, resize each picture, encode;
             then centre-crop when both resize sides were given                    (B, 16, H, W)
    pass 2   img2img from those latents on the same seeds: x = s0 noise + (1 - s0) z with fresh noise drawn from
             each image's seed at the hires size, the last min(steps * strength, steps) of its own schedule (Flux's
             resolution-dependent shift is computed for the hires size), the hires prompt

Progress counts both passes' steps as one run; the images' record and infotext state the whole request.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdstudio.engine.batches import DecodedBatch, run_batches
from sdstudio.engine.flow.encode import WeightedText
from sdstudio.engine.flow.job import FlowInputs, FlowJob
from sdstudio.engine.flow.latents import encode_image
from sdstudio.engine.hooks import CancelToken, ProgressCallback
from sdstudio.engine.pipelines.upscale import latent_mode, upscale_image, upscale_latents
from sdstudio.engine.requests import Capture, GeneratedImage, GenerationRequest
from sdstudio.engine.sd.hires import hires_size
from sdstudio.engine.sd.hires_job import join_captures, shifted
from sdstudio.engine.sd.stages import decode_latents, to_pil
from sdstudio.models.load.flow import FlowModel


def second_request(req: GenerationRequest, grid: int) -> GenerationRequest:
    """The second pass: img2img at the hires size (its latents come per batch; the placeholder marks the mode)."""
    assert req.hires is not None
    width, height = hires_size(req, grid).target
    return req.replace(hires=None, width=width, height=height, steps=req.hires.steps or req.steps,
                       prompt=req.hires.prompt or req.prompt,
                       negative_prompt=req.hires.negative_prompt or req.negative_prompt,
                       init_latents=torch.zeros(1))


class FlowHires:
    def __init__(self, model: FlowModel, req: GenerationRequest, prompts: tuple[WeightedText, WeightedText],
                 hires_prompts: tuple[WeightedText, WeightedText], progress: ProgressCallback | None,
                 cancel: CancelToken | None, **job: object):
        assert req.hires is not None
        self.model, self.req, self.cancel = model, req, cancel
        self.size = hires_size(req, model.grid)
        first, second = req.replace(hires=None), second_request(req, model.grid)
        probe = [FlowJob(model, r, prompts, None, None) for r in (first, second)]
        self.first_steps = len(probe[0].sigmas) - 1
        total = self.first_steps + len(probe[1].sigmas) - 1
        self.first = FlowJob(model, first, prompts, shifted(progress, 0, total), cancel, recorded=req, **job)
        self.second = FlowJob(model, second, hires_prompts, shifted(progress, self.first_steps, total), cancel,
                              recorded=req, **job)

    def run(self) -> tuple[list[GeneratedImage], Tensor]:
        low_inputs, low_cond, low_uncond = self.first.prepare()
        _, high_cond, high_uncond = self.second.prepare()  # its inputs: the upscaled latents, per batch

        def both_passes(iteration: int, seeds: list[int]) -> DecodedBatch:
            low, low_captures = self.first.denoised(iteration, seeds, low_inputs, low_cond, low_uncond)
            inputs = FlowInputs(self.upscale(low))
            batch = self.second.batch(iteration, seeds, inputs, high_cond, high_uncond)
            if not low_captures:
                return batch
            highs = batch.captures or [Capture([], [], [], [])] * len(low_captures)
            size = (self.second.req.width, self.second.req.height)
            captures = [join_captures(a, b, self.first_steps, size) for a, b in zip(low_captures, highs, strict=True)]
            return DecodedBatch(batch.latents, batch.pictures, captures, batch.scheduler_config)

        return run_batches(self.req, self.cancel, both_passes, self.first.describe)

    def upscale(self, latents: Tensor) -> Tensor:
        """(B, 16, h, w) first-pass latents -> (B, 16, H, W) at the hires size."""
        model, f, (width, height) = self.model, self.model.factor, self.size.upscale_to
        mode = latent_mode(self.req.hires.upscaler)
        if mode is not None:
            big = upscale_latents(latents, (height // f, width // f), mode.name)
        else:
            pictures = to_pil(decode_latents(model.vae, latents), f)
            big = torch.cat([encode_image(model, upscale_image(p, (width, height), self.req.hires.upscaler), width,
                                          height) for p in pictures])
        left, top, right, bottom = self.size.crop_box(f)
        return big[:, :, top:bottom, left:right].float().cpu()
