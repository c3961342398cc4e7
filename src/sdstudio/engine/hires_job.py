"""Hires fix, the run: two Jobs on one model, composed per batch (AUTOMATIC1111's `sample` + `sample_hr_pass`).

    pass 1   the request as txt2img at width x height                          (B, C, h, w)
    upscale  latent mode: F.interpolate the latents to the hires size;
             image upscaler: decode, resize each picture (8-bit, as A1111), encode  (B, C, H', W')
             then centre-crop to the target when both resize sides were given       (B, C, H, W)
    pass 2   img2img from those latents on the same seeds: its noise is drawn afresh from each image's
             seed at the hires size, as A1111 draws it; hr steps, `strength`, hr sampler and prompt

Both passes are the one loop (Job.run_batch); the first Job decodes and describes the result as the request.
Progress counts the evaluations of both passes as one run of first + second steps; cancel stops either.
"""

from __future__ import annotations

import dataclasses

import torch
from PIL import Image
from torch import Tensor

from sdstudio.engine.addons import AddOns
from sdstudio.engine.handoff import schedule_timesteps
from sdstudio.engine.hires import hires_size, second_choice, second_request
from sdstudio.engine.hooks import ProgressCallback, ProgressEvent
from sdstudio.engine.inpaint import InpaintInputs
from sdstudio.engine.job import BatchOutput, Job
from sdstudio.engine.requests import Capture, GeneratedImage
from sdstudio.engine.stages import decode_latents, encode_image, to_pil
from sdstudio.engine.upscale import latent_mode, upscale_image, upscale_latents
from sdstudio.errors import RequestError


class HiresJob:
    """Runs `first` (a txt2img Job whose request has enable_hr) with a second pass after each batch.

    second_addons: the LoRAs and embeddings of the hires prompt (the same LoRAs as the first prompt's).
    progress: the caller's callback; both Jobs report into it as one run."""

    def __init__(self, first: Job, second_addons: AddOns, progress: ProgressCallback | None = None):
        req, model = first.req, first.model
        self.first, self.factor = first, model.vae_scale_factor
        self.size = hires_size(req, self.factor)
        if [(f.name, w) for f, w in second_addons.loras] != [(f.name, w) for f, w in first.addons.loras]:
            raise RequestError("hr_prompt must name the same LoRAs, with the same weights, as the prompt: one set of "
                               "<lora:...> tags applies to both passes", "hr_prompt")
        choice = second_choice(req, first.choice)
        self.second = Job(model, second_request(req, choice, self.factor), choice, first.version, None, first.cancel,
                          first.vae_choice, second_addons, first.controls, first.annotators)
        self.first_steps = evaluations(first, has_init=False)
        total = self.first_steps + evaluations(self.second, has_init=True)
        first.progress = shifted(progress, 0, total)
        self.second.progress = shifted(progress, self.first_steps, total)
        # what the model wears for the whole run: the first prompt's LoRAs and both prompts' embeddings
        known = {e.name for e in first.addons.embeddings}
        extra = tuple(e for e in second_addons.embeddings if e.name not in known)
        self.addons = dataclasses.replace(first.addons, embeddings=first.addons.embeddings + extra,
                                          reports=first.addons.reports)
        self.vae = first.vae

    def run(self) -> tuple[list[GeneratedImage], Tensor]:
        return self.first.run(self.run_batch)

    def run_batch(self, iteration: int, seeds: list[int], init: Tensor | None,
                  inpaint: InpaintInputs | None = None) -> BatchOutput:
        low = self.first.run_batch(iteration, seeds, None)
        high = self.second.run_batch(iteration, seeds, self.upscale(low.latents))
        size = (self.second.req.width, self.second.req.height)
        highs = high.captures or [Capture([], [], [], [])] * len(low.captures)  # a second pass of 0 steps
        captures = [join_captures(a, b, self.first_steps, size) for a, b in zip(low.captures, highs, strict=True)]
        return BatchOutput(high.latents, captures, low.scheduler_config)

    def upscale(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) first-pass latents -> (B, C, H, W) at the hires size."""
        f, (width, height) = self.factor, self.size.upscale_to
        mode = latent_mode(self.first.req.hr_upscaler)
        if mode is not None:
            big = upscale_latents(latents, (height // f, width // f), mode.name)
        else:
            vae = self.first.vae
            pictures = to_pil(decode_latents(vae, latents), f)
            big = torch.cat([encode_image(vae, upscale_image(p, (width, height), self.first.req.hr_upscaler),
                                          width, height, f) for p in pictures])
        left, top, right, bottom = self.size.crop_box(f)
        return big[:, :, top:bottom, left:right].to(latents.device, latents.dtype)


def evaluations(job: Job, has_init: bool) -> int:
    """How many model evaluations the job's loop will make (a fresh scheduler's timesteps, on the CPU)."""
    scheduler = job.choice.build(job.model.scheduler_config, [0], zero_snr=job.req.zero_terminal_snr)
    return len(schedule_timesteps(scheduler, job.req, has_init, torch.device("cpu")))


def shifted(progress: ProgressCallback | None, offset: int, total: int) -> ProgressCallback | None:
    """Events of one pass as steps offset+1 .. of `total` in one run."""
    if progress is None:
        return None

    def report(event: ProgressEvent) -> None:
        progress(dataclasses.replace(event, step=offset + event.step, steps=total))

    return report


def join_captures(low: Capture, high: Capture, offset: int, size: tuple[int, int]) -> Capture:
    """One capture through both passes; first-pass frames are scaled (nearest) by the upscale factor."""
    ratio = size[0] / low.decoded[0].width if low.decoded else 1.0

    def big(frames: list[Image.Image]) -> list[Image.Image]:
        return [f.resize((round(f.width * ratio), round(f.height * ratio)), Image.Resampling.NEAREST) for f in frames]

    return Capture(steps=low.steps + [offset + s for s in high.steps], decoded=big(low.decoded) + high.decoded,
                   denoised=big(low.denoised) + high.denoised, latents=big(low.latents) + high.latents)
