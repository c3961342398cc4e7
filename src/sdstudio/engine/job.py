"""One validated job on one loaded model: conditioning, n_iter batches through the loop, images."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdstudio.engine import infotext as a1111
from sdstudio.engine.capture import FrameCapture
from sdstudio.engine.hooks import CancelToken, ProgressCallback, ProgressEvent, StepHook, StepState, chain
from sdstudio.engine.loop import Plan, denoise
from sdstudio.engine.preview import LatentRGB, fit_latent_rgb
from sdstudio.engine.record import environment, image_record
from sdstudio.engine.requests import Capture, GeneratedImage, GenerationRequest
from sdstudio.engine.stages import (
    decode_latents,
    encode_image,
    initial_noise,
    make_generators,
    set_timesteps,
    start_latents,
    step_kwargs,
    to_pil,
)
from sdstudio.models.loader import LoadedModel
from sdstudio.prompts.conditioning import GuidedConditioning, StaticCond, TextConditioning
from sdstudio.prompts.encode import PromptEncoder
from sdstudio.samplers import SamplerChoice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOutput:
    latents: Tensor             # (B, C, h, w) final
    captures: list[Capture]     # one per image, empty when capture is off
    scheduler_config: dict[str, Any]


class Job:
    def __init__(self, model: LoadedModel, req: GenerationRequest, choice: SamplerChoice, version: str,
                 progress: ProgressCallback | None = None, cancel: CancelToken | None = None):
        self.model, self.req, self.choice, self.version = model, req, choice, version
        self.progress, self.cancel = progress, cancel

    def run(self) -> tuple[list[GeneratedImage], Tensor]:
        req, model = self.req, self.model
        cond = self.conditioning()
        init = self.init_latents()
        images: list[GeneratedImage] = []
        all_latents: list[Tensor] = []
        for iteration in range(req.n_iter):
            if self.cancel:
                self.cancel.raise_if_cancelled()
            first = iteration * req.batch_size
            seeds = [req.seed + first + k for k in range(req.batch_size)]
            out = self.run_batch(iteration, seeds, cond, init)
            pictures = to_pil(decode_latents(model.vae, out.latents), model.vae_scale_factor)
            for k, picture in enumerate(pictures):
                capture = out.captures[k] if out.captures else None
                images.append(self.describe(picture, first + k, seeds[k], out.scheduler_config, capture))
            all_latents.append(out.latents.float().cpu())
        return images, torch.cat(all_latents)

    def conditioning(self) -> GuidedConditioning:
        encoder = self.model.memo.get("prompt_encoder")
        if encoder is None:
            encoder = self.model.memo["prompt_encoder"] = PromptEncoder(self.model.tokenizer,
                                                                        self.model.text_encoder)
        positive = TextConditioning(encoder(self.req.prompt).to(self.model.dtype))
        negative = TextConditioning(encoder(self.req.negative_prompt).to(self.model.dtype))
        return GuidedConditioning(positive, negative)

    def init_latents(self) -> Tensor | None:
        req = self.req
        if req.init_image is None:
            return None
        if int(req.steps * req.strength) == 0:
            log.warning("strength %s over %d steps denoises nothing: the init image comes back",
                        req.strength, req.steps)
        return encode_image(self.model.vae, req.init_image, req.width, req.height, self.model.vae_scale_factor)

    def run_batch(self, iteration: int, seeds: list[int], cond: GuidedConditioning,
                  init: Tensor | None) -> BatchOutput:
        req, model = self.req, self.model
        scheduler = self.choice.build(model.scheduler_config, seeds)
        strength = req.strength if init is not None else None
        timesteps = set_timesteps(scheduler, req.steps, strength, model.device)
        generators = make_generators(seeds)
        f = model.vae_scale_factor
        noise = initial_noise(generators, (model.latent_channels, req.height // f, req.width // f),
                              model.device, model.dtype)
        batch = len(seeds)
        plan = Plan(
            latents=start_latents(scheduler, noise, timesteps, init),
            timesteps=timesteps,
            cond=StaticCond(GuidedConditioning(cond.positive.repeat(batch), cond.negative.repeat(batch))),
            cfg_scale=float(req.cfg_scale),
            step_kwargs=step_kwargs(scheduler, generators),
        )
        capture = FrameCapture(req.capture_every) if req.capture_every else None
        hook = chain([self.cancel.hook if self.cancel else None, self.progress_hook(iteration, len(timesteps)),
                      capture])
        latents = denoise(model.unet, scheduler, plan, hook)
        captures = capture.render(model.vae, f) if capture else []
        return BatchOutput(latents, captures, json.loads(scheduler.to_json_string()))

    def progress_hook(self, iteration: int, total: int) -> StepHook | None:
        if self.progress is None:
            return None
        callback, n_iter = self.progress, self.req.n_iter

        def hook(state: StepState) -> None:
            first = state.latents[0]
            callback(ProgressEvent(iteration, n_iter, state.step + 1, total, lambda: self.latent_rgb()(first)))

        return hook

    def latent_rgb(self) -> LatentRGB:
        memo = self.model.memo
        if "latent_rgb" not in memo:
            memo["latent_rgb"] = fit_latent_rgb(self.model.vae, self.model.vae_scale_factor)
        return memo["latent_rgb"]

    def describe(self, picture, index: int, seed: int, scheduler_config: dict[str, Any],
                 capture: Capture | None) -> GeneratedImage:
        req, model = self.req, self.model
        params = a1111.generation_params(req, seed, model.short_hash, self.version)
        text = a1111.format_infotext(req.prompt, req.negative_prompt, params)
        record = image_record(
            req, index, seed,
            model={"name": model.name, "sha256": model.sha256, "hash": model.short_hash,
                   "prediction_type": model.prediction_type},
            sampler={"name": req.sampler, "schedule": req.schedule,
                     "scheduler": self.choice.sampler.scheduler_class, "config": scheduler_config},
            env=environment(model.device, model.dtype),
        )
        picture.info["parameters"] = text
        return GeneratedImage(picture, index, seed, text, record, capture)
