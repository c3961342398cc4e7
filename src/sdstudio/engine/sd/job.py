"""One prepared job on one loaded model: its inputs computed once, each batch through the one loop, images.

    inputs()    init latents, inpainting inputs and canvas, ControlNet control images  (JobInputs, once)
    run_batch   one batch of seeds through the loop                                   (BatchOutput)
    run         every batch (engine/batches.py), decoded, put back in the canvas, described
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import AutoencoderTiny
from PIL import Image
from torch import Tensor

from sdstudio.a1111 import infotext as a1111
from sdstudio.a1111.extras import controlnet_params
from sdstudio.engine.batches import DecodedBatch, run_batches
from sdstudio.engine.hooks import (
    CancelToken,
    ProgressCallback,
    ProgressEvent,
    StepHook,
    StepState,
    StopEarly,
    chain,
)
from sdstudio.engine.record import environment, image_record
from sdstudio.engine.requests import Capture, GeneratedImage, GenerationRequest
from sdstudio.engine.sd.addons import AddOns
from sdstudio.engine.sd.canvas import Canvas, InpaintSource, inpaint_source
from sdstudio.engine.sd.capture import FrameCapture
from sdstudio.engine.sd.control import ControlInput, LoadedControl, control_image, infotext_units, to_tensor
from sdstudio.engine.sd.guidance import freeu, freeu_values, make_guide
from sdstudio.engine.sd.handoff import batch_rows, handoff_start, schedule_timesteps
from sdstudio.engine.sd.inpaint import InpaintInputs, blend_fn, fill_masked, inpaint_inputs, masked_start, soft_blend_fn
from sdstudio.engine.sd.ip_adapter import AdapterScales, ImagePrompt
from sdstudio.engine.sd.loop import Plan, denoise
from sdstudio.engine.sd.preview import LatentRGB, TinyPreview, fit_latent_rgb
from sdstudio.engine.sd.stages import (
    decode_latents,
    encode_image,
    initial_noise,
    make_generators,
    start_latents,
    step_generators,
    step_kwargs,
    to_pil,
)
from sdstudio.engine.sd.variation import start_noise
from sdstudio.models.load.loader import LoadedModel
from sdstudio.models.load.vae import VaeChoice
from sdstudio.pictures import fit
from sdstudio.prompts.build import PromptPlan, build_conditioning
from sdstudio.prompts.compel_syntax import CompelEncoder
from sdstudio.prompts.conditioning import CondProvider, TextConditioning, xl_time_ids
from sdstudio.prompts.encode import EncodedPrompt, PromptEncoder
from sdstudio.samplers import SamplerChoice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobInputs:
    """What every batch of a job starts from."""

    init: Tensor | None                   # (1 | N, C, h, w) init latents z0: img2img, inpaint, handoff
    inpaint: InpaintInputs | None = None  # the mask at latent size and the UNet's extra input
    canvas: Canvas | None = None          # where inpainted pictures go back (only-masked crop, paste-back)
    controls: tuple[ControlInput, ...] = ()  # ControlNet units with control images at the request's size


@dataclass(frozen=True)
class BatchOutput:
    latents: Tensor             # (B, C, h, w) final
    captures: list[Capture]     # one per image, empty when capture is off
    scheduler_config: dict[str, Any]


# (iteration, seeds, init latents of the batch, the job's inputs) -> the batch's final latents
LoopRunner = Callable[[int, list[int], Tensor | None, JobInputs], BatchOutput]


class Job:
    def __init__(self, model: LoadedModel, req: GenerationRequest, choice: SamplerChoice, version: str,
                 prompts: PromptPlan, progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                 vae: VaeChoice | None = None, addons: AddOns | None = None,
                 controls: Sequence[LoadedControl] = (), annotators: Path | None = None,
                 preview_vae: AutoencoderTiny | None = None, image_prompts: tuple[ImagePrompt, ...] = ()):
        self.image_prompts = image_prompts  # IP-Adapter units, encoded (ip_adapter.py)
        self.model, self.req, self.choice, self.version, self.prompts = model, req, choice, version, prompts
        self.controls = tuple(controls)  # one per req.controlnets unit
        self.annotators = annotators     # pose/depth preprocessor weights
        self.progress, self.cancel, self.vae_choice = progress, cancel, vae
        self.addons = addons or AddOns(req.prompt, req.negative_prompt)
        self._cond: CondProvider | None = None  # built by the first batch, repeated for each
        self.vae = vae.vae if vae else model.vae
        # live previews: a tiny VAE's decode when there is one (the chosen VAE may be it), else latent -> RGB
        self.preview_vae = self.vae if isinstance(self.vae, AutoencoderTiny) else preview_vae

    def run(self, loop: LoopRunner | None = None) -> tuple[list[GeneratedImage], Tensor]:
        """Every batch through `loop` (default: this job's run_batch; hires fix: two passes), decoded and
        described as this job's request."""
        inputs, run_loop, f = self.inputs(), loop or self.run_batch, self.model.vae_scale_factor

        def batch(iteration: int, seeds: list[int]) -> DecodedBatch:
            init = batch_rows(inputs.init, iteration * self.req.batch_size, len(seeds))
            out = run_loop(iteration, seeds, init, inputs)
            between = self.cancel.raise_if_cancelled if self.cancel else None
            pictures = to_pil(decode_latents(self.vae, out.latents, between), f)
            if inputs.canvas is not None:
                pictures = [inputs.canvas.finish(picture) for picture in pictures]
            return DecodedBatch(out.latents, pictures, out.captures, out.scheduler_config)

        return run_batches(self.req, self.cancel, batch, self.describe)

    def conditioning(self, evaluations: int) -> CondProvider:
        """Batch-1 conditioning of every step; `evaluations`: model calls in the loop."""
        req, model = self.req, self.model
        ids = self.time_ids() if model.is_xl else (None, None)

        def finish(encoded: EncodedPrompt, negative: bool) -> TextConditioning:
            images = tuple(p.negative if negative else p.positive for p in self.image_prompts)
            return self.text_cond(encoded, ids[1] if negative else ids[0], images)

        zero = model.is_xl and model.options.get("force_zeros_for_empty_prompt", True)
        return build_conditioning(self.prompts, req.steps, evaluations, self.prompt_encoder(), finish, zero)

    def batch_conditioning(self, evaluations: int, batch: int) -> CondProvider:
        if self._cond is None:
            self._cond = self.conditioning(evaluations)
        return self._cond.repeat(batch)

    def prompt_encoder(self) -> PromptEncoder | CompelEncoder:
        """Cached per model, syntax and clip skip; LoRAs and embeddings change the encoders, so then a fresh one."""
        req = self.req
        make = CompelEncoder if req.prompt_syntax == "compel" else \
            lambda text, skip: PromptEncoder(text, skip, syntax=req.prompt_syntax)
        if self.addons.changes_text_encoders:
            return make(self.model.text, req.clip_skip)
        key = f"prompt_encoder/{req.prompt_syntax}/clip_skip={req.clip_skip}"
        if key not in self.model.memo:
            self.model.memo[key] = make(self.model.text, req.clip_skip)
        return self.model.memo[key]

    def text_cond(self, encoded: EncodedPrompt, time_ids: Tensor | None,
                  images: tuple[Tensor, ...] = ()) -> TextConditioning:
        def place(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(self.model.device, self.model.dtype)

        return TextConditioning(place(encoded.embeds), place(encoded.pooled), place(time_ids), images)

    def time_ids(self) -> tuple[Tensor, Tensor]:
        """SDXL micro-conditioning rows for the positive and negative branch."""
        req, unet = self.req, self.model.unet
        pooled_dim = self.model.text.encoders[-1].config.projection_dim
        count = (unet.config.projection_class_embeddings_input_dim - pooled_dim) // unet.config.addition_time_embed_dim
        width, height = req.original_size or (req.width, req.height)
        left, top = req.crop_left_top
        args = ((height, width), (top, left), (req.height, req.width), count)
        return xl_time_ids(*args, req.aesthetic_score), xl_time_ids(*args, req.negative_aesthetic_score)

    def inputs(self) -> JobInputs:
        """The init image's latents z0 (1, C, h, w); for inpainting also the mask, the UNet's extra input and
        the canvas the pictures go back into; the ControlNet inputs (inside the only-masked crop if any)."""
        req, model = self.req, self.model
        if req.init_latents is not None:  # a handoff, or img2img from latents: (1 | N, C, h, w)
            return JobInputs(req.init_latents.to(model.device, model.dtype), controls=self.control_inputs(None))
        if req.init_image is None:
            return JobInputs(None, controls=self.control_inputs(None))
        if int(req.steps * req.strength) == 0:
            log.warning("strength %s over %d steps denoises nothing: the init image comes back",
                        req.strength, req.steps)
        place = {"device": model.device, "dtype": model.dtype}  # the VAE may run in float32 (force_upcast)
        if req.mask is None:
            z0 = encode_image(self.vae, req.init_image, req.width, req.height, model.vae_scale_factor)
            return JobInputs(z0.to(**place), controls=self.control_inputs(None))
        source = inpaint_source(req.init_image, req.mask, req.width, req.height, blur=req.mask_blur,
                                invert=req.invert_mask, only_masked=req.only_masked,
                                padding=req.only_masked_padding, keep_unmasked=req.keep_unmasked,
                                soft=req.soft_inpainting)
        image = fill_masked(source.image, source.mask) if req.masked_content == "fill" else source.image
        inputs = inpaint_inputs(self.vae, image, source.mask, req.width, req.height, model.vae_scale_factor,
                                self.nine_channel).to(**place)
        return JobInputs(inputs.image_latents, inputs, source.canvas, self.control_inputs(source))

    def control_inputs(self, source: InpaintSource | None) -> tuple[ControlInput, ...]:
        """The ControlNet units with their control images at the request's size (inside the only-masked
        crop of an inpainting `source` when there is one), on the UNet's device and dtype."""
        req, model = self.req, self.model
        init, mask = (source.image, source.mask) if source else (req.init_image, None)
        inputs = []
        for unit, net in zip(req.controlnets, self.controls, strict=True):
            if source is not None and unit.image is not None and source.canvas.cropped:
                whole = fit(unit.image, *source.canvas.original.size, unit.resize_mode)
                unit = dataclasses.replace(unit, image=whole.crop(source.canvas.box), resize_mode="just resize")
            image = to_tensor(control_image(unit, req.width, req.height, init, mask, self.annotators))
            inputs.append(ControlInput(net.model, image.to(model.device, model.dtype), unit.weight, unit.start,
                                       unit.end, unit.guess_mode))
        return tuple(inputs)

    @property
    def nine_channel(self) -> bool:
        return self.model.unet.config.in_channels > self.model.latent_channels

    def run_batch(self, iteration: int, seeds: list[int], init: Tensor | None, inputs: JobInputs) -> BatchOutput:
        req, model, inpaint = self.req, self.model, inputs.inpaint
        scheduler = self.choice.build(model.scheduler_config, seeds, zero_snr=req.zero_terminal_snr, xl=model.is_xl)
        timesteps = schedule_timesteps(scheduler, req, init is not None, model.device)
        generators = make_generators(seeds)
        f = model.vae_scale_factor
        handoff = req.denoising_start is not None  # no noise added, none drawn (diffusers' add_noise=False)
        noise = None if handoff else start_noise(seeds, generators, req, iteration * req.batch_size,
                                                 (model.latent_channels, req.height // f, req.width // f), f,
                                                 model.device, model.dtype)
        batch = len(seeds)
        if inpaint is not None and req.masked_content in ("latent noise", "latent nothing"):
            extra = initial_noise(generators, tuple(noise.shape[1:]), model.device, model.dtype)  # next draws
            init = masked_start(inpaint.image_latents, inpaint.mask, req.masked_content, extra)
        start = handoff_start(init, batch) if handoff else start_latents(scheduler, noise, timesteps, init)
        condition, blend = None, None
        if inpaint is not None:
            if req.strength >= 1.0:  # diffusers' inpainting: pure noise at full strength
                start = noise * scheduler.init_noise_sigma
            if inpaint.condition is not None:
                condition = inpaint.condition.expand(batch, -1, -1, -1)
            z0 = inpaint.image_latents.expand(batch, -1, -1, -1)
            if req.soft_inpainting:
                blend = soft_blend_fn(scheduler, timesteps, z0, noise, inpaint.strength)
            elif inpaint.condition is None or req.inpaint_method == "blend":
                blend = blend_fn(scheduler, timesteps, z0, noise, inpaint.mask)
        guide = make_guide(req, model.unet, self.choice.sampler.cfg_pp)
        plan = Plan(
            latents=start,
            timesteps=timesteps,
            cond=self.batch_conditioning(len(timesteps), batch),
            cfg_scale=float(req.cfg_scale),
            guidance_rescale=float(req.guidance_rescale),
            condition=condition,
            blend=blend,
            step_kwargs=step_kwargs(scheduler, step_generators(seeds, generators, req.eta_noise_seed_delta), req.eta),
            controls=inputs.controls,
            check=self.cancel.raise_if_cancelled if self.cancel else None,
            per_image=model.per_image,  # batch-invariant (rows.py): on CPU by default
            guide=guide,
            before_step=AdapterScales(model.unet, self.image_prompts) if self.image_prompts else None,
        )
        if guide is not None and guide.keep_uncond:  # a CFG++ sampler re-noises along eps_u (samplers/cfgpp.py)
            scheduler.uncond_output = lambda: guide.last_uncond
        capture = FrameCapture(req.capture_every) if req.capture_every else None
        hook = chain([self.cancel.hook if self.cancel else None, self.progress_hook(iteration, len(timesteps)),
                      capture])
        try:
            with freeu(model.unet, freeu_values(req.freeu, model.family)):
                latents = denoise(model.unet, scheduler, plan, hook)
        except StopEarly as stop:  # interrupt/skip: this batch ends as the model's current estimate
            latents = stop.latents
        captures = capture.render(self.vae, f) if capture else []
        return BatchOutput(latents, captures, json.loads(scheduler.to_json_string()))

    def progress_hook(self, iteration: int, total: int) -> StepHook | None:
        if self.progress is None:
            return None
        callback, n_iter = self.progress, self.req.n_iter

        def hook(state: StepState) -> None:
            first = state.latents[0]
            callback(ProgressEvent(iteration, n_iter, state.step + 1, total, lambda: self.previewer()(first)))

        return hook

    def previewer(self) -> Callable[[Tensor], Image.Image]:
        return TinyPreview(self.preview_vae) if self.preview_vae is not None else self.latent_rgb()

    def latent_rgb(self) -> LatentRGB:
        memo, key = self.model.memo, f"latent_rgb/{self.vae_choice.hash if self.vae_choice else 'own'}"
        if key not in memo:
            memo[key] = fit_latent_rgb(self.vae, self.model.vae_scale_factor)
        return memo[key]

    def describe(self, batch: DecodedBatch, k: int, index: int, seed: int) -> GeneratedImage:
        """Image k of `batch`, index `index` of the job, with its infotext and record."""
        req, model, picture = self.req, self.model, batch.pictures[k]
        capture = batch.captures[k] if batch.captures else None
        vae = (self.vae_choice.name, self.vae_choice.hash) if self.vae_choice else None
        units = infotext_units(req.controlnets, self.controls) + [p.infotext_unit() for p in self.image_prompts]
        extra = {**self.addons.infotext(), **controlnet_params(units)}
        record = image_record(
            req, index, seed,
            model={"name": model.name, "sha256": model.sha256, "hash": model.short_hash, "family": model.family,
                   "prediction_type": model.prediction_type, "vae": vae and {"name": vae[0], "hash": vae[1]}},
            sampler={"name": req.sampler, "schedule": req.schedule,
                     "scheduler": batch.scheduler_config.get("_class_name"), "config": batch.scheduler_config},
            env=environment(model.device, model.dtype),
            addons=self.addons.record(),
        )
        params = a1111.generation_params(record["request"], seed, model.short_hash, self.version, extra, vae,
                                         index=index)
        text = a1111.format_infotext(req.prompt, req.negative_prompt, params)
        picture.info["parameters"] = text
        return GeneratedImage(picture, index, seed, text, record, capture)
