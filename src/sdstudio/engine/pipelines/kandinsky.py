"""Kandinsky 2.2 through diffusers' pipelines, behind the engine's GenerationRequest/GenerationResult.

Kandinsky 2.2 does not fit the one loop (DESIGN.md, "Families that do not fit the loop"): a prior
(PriorTransformer, UnCLIP sampler) turns the prompt's CLIP text embedding into a CLIP *image* embedding,
and a decoder UNet conditioned on that embedding alone (no text) denoises MoVQ latents (DDPM):

    prior    KandinskyV22PriorPipeline     prompt, negative prompt -> image_embeds, negative_image_embeds
    decoder  KandinskyV22Pipeline          txt2img
             KandinskyV22Img2ImgPipeline   img2img: strength keeps the last min(int(steps * strength), steps)
             KandinskyV22InpaintPipeline   inpaint (the 9-channel inpainting decoder; always from noise)

An empty negative prompt gives the image encoder's embedding of an all-zero input as the negative (the
pipelines' default); a negative prompt goes through the prior too. Progress and cancel go through each pipeline's
`callback_on_step_end`: one ProgressEvent per prior step, then per decoder step; a cancel raises Cancelled
at the next step end. Masks are ours and diffusers' (>= 0.19) alike: white = repaint.

Seeds: image i of a request with seed s uses torch.Generator("cpu").manual_seed(s + i) for its prior
noise (its prompt row, then its negative row), and a fresh one with the same seed for the decoder, whose
start noise is then torch.randn((1, 4, h, w), generator=...) as for Stable Diffusion: an image does not
depend on its batch. What the pipelines cannot do is a RequestError naming the field (`check_supported`).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdstudio import __version__
from sdstudio.a1111 import infotext as a1111
from sdstudio.engine.batches import DecodedBatch, run_batches
from sdstudio.engine.hooks import CancelToken, ProgressCallback, ProgressEvent
from sdstudio.engine.prepared import PreparedJob
from sdstudio.engine.record import environment, image_record
from sdstudio.engine.requests import (
    DEFAULT_SAMPLER,
    DEFAULT_SCHEDULE,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
)
from sdstudio.engine.sd import canvas as masks
from sdstudio.engine.sd.preview import LatentRGB, calibration_images
from sdstudio.engine.sd.stages import make_generators, to_pil
from sdstudio.engine.validate import check_fields, default_size
from sdstudio.errors import RequestError
from sdstudio.models.find.catalog import ModelRef
from sdstudio.models.find.hashing import HashCache, short_hash
from sdstudio.models.load.kandinsky import KandinskyModel, KandinskyModels, decoder_sampler, is_kandinsky_folder
from sdstudio.models.load.memory import device_of
from sdstudio.prompts.grammar import parse
from sdstudio.prompts.grammar_attention import attention
from sdstudio.settings import Limits, Settings

__all__ = ["KandinskyOptions", "KandinskyRunner", "check_supported", "is_kandinsky_folder"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KandinskyOptions:
    """The prior's settings (the request's steps and cfg_scale are the decoder's): diffusers' defaults."""

    prior_steps: int = 25
    prior_cfg_scale: float = 4.0


class KandinskyRunner:
    """Runs requests on Kandinsky 2.2 models (one LRU of them, beside the engine's SD models)."""

    def __init__(self, settings: Settings, hashes: HashCache, options: KandinskyOptions | None = None):
        self.settings, self.options = settings, options or KandinskyOptions()
        self.models = KandinskyModels(settings.device, settings.dtype, settings.offload, hashes,
                                      settings.models_in_memory)

    name = "kandinsky"

    def owns(self, ref: ModelRef | None) -> bool:
        return ref is not None and is_kandinsky_folder(ref.path)

    def prepare(self, request: GenerationRequest, ref: ModelRef | None) -> PreparedJob:
        assert ref is not None  # owns() said so
        texts = check_supported(request, decoder_sampler(ref.path), self.settings.limits)
        return PreparedJob(request, self.name, ref, plain_prompts=texts)

    def generate(self, job: PreparedJob, progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> GenerationResult:
        start = time.perf_counter()
        model, texts = self.models.get(job.model), job.plain_prompts
        req, warnings = resolve_request(job.request, model, self.settings.limits)
        log.info("kandinsky %s: %d image(s), %d steps, seed %d", req.mode, req.total_images, req.steps, req.seed)
        images, latents = KandinskyJob(model, req, texts, self.options, progress, cancel).run()
        for warning in warnings:
            log.info("warning for the user: %s", warning)
        return GenerationResult(req, images, latents, time.perf_counter() - start, tuple(warnings))


# ---- what Kandinsky can do -----------------------------------------------------------------------------

def check_supported(req: GenerationRequest, sampler: str, limits: Limits) -> tuple[str, str]:
    """RequestError for every field the Kandinsky pipelines cannot honour; then the usual range checks.
    Returns the prompt and negative prompt as the prior reads them (plain text)."""
    def refuse(name: str, message: str) -> RequestError:
        return RequestError(f"{name}: {message}", name)

    if req.sampler not in (DEFAULT_SAMPLER, sampler):
        raise refuse("sampler", f"Kandinsky 2.2 samples with its own schedulers (UnCLIP for the prior, {sampler} for "
                                f"the decoder); leave sampler at its default or use {sampler!r}, got {req.sampler!r}")
    if req.schedule != DEFAULT_SCHEDULE:
        raise refuse("schedule", f"Kandinsky 2.2 uses its schedulers' own timesteps; schedule must be "
                                 f"{DEFAULT_SCHEDULE!r}, got {req.schedule!r}")
    unsupported = [
        ("clip_skip", req.clip_skip != 1, "Kandinsky 2.2's prior reads its text encoder's last layer only; "
                                          "clip_skip must be 1"),
        ("vae", req.vae not in (None, "auto", "none"), "Kandinsky 2.2 decodes with its own MoVQ, which a VAE "
                                                        "cannot replace; leave vae unset"),
        ("capture_every", req.capture_every != 0, "frame capture needs sdstudio's own loop, and Kandinsky 2.2 "
                                                  "runs through diffusers' pipelines; set capture_every to 0"),
        ("guidance_rescale", req.guidance_rescale != 0, "rescale-CFG is not available for Kandinsky 2.2; "
                                                        "set guidance_rescale to 0"),
        ("zero_terminal_snr", req.zero_terminal_snr is not False, "Kandinsky 2.2 keeps its trained noise "
                                                                  "schedule; set zero_terminal_snr to false"),
        ("subseed_strength", req.variation.strength != 0, "variation seeds are not available for Kandinsky 2.2; "
                                                         "set subseed_strength to 0"),
        ("seed_resize_from_w", (req.variation.resize_from_w, req.variation.resize_from_h) != (0, 0),
         "seed resize is not available for Kandinsky 2.2; set seed_resize_from_w and _h to 0"),
        ("controlnets", bool(getattr(req, "controlnets", ())), "ControlNet units are for Stable Diffusion; "
                                                               "Kandinsky 2.2 cannot use them: remove them"),
        ("ip_adapters", bool(getattr(req, "ip_adapters", ())), "IP-Adapters are for Stable Diffusion; "
                                                               "Kandinsky 2.2 cannot use them: remove them"),
        ("guidance", req.guidance != "cfg", "guidance rules other than cfg need sdstudio's own loop; set "
                                            "guidance to 'cfg'"),
        ("pag_scale", req.pag_scale != 0, "perturbed-attention guidance needs sdstudio's own loop; set pag_scale "
                                          "to 0"),
        ("freeu", req.freeu is not False, "FreeU is for Stable Diffusion UNets; set freeu to false"),
        ("eta", req.eta is not None, "Kandinsky 2.2's schedulers take no eta; leave eta unset"),
        ("enable_hr", req.enable_hr is not False, "hires fix needs sdstudio's own loop; set enable_hr to false"),
        ("denoising_end", req.denoising_end is not None, "the latent handoff needs sdstudio's own loop; leave "
                                                         "denoising_end unset"),
        ("denoising_start", req.denoising_start is not None, "the latent handoff needs sdstudio's own loop; leave "
                                                             "denoising_start unset"),
    ]
    if req.mask is not None:
        unsupported += [
            ("masked_content", req.masked_content != "original", "Kandinsky 2.2's inpainting decoder starts the "
             "masked area from noise, guided by the image around it; masked_content must be 'original'"),
            ("only_masked", req.only_masked is not False, "Kandinsky 2.2 inpaints the whole picture; "
                                                          "set only_masked to false"),
            ("soft_inpainting", req.soft_inpainting is not False, "Kandinsky 2.2's inpainting decoder takes a "
                                                                  "0/1 mask; set soft_inpainting to false"),
            ("inpaint_method", req.inpaint_method == "blend", "Kandinsky 2.2 inpaints with its inpainting "
                                                              "decoder's mask input; use 'auto' or 'condition'"),
        ]
    if req.init_latents is not None:
        raise refuse("init_latents", "Kandinsky 2.2 takes an init image, not latents")
    for name, bad, message in unsupported:
        if bad:
            raise refuse(name, f"{message}, got {req.flat_fields()[name]!r}")
    texts = plain_prompts(req)
    check_fields(req.replace(sampler=DEFAULT_SAMPLER, schedule=DEFAULT_SCHEDULE, prompt_syntax="plain"), limits)
    return texts


def plain_prompts(req: GenerationRequest) -> tuple[str, str]:
    """The prompt and negative prompt as plain text. 'a1111' texts may use escapes (\\( ...) but no
    weights, BREAK, editing, alternation, AND or <lora:...> tags; 'plain' passes the text as written."""
    if req.prompt_syntax == "plain":
        return req.prompt, req.negative_prompt
    if req.prompt_syntax != "a1111":
        raise RequestError(f"prompt_syntax: Kandinsky 2.2's prior reads the prompt as plain text; use 'plain' "
                           f"(or 'a1111' without weights), got {req.prompt_syntax!r}", "prompt_syntax")
    if not isinstance(req.prompt, str) or not isinstance(req.negative_prompt, str):
        raise RequestError("prompt and negative_prompt must be text", "prompt")
    return _plain(req.prompt, "prompt", False), _plain(req.negative_prompt, "negative_prompt", True)


def _plain(text: str, name: str, negative: bool) -> str:
    parsed = parse(text, negative=negative)  # PromptSyntaxError (a RequestError) for broken syntax
    if parsed.extra_networks:
        raise RequestError(f"{name}: <{parsed.extra_networks[0].kind}:...> tags (LoRA and other extra networks) "
                           "are for Stable Diffusion; Kandinsky 2.2 cannot use them: remove them", name)
    if len(parsed.subprompts) > 1:
        raise RequestError(f"{name}: AND (composable prompts) is not available for Kandinsky 2.2, whose prior "
                           "reads one plain text", name)
    chunks = attention(parsed.subprompts[0].text)
    if parsed.is_scheduled or any(weight != 1.0 for _, weight in chunks):
        raise RequestError(f"{name}: Kandinsky 2.2 reads the prompt as plain text: weights such as (word:1.2) "
                           "or [word], BREAK and prompt editing [a:b:0.5] are not available; remove them, or set "
                           "prompt_syntax to 'plain' to pass brackets as written", name)
    return "".join(chunk for chunk, _ in chunks)


def resolve_request(req: GenerationRequest, model: KandinskyModel,
                    limits: Limits) -> tuple[GenerationRequest, list[str]]:
    """Checks that need the model, and what the request left open: size, seed, sampler, model name."""
    if model.inpaint and req.mask is None:
        raise RequestError(f"{model.name} is Kandinsky 2.2's inpainting decoder: give it an image and a mask, or "
                           "use the text-to-image decoder (kandinsky-2-2-decoder)", "mask")
    if req.mask is not None and not model.inpaint:
        raise RequestError(f"inpainting with Kandinsky 2.2 needs its inpainting decoder (kandinsky-2-2-decoder-"
                           f"inpaint, a 9-channel UNet); {model.name} is the text-to-image decoder", "mask")
    width, height = _size(req, model, limits)
    warnings, strength = [], req.strength
    if req.mode == "img2img" and min(int(req.steps * strength), req.steps) == 0:
        raise RequestError(f"strength {strength} over {req.steps} steps denoises nothing: Kandinsky 2.2's img2img "
                           f"needs at least one decoder step (strength >= 1/steps)", "strength")
    if req.mode == "inpaint":
        if strength != 1.0:
            warnings.append(f"Kandinsky 2.2 inpainting repaints the masked area from noise: denoising strength "
                            f"{strength} was not used (recorded as 1)")
            strength = 1.0
        if req.mask.size != req.init_image.size:
            warnings.append(f"the mask is {req.mask.width}x{req.mask.height} but the image is "
                            f"{req.init_image.width}x{req.init_image.height}: the mask was resized to fit")
        if masks.is_empty(req.mask, req.invert_mask):
            warnings.append("the mask is empty (nothing is white): nothing was repainted")
    seed = req.seed if req.seed != -1 else random.randrange(2**32)
    resolved = req.replace(width=width, height=height, seed=seed, model=model.name, sampler=model.sampler_name,
                           schedule=DEFAULT_SCHEDULE, strength=strength)
    return resolved, warnings


def _size(req: GenerationRequest, model: KandinskyModel, limits: Limits) -> tuple[int, int]:
    """Multiples of f^2 pixels (64): the pipelines make ceil(H / f^2) * f latent rows (diffusers'
    `downscale_height_and_width`), so only those sizes come out as asked. img2img/inpaint default to the
    init image's size rounded down to that grid; txt2img to the model's native size."""
    grid = model.factor ** 2
    width, height = default_size(req, grid, model.native_size, limits)
    for name, value in (("width", width), ("height", height)):
        if value % grid:
            raise RequestError(f"{name} must be a multiple of {grid} for Kandinsky 2.2 (its decoder works on "
                               f"{grid}-pixel blocks), got {value} (nearest: {value // grid * grid or grid})", name)
    return width, height


# ---- running -----------------------------------------------------------------------------------------

class KandinskyJob:
    """One resolved request on one loaded model: n_iter batches of prior, decoder, MoVQ decode."""

    def __init__(self, model: KandinskyModel, req: GenerationRequest, texts: tuple[str, str],
                 options: KandinskyOptions, progress: ProgressCallback | None, cancel: CancelToken | None):
        self.model, self.req, self.texts, self.options = model, req, texts, options
        self.progress, self.cancel = progress, cancel
        decoder_steps = min(int(req.steps * req.strength), req.steps) if req.mode == "img2img" else req.steps
        self.total = options.prior_steps + decoder_steps  # progress steps per batch

    def run(self) -> tuple[list[GeneratedImage], Tensor]:
        source = self.inpaint_source() if self.req.mode == "inpaint" else None

        def batch(iteration: int, seeds: list[int]) -> DecodedBatch:
            embeds, negative = self.run_prior(iteration, seeds)
            latents = self.run_decoder(iteration, seeds, embeds, negative, source)
            pictures = to_pil(decode(self.model.movq, latents), self.model.factor)
            if source is not None:
                pictures = [source.canvas.finish(picture) for picture in pictures]
            return DecodedBatch(latents, pictures)

        return run_batches(self.req, self.cancel, batch, self.describe)

    def run_prior(self, iteration: int, seeds: list[int]) -> tuple[Tensor, Tensor]:
        """(B, D) image embeddings and negatives. With a negative prompt the prior's rows are the B prompts
        then the B negatives, so each image's generator is listed twice (its draws: prompt row, then negative)."""
        prompt, negative = self.texts
        generators = make_generators(seeds)
        grey = Image.new("RGB", self.latent_size, (128, 128, 128))
        return self.model.prior(
            prompt=prompt, negative_prompt=negative or None, num_images_per_prompt=len(seeds),
            num_inference_steps=self.options.prior_steps, guidance_scale=self.options.prior_cfg_scale,
            generator=generators + generators if negative else generators, output_type="pt", return_dict=False,
            callback_on_step_end=self.callback(iteration, 0, lambda latents: grey))

    def run_decoder(self, iteration: int, seeds: list[int], embeds: Tensor, negative: Tensor,
                    source: masks.InpaintSource | None) -> Tensor:
        """(B, 4, H/f, W/f) final MoVQ latents."""
        req, batch = self.req, len(seeds)
        args: dict[str, Any] = {
            "image_embeds": embeds, "negative_image_embeds": negative, "num_inference_steps": req.steps,
            "guidance_scale": float(req.cfg_scale), "generator": make_generators(seeds), "output_type": "latent",
            "return_dict": False,
            "callback_on_step_end": self.callback(iteration, self.options.prior_steps,
                                                  lambda latents: self.latent_rgb()(latents[0])),
        }
        if req.mode == "txt2img":
            return self.model.pipeline("txt2img")(height=req.height, width=req.width, **args)[0]
        if req.mode == "img2img":
            image = req.init_image.convert("RGB")
            if image.size != (req.width, req.height):  # resized here: the pipeline swaps height and width
                image = image.resize((req.width, req.height), Image.Resampling.BICUBIC, reducing_gap=1)
            # one image per row: with a single one the pipeline draws every row's noise from the first generator
            return self.model.pipeline("img2img")(image=[image] * batch, strength=float(req.strength), height=None,
                                                  width=None, **args)[0]
        # the inpaint pipeline wants one image and mask per embedding row
        return self.model.pipeline("inpaint")(image=[source.image] * batch, mask_image=[source.mask] * batch,
                                              height=req.height, width=req.width, **args)[0]

    def inpaint_source(self) -> masks.InpaintSource:
        """The init image at the output size, the blurred grey mask (binarised at 0.5 by the pipeline) and
        the canvas that pastes the result back (only masked pixels change when keep_unmasked)."""
        req = self.req
        return masks.inpaint_source(req.init_image, req.mask, req.width, req.height, blur=req.mask_blur,
                                    invert=req.invert_mask, only_masked=False, padding=0,
                                    keep_unmasked=req.keep_unmasked, soft=False)

    @property
    def latent_size(self) -> tuple[int, int]:
        f = self.model.factor
        return max(1, self.req.width // f), max(1, self.req.height // f)

    def callback(self, iteration: int, offset: int, preview: Callable[[Tensor], Image.Image]) -> Callable:
        """diffusers' callback_on_step_end: cancel check, then one ProgressEvent (step offset + i + 1)."""
        cancel, progress, n_iter, total = self.cancel, self.progress, self.req.n_iter, self.total

        def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if cancel is not None:
                cancel.raise_if_cancelled()
            if progress is not None:
                latents = kwargs["latents"]
                progress(ProgressEvent(iteration, n_iter, offset + i + 1, total, lambda: preview(latents)))
            return kwargs

        return on_step_end

    def latent_rgb(self) -> LatentRGB:
        if "latent_rgb" not in self.model.memo:
            self.model.memo["latent_rgb"] = fit_movq_rgb(self.model.movq, self.model.factor)
        return self.model.memo["latent_rgb"]

    def describe(self, batch: DecodedBatch, k: int, index: int, seed: int) -> GeneratedImage:
        req, model, options, picture = self.req, self.model, self.options, batch.pictures[k]
        extra = {"Prior steps": options.prior_steps, "Prior CFG scale": options.prior_cfg_scale,
                 "Prior hash": short_hash(model.prior_sha256) if model.layout.prior else None}
        record = image_record(req, index, seed, model=model_record(model), sampler=sampler_record(req, model, options),
                              env=environment(model.device, model.dtype))
        params = a1111.generation_params(record["request"], seed, model.short_hash, __version__, extra)
        text = a1111.format_infotext(req.prompt, req.negative_prompt, params)
        picture.info["parameters"] = text
        return GeneratedImage(picture, index, seed, text, record)


def model_record(model: KandinskyModel) -> dict[str, Any]:
    prior = model.layout.prior or model.layout.decoder
    return {"name": model.name, "sha256": model.sha256, "hash": model.short_hash, "family": model.family,
            "layout": "combined" if model.layout.combined else "decoder + prior",
            "prior": {"path": str(prior), "sha256": model.prior_sha256, "hash": short_hash(model.prior_sha256)}}


def sampler_record(req: GenerationRequest, model: KandinskyModel, options: KandinskyOptions) -> dict[str, Any]:
    """The decoder's scheduler (the request's sampler) and the prior's, with their exact configs."""
    decoder, prior = model.decoder["scheduler"], model.prior.scheduler
    return {"name": req.sampler, "schedule": req.schedule, "scheduler": type(decoder).__name__,
            "config": json.loads(decoder.to_json_string()),
            "prior": {"scheduler": type(prior).__name__, "config": json.loads(prior.to_json_string()),
                      "steps": options.prior_steps, "cfg_scale": options.prior_cfg_scale}}


@torch.inference_mode()
def decode(movq: Any, latents: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] from MoVQ latents (B, 4, h, w), one image at a time, unquantised as the
    pipelines decode (`force_not_quantize`)."""
    z = latents.to(device=device_of(movq), dtype=movq.dtype)
    return torch.cat([movq.decode(z[i: i + 1], force_not_quantize=True).sample for i in range(z.shape[0])])


@torch.inference_mode()
def fit_movq_rgb(movq: Any, factor: int) -> LatentRGB:
    """preview.fit_latent_rgb for MoVQ: least squares of average-pooled RGB on the encoder's latents."""
    images = calibration_images(factor * 8)                                 # (N, 3, 8f, 8f)
    z = movq.encode(images.to(device_of(movq), movq.dtype)).latents.float().cpu()  # (N, 4, 8, 8)
    target = F.avg_pool2d(images, factor)                                   # (N, 3, 8, 8)
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()  # (C+1, 3)
    return LatentRGB(solution[:-1].T.contiguous(), solution[-1].contiguous())
