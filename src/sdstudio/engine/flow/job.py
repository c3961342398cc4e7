"""One resolved request on one loaded flow model: conditioning once, then batches through the flow loop.

Seeds: image k's start noise is torch.randn((1, 16, H/8, W/8), generator=Generator("cpu").manual_seed(seed + k)),
as the reference pipelines draw it with one generator per image; Flux packs it afterwards. img2img starts from
x = sigma_0 * noise + (1 - sigma_0) * z0 with z0 the posterior mean (nothing drawn from the image's generator).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdstudio import __version__
from sdstudio.a1111 import infotext as a1111
from sdstudio.a1111.extras import controlnet_params
from sdstudio.engine.batches import DecodedBatch, run_batches
from sdstudio.engine.flow.control import FlowControl, flux_residuals, sd3_residuals
from sdstudio.engine.flow.control import prepare as prepare_control
from sdstudio.engine.flow.encode import FlowConditioning, WeightedText, encode
from sdstudio.engine.flow.latents import (
    encode_image,
    image_ids,
    pack,
    scheduler_for,
    sigmas,
    unpack,
)
from sdstudio.engine.flow.loop import FlowPlan, Velocity, denoise
from sdstudio.engine.hooks import CancelToken, ProgressCallback, ProgressEvent, StepHook, StepState, StopEarly, chain
from sdstudio.engine.record import environment, image_record
from sdstudio.engine.requests import Capture, GeneratedImage, GenerationRequest
from sdstudio.engine.sd.canvas import InpaintSource, inpaint_source
from sdstudio.engine.sd.capture import FrameCapture
from sdstudio.engine.sd.control import LoadedControl, infotext_units
from sdstudio.engine.sd.inpaint import inpaint_inputs
from sdstudio.engine.sd.preview import LatentRGB, fit_latent_rgb
from sdstudio.engine.sd.stages import decode_latents, make_generators, to_pil
from sdstudio.engine.sd.variation import start_noise
from sdstudio.models.load.flow import FAMILY_NAMES, FlowModel
from sdstudio.models.load.memory import device_of


@dataclass(frozen=True)
class FlowInputs:
    """What every batch starts from: z0 (1, 16, h, w) for img2img/inpaint; the latent mask (1, 1, h, w) and
    the canvas that pastes the result back, for inpainting."""

    z0: Tensor | None = None
    mask: Tensor | None = None
    source: InpaintSource | None = None


class FlowJob:
    def __init__(self, model: FlowModel, req: GenerationRequest, prompts: tuple[WeightedText, WeightedText],
                 progress: ProgressCallback | None, cancel: CancelToken | None,
                 extra_params: dict[str, Any] | None = None, nets: Sequence[LoadedControl] = (),
                 annotators: Path | None = None, recorded: GenerationRequest | None = None):
        """recorded: the request the images' record and infotext state (a hires fix's whole request), else `req`."""
        self.model, self.req, self.prompts, self.extra_params = model, req, prompts, extra_params or {}
        self.recorded = recorded or req
        self.nets, self.annotators = tuple(nets), annotators
        self.controls: list[FlowControl] = []
        self.progress, self.cancel = progress, cancel
        self.scheduler = scheduler_for(model, req.shift)
        self.h, self.w = req.height // model.factor, req.width // model.factor
        strength = None if req.mode == "txt2img" else req.strength
        self.sigmas = sigmas(model, self.scheduler, req.steps, req.width, req.height, strength)

    @property
    def guided(self) -> bool:
        """CFG with a negative batch: SD3 above scale 1; Flux ("true CFG") likewise."""
        return self.req.cfg_scale > 1.0

    def run(self) -> tuple[list[GeneratedImage], Tensor]:
        inputs, cond, uncond = self.prepare()
        return run_batches(self.req, self.cancel, lambda i, seeds: self.batch(i, seeds, inputs, cond, uncond),
                           self.describe)

    def prepare(self) -> tuple[FlowInputs, FlowConditioning, FlowConditioning | None]:
        """What every batch starts from, and the prompts' conditioning (the negative only when guided)."""
        positive, negative = self.prompts
        cond = encode(self.model, positive, self.req.clip_skip)
        uncond = encode(self.model, negative, self.req.clip_skip) if self.guided else None
        return self.inputs(), cond, uncond

    def inputs(self) -> FlowInputs:
        req, model = self.req, self.model
        self.controls = [prepare_control(model, unit, net.model, req.width, req.height, req.init_image, req.mask,
                                         self.annotators) for unit, net in zip(req.controlnets, self.nets, strict=True)]
        if req.mode == "txt2img" or req.init_latents is not None:  # a hires pass gets its latents per batch
            return FlowInputs()
        if req.mode == "img2img":
            return FlowInputs(encode_image(model, req.init_image, req.width, req.height))
        source = inpaint_source(req.init_image, req.mask, req.width, req.height, blur=req.mask_blur,
                                invert=req.invert_mask, only_masked=req.only_masked,
                                padding=req.only_masked_padding, keep_unmasked=req.keep_unmasked, soft=False)
        inputs = inpaint_inputs(model.vae, source.image, source.mask, req.width, req.height, model.factor, False)
        return FlowInputs(inputs.image_latents.float(), inputs.mask.float(), source)

    def batch(self, iteration: int, seeds: list[int], inputs: FlowInputs, cond: FlowConditioning,
              uncond: FlowConditioning | None) -> DecodedBatch:
        latents, captures = self.denoised(iteration, seeds, inputs, cond, uncond)
        pictures = to_pil(decode_latents(self.model.vae, latents, self.check), self.model.factor)
        if inputs.source is not None:
            pictures = [inputs.source.canvas.finish(p) for p in pictures]
        return DecodedBatch(latents, pictures, captures, json.loads(self.scheduler.to_json_string()))

    def denoised(self, iteration: int, seeds: list[int], inputs: FlowInputs, cond: FlowConditioning,
                 uncond: FlowConditioning | None) -> tuple[Tensor, list[Capture]]:
        """The batch's final latents (B, 16, h, w) on the CPU, and its captures when the request asks."""
        model, req, n = self.model, self.req, len(seeds)
        noise = start_noise(seeds, make_generators(seeds), req, iteration * req.batch_size, (16, self.h, self.w),
                            model.factor, torch.device("cpu"), torch.float32)  # variation seeds as A1111
        x, sig = noise, self.sigmas
        if inputs.z0 is not None:  # rectified flow's forward process at the first kept sigma
            x = sig[0] * noise + (1 - sig[0]) * inputs.z0
        blend = None
        if inputs.mask is not None:
            blend = self.blend_fn(inputs.z0, noise, inputs.mask)
        if model.family == "flux":
            x = pack(x)
        device = device_of(model.transformer)
        plan = FlowPlan(x.to(device), sig, cond.repeat(n), uncond.repeat(n) if uncond is not None else None,
                        float(req.cfg_scale), blend)
        capture = FrameCapture(req.capture_every, self.unpacked) if req.capture_every else None
        try:
            hooks = [self.cancel.hook if self.cancel else None, capture, self.progress_hook(iteration)]
            latents = denoise(self.velocity(n), plan, chain(hooks))
        except StopEarly as stop:  # interrupt/skip: this batch ends as the model's current estimate
            latents = stop.latents
        latents = self.unpacked(latents.float().cpu())
        return latents, capture.render(model.vae, model.factor) if capture else []

    def unpacked(self, latents: Tensor) -> Tensor:
        """(B, 16, h, w) latents from the loop's (Flux: packed tokens)."""
        return unpack(latents, self.h, self.w) if self.model.family == "flux" else latents

    def blend_fn(self, z0: Tensor, noise: Tensor, mask: Tensor) -> Callable[[Tensor, int], Tensor]:
        """After step i: the kept region is z0 at the next sigma, (1 - s) z0 + s noise (the last: z0 itself)."""
        flux, sig = self.model.family == "flux", self.sigmas

        def blend(x: Tensor, i: int) -> Tensor:
            s = sig[i + 1]
            known = (1 - s) * z0 + s * noise
            if flux:
                known, keep = pack(known), pack((1 - mask).expand_as(known))
            else:
                keep = 1 - mask
            return known.to(x) * keep.to(x) + x * (1 - keep.to(x))

        return blend

    def velocity(self, n: int) -> Velocity:
        """The family's transformer call: SD3 takes t = 1000 sigma; Flux takes sigma, its token positions and,
        for Flux-dev, the distilled guidance value."""
        model, dtype = self.model, self.model.transformer.dtype
        transformer = model.transformer
        controls, total = self.controls, len(self.sigmas) - 1
        if model.family == "sd3":
            def sd3(x: Tensor, sigma: Tensor, c: FlowConditioning, i: int) -> Tensor:
                x, t = x.to(dtype), (sigma * 1000).expand(x.shape[0]).to(x.device, dtype)
                extra = sd3_residuals(controls, x, t, c, i, total) if controls else {}
                return transformer(hidden_states=x, timestep=t, encoder_hidden_states=c.context,
                                   pooled_projections=c.pooled, return_dict=False, **extra)[0]
            return sd3
        img_ids = image_ids(self.h, self.w).to(device_of(transformer), dtype)
        guidance = self.req.distilled_cfg_scale if model.guidance_embeds else None

        def flux(x: Tensor, sigma: Tensor, c: FlowConditioning, i: int) -> Tensor:
            rows, x = x.shape[0], x.to(dtype)
            t = (sigma * 1000).expand(rows).to(x.device, dtype) / 1000
            g = None if guidance is None else torch.full((rows,), float(guidance), device=x.device, dtype=dtype)
            txt_ids = torch.zeros(c.context.shape[1], 3, device=x.device, dtype=dtype)
            extra = flux_residuals(controls, x, t, c, guidance, txt_ids, img_ids, i, total) if controls else {}
            return transformer(hidden_states=x, timestep=t, guidance=g, pooled_projections=c.pooled,
                               encoder_hidden_states=c.context, txt_ids=txt_ids, img_ids=img_ids,
                               return_dict=False, **extra)[0]
        return flux

    def check(self) -> None:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()

    def progress_hook(self, iteration: int) -> StepHook | None:
        if self.progress is None:
            return None
        callback, n_iter = self.progress, self.req.n_iter

        def hook(state: StepState) -> None:
            def preview() -> Any:
                z = self.unpacked(state.latents[:1].float().cpu())
                return self.latent_rgb()(z[0])
            callback(ProgressEvent(iteration, n_iter, state.step + 1, state.total, preview))

        return hook

    def latent_rgb(self) -> LatentRGB:
        if "latent_rgb" not in self.model.memo:
            self.model.memo["latent_rgb"] = fit_latent_rgb(self.model.vae, self.model.factor)
        return self.model.memo["latent_rgb"]

    def describe(self, batch: DecodedBatch, k: int, index: int, seed: int) -> GeneratedImage:
        req, model, picture = self.recorded, self.model, batch.pictures[k]
        extra = {"Distilled CFG Scale": req.distilled_cfg_scale if model.guidance_embeds else None,
                 "Shift": req.shift or None, **self.extra_params,
                 **controlnet_params(infotext_units(req.controlnets, self.nets))}
        record = image_record(req, index, seed, model=model_record(model),
                              sampler={"name": req.sampler, "schedule": req.schedule,
                                       "scheduler": type(self.scheduler).__name__,
                                       "config": batch.scheduler_config,
                                       "sigmas": [round(float(s), 6) for s in self.sigmas]},
                              env=environment(model.device, model.dtype))
        params = a1111.generation_params(record["request"], seed, model.short_hash, __version__, extra, index=index)
        text = a1111.format_infotext(req.prompt, req.negative_prompt, params)
        picture.info["parameters"] = text
        return GeneratedImage(picture, index, seed, text, record, batch.captures[k] if batch.captures else None)


def model_record(model: FlowModel) -> dict[str, Any]:
    return {"name": model.name, "sha256": model.sha256, "hash": model.short_hash,
            "family": FAMILY_NAMES[model.family], "t5": model.t5 is not None,
            "guidance_embeds": model.guidance_embeds}
