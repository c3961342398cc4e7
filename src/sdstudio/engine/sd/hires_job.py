"""Hires fix, the run: two Jobs on one model, composed per batch (AUTOMATIC1111's `sample` + `sample_hr_pass`).

    pass 1   the request as txt2img at width x height                          (B, C, h, w)
    upscale  latent mode: F.interpolate the latents to the hires size;
             image upscaler: decode, resize each picture (8-bit, as A1111), encode  (B, C, H', W')
             then centre-crop to the target when both resize sides were given       (B, C, H, W)
    pass 2   img2img from those latents on the same seeds: its noise is drawn afresh from each image's
             seed at the hires size, as A1111 draws it; hr steps, `strength`, hr sampler and prompt

Both passes are the one loop (Job.run_batch); the first Job decodes and describes the result as the request.
Each Job gets its share of the progress when it is made: nothing is changed in a Job afterwards.
Progress counts the evaluations of both passes as one run of first + second steps; cancel stops either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from PIL import Image
from torch import Tensor

from sdstudio.engine.hooks import CancelToken, ProgressCallback, ProgressEvent
from sdstudio.engine.pipelines.upscale import latent_mode, upscale_image, upscale_latents
from sdstudio.engine.requests import Capture, GeneratedImage, GenerationRequest
from sdstudio.engine.sd.addons import AddOns
from sdstudio.engine.sd.control import LoadedControl
from sdstudio.engine.sd.handoff import schedule_timesteps
from sdstudio.engine.sd.hires import hires_size, second_choice, second_request
from sdstudio.engine.sd.ip_adapter import ImagePrompt
from sdstudio.engine.sd.job import BatchOutput, Job, JobInputs
from sdstudio.engine.sd.stages import decode_latents, encode_image, to_pil
from sdstudio.errors import RequestError
from sdstudio.models.load.loader import LoadedModel
from sdstudio.models.load.vae import VaeChoice
from sdstudio.prompts.build import PromptPlan
from sdstudio.samplers import SamplerChoice


class HiresJob:
    """Runs the request (a txt2img request with enable_hr) as a first Job with a second Job after each batch.

    second_addons / second_prompts: the hires prompt's LoRAs and embeddings (the same LoRAs as the first
    prompt's) and its schedule. progress: the caller's callback; both Jobs report into it as one run."""

    def __init__(self, model: LoadedModel, req: GenerationRequest, choice: SamplerChoice, version: str,
                 progress: ProgressCallback | None, cancel: CancelToken | None, vae: VaeChoice | None, addons: AddOns,
                 controls: Sequence[LoadedControl], annotators: Path | None, prompts: PromptPlan,
                 second_addons: AddOns, second_prompts: PromptPlan, preview_vae: AutoencoderTiny | None = None,
                 image_prompts: tuple[ImagePrompt, ...] = ()):
        assert req.hires is not None
        self.factor, self.upscaler = model.vae_scale_factor, req.hires.upscaler
        self.size = hires_size(req, self.factor)
        if [(f.name, w) for f, w in second_addons.loras] != [(f.name, w) for f, w in addons.loras]:
            raise RequestError("hr_prompt must name the same LoRAs, with the same weights, as the prompt: one set of "
                               "<lora:...> tags applies to both passes", "hr_prompt")
        hr_choice = second_choice(req, choice)
        hr_req = second_request(req, hr_choice, self.factor)
        self.first_steps = evaluations(model, req, choice, has_init=False)
        total = self.first_steps + evaluations(model, hr_req, hr_choice, has_init=True)
        self.first = Job(model, req, choice, version, prompts, shifted(progress, 0, total), cancel, vae, addons,
                         controls, annotators, preview_vae, image_prompts)
        self.second = Job(model, hr_req, hr_choice, version, second_prompts, shifted(progress, self.first_steps, total),
                          cancel, vae, second_addons, controls, annotators, preview_vae, image_prompts)
        # what the model wears for the whole run: the first prompt's LoRAs and both prompts' embeddings
        known = {e.name for e in addons.embeddings}
        extra = tuple(e for e in second_addons.embeddings if e.name not in known)
        self.addons = dataclasses.replace(addons, embeddings=addons.embeddings + extra, reports=addons.reports)
        self.vae = self.first.vae

    def run(self) -> tuple[list[GeneratedImage], Tensor]:
        second_inputs = self.second.inputs()  # the hires pass's ControlNet images, at the hires size

        def both_passes(iteration: int, seeds: list[int], init: Tensor | None, inputs: JobInputs) -> BatchOutput:
            low = self.first.run_batch(iteration, seeds, None, inputs)
            high = self.second.run_batch(iteration, seeds, self.upscale(low.latents), second_inputs)
            size = (self.second.req.width, self.second.req.height)
            highs = high.captures or [Capture([], [], [], [])] * len(low.captures)  # a second pass of 0 steps
            captures = [join_captures(a, b, self.first_steps, size) for a, b in zip(low.captures, highs, strict=True)]
            return BatchOutput(high.latents, captures, low.scheduler_config)

        return self.first.run(both_passes)

    def upscale(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) first-pass latents -> (B, C, H, W) at the hires size."""
        f, (width, height) = self.factor, self.size.upscale_to
        mode = latent_mode(self.upscaler)
        if mode is not None:
            big = upscale_latents(latents, (height // f, width // f), mode.name)
        else:
            vae = self.first.vae
            pictures = to_pil(decode_latents(vae, latents), f)
            big = torch.cat([encode_image(vae, upscale_image(p, (width, height), self.upscaler),
                                          width, height, f) for p in pictures])
        left, top, right, bottom = self.size.crop_box(f)
        return big[:, :, top:bottom, left:right].to(latents.device, latents.dtype)


def evaluations(model: LoadedModel, req: GenerationRequest, choice: SamplerChoice, has_init: bool) -> int:
    """How many model evaluations a job's loop will make (a fresh scheduler's timesteps, on the CPU)."""
    scheduler = choice.build(model.scheduler_config, [0], zero_snr=req.zero_terminal_snr, xl=model.is_xl)
    return len(schedule_timesteps(scheduler, req, has_init, torch.device("cpu")))


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
