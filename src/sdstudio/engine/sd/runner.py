"""The Stable Diffusion family's runner (SD1.x, SD2.x, SDXL and their inpainting variants): prepare a request
without loading anything, then load the model and run the prepared job through the one loop (job.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sdstudio import __version__
from sdstudio.engine.hooks import CancelToken, ProgressCallback
from sdstudio.engine.prepared import PreparedJob
from sdstudio.engine.presets import LORA_NAME_METADATA, preset_hints
from sdstudio.engine.requests import GenerationRequest, GenerationResult
from sdstudio.engine.sd import canvas
from sdstudio.engine.sd.addons import AddOnLibrary
from sdstudio.engine.sd.control import LoadedControl
from sdstudio.engine.sd.guidance import freeu_values
from sdstudio.engine.sd.hires import check_hires_upscaler, output_pixels, requested_choice
from sdstudio.engine.sd.hires_job import HiresJob
from sdstudio.engine.sd.ip_adapter import ImagePromptLibrary, adapters_installed
from sdstudio.engine.sd.job import Job
from sdstudio.engine.sd.stages import set_vae_tiling
from sdstudio.engine.validate import ModelGeometry, check_fields, check_multiple, resolve_request
from sdstudio.errors import ModelError, RequestError, SdStudioError
from sdstudio.models.find.catalog import ModelFolders, ModelRef
from sdstudio.models.load.controlnet import ControlNetCache, find_controlnet
from sdstudio.models.load.loader import LoadedModel, ModelManager
from sdstudio.models.load.tiny_vae import preview_tiny_vae
from sdstudio.models.load.vae import VaeCache, find_vae
from sdstudio.prompts.build import PromptPlan, plan_prompts
from sdstudio.prompts.grammar_nodes import PromptSyntaxError
from sdstudio.prompts.grammar_parse import split_networks
from sdstudio.samplers import SamplerChoice
from sdstudio.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
SD_LATENT_FACTOR = 8  # pixels per latent cell, every SD1/SD2/SDXL VAE


class MissingNames:
    """Collects the "unknown ..." errors of the names a request gives (model, VAE, LoRAs, ControlNets, hires
    upscaler), so that a re-run of someone else's image lists everything missing at once, not one per try."""

    def __init__(self) -> None:
        self.errors: list[SdStudioError] = []

    def check(self, resolve: Callable[[], T]) -> T | None:
        try:
            return resolve()
        except (ModelError, RequestError) as e:
            if not str(e).startswith("unknown "):
                raise
            self.errors.append(e)
            return None

    def raise_all(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            kind = ModelError if any(isinstance(e, ModelError) for e in self.errors) else RequestError
            lines = "\n".join(f"- {e}" for e in self.errors)
            error = kind(f"{len(self.errors)} things this request names are missing:\n{lines}")
            error.field = getattr(self.errors[0], "field", None)
            raise error


@dataclass
class SdRunner:
    """Owns every model no other family claims; reports unknown model names after its field checks."""

    settings: Settings
    folders: ModelFolders
    models: ModelManager
    addons: AddOnLibrary
    resolve: object  # (name | None) -> ModelRef, raising ModelError: Engine.model_ref
    name: str = "sd"

    def __post_init__(self) -> None:
        self.vaes = VaeCache(self.models.hashes)
        self.controlnets = ControlNetCache(self.models.hashes)
        self.image_prompts = ImagePromptLibrary(self.folders, self.models.hashes)

    def owns(self, ref: ModelRef | None) -> bool:
        return True

    def prepare(self, request: GenerationRequest, ref: ModelRef | None) -> PreparedJob:
        choice = check_fields(request, self.settings.limits)
        for name in ("width", "height"):  # every SD VAE is 8x: refused before any model is loaded
            if getattr(request, name):
                check_multiple(getattr(request, name), name, SD_LATENT_FACTOR)
        syntax, first = request.prompt_syntax, (request.prompt, request.negative_prompt, request.steps)
        names_only, missing = self.settings.names_only, MissingNames()
        prompts = missing.check(lambda: self.prompt_schedule(*first, syntax))  # names its LoRAs
        controls = tuple(missing.check(lambda u=unit: find_controlnet(u.model, self.folders.controlnet, names_only))
                         for unit in request.controlnets)
        adapters = tuple(missing.check(lambda u=unit: self.image_prompts.find(u, names_only))
                         for unit in request.ip_adapters)
        ref = ref or missing.check(lambda: self.resolve(request.model))  # unknown: listing close ones
        vae = missing.check(lambda: find_vae(request.vae, ref, self.folders.vae, names_only,
                                             self.folders.vae_approx)) if ref else None
        if request.hires is not None:
            missing.check(lambda: check_hires_upscaler(request.hires.upscaler))
        missing.raise_all()  # every missing model, LoRA, ControlNet, VAE and upscaler in one message
        hires = None
        if (hr := request.hires) is not None:  # the second pass reads its own prompt over its own steps
            second = (hr.prompt or request.prompt, hr.negative_prompt or request.negative_prompt,
                      hr.steps or request.steps)
            try:
                hires = prompts if second == first else self.prompt_schedule(*second, syntax)
            except PromptSyntaxError as e:  # name the field the text came from
                e.field = "hr_prompt" if e.prompt == second[0] else "hr_negative_prompt"
                raise
        return PreparedJob(request, self.name, ref, choice, vae, controls, prompts, hires, adapters=adapters)

    def prompt_schedule(self, prompt: str, negative: str, steps: int, syntax: str) -> PromptPlan:
        """The prompts parsed and scheduled once; the LoRAs they name must exist. A1111's parser removes
        `<lora:...>` tags itself (and counts error columns in the prompt as written); the other syntaxes are
        given the prompt without them."""
        plan = plan_prompts(prompt if syntax == "a1111" else split_networks(prompt).text, negative, steps, syntax)
        self.addons.find_loras(prompt)
        return plan

    def generate(self, job: PreparedJob, progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> GenerationResult:
        start = time.perf_counter()
        model = self.models.get(job.model)
        request, warnings = inpaint_checks(job.request, model)
        second = requested_choice(job.request) if job.request.hires is not None else None
        warnings += [c.note for c in (job.sampler, second) if c is not None and c.note]
        for choice in (job.sampler, second):
            check_prediction(choice, model)
        depth = min(e.config.num_hidden_layers for e in model.text.encoders)
        geometry = ModelGeometry(model.vae_scale_factor, model.native_size, depth, model.latent_channels)
        req = resolve_request(request, job.sampler, geometry, self.settings.limits, model.name)
        req = req.replace(freeu=freeu_values(req.freeu, model.family) or False)  # true: the family's, recorded
        log.info("%s: %d image(s), %d steps, %s / %s, seed %d", req.mode, req.total_images, req.steps,
                 req.sampler, req.schedule, req.seed)
        addons = self.addons.resolve(req.prompt, req.negative_prompt, model)
        said = [f.metadata.get(key, "") for f, _ in addons.loras for key in LORA_NAME_METADATA]  # names, metadata
        names = [model.name, *(f.name for f, _ in addons.loras), *filter(None, said)]
        warnings += preset_hints(names, request.sampler, request.steps, request.cfg_scale)
        vae = self.vaes.get(job.vae, model) if job.vae else None
        tiny = preview_tiny_vae(model.ref.path, model.family, self.folders.vae, self.folders.vae_approx)
        preview = self.vaes.get(tiny, model).vae if tiny and self.settings.tiny_vae_previews else None
        controls = tuple(self.load_control(path, model) for path in job.controls)
        if req.ip_adapters and model.offload == "sequential":
            raise RequestError("IP-Adapters add layers to the UNet, which sequential offload streams from the CPU; "
                               "use --offload model or none with them", "ip_adapters")
        adapters, images = self.image_prompts.load(req.ip_adapters, job.adapters, model.unet, model.device,
                                                   model.dtype)
        annotators = self.settings.home / "annotators"
        prompts = addons.expand(job.prompts)
        if req.hires is not None:  # hires fix: a second pass after each batch, on the same model
            second = self.addons.resolve(req.hires.prompt or req.prompt,
                                         req.hires.negative_prompt or req.negative_prompt, model)
            run = HiresJob(model, req, job.sampler, __version__, progress, cancel, vae, addons, controls, annotators,
                           prompts, second, second.expand(job.hires_prompts), preview, images)
        else:
            run = Job(model, req, job.sampler, __version__, prompts, progress, cancel, vae, addons, controls,
                      annotators, preview, images)
        set_vae_tiling(run.vae, self.settings.vae_tiling, output_pixels(req, model.vae_scale_factor),
                       model.native_size, model.offload != "none")
        with run.addons.applied(model), adapters_installed(model.unet, adapters):
            pictures, latents = run.run()
        return GenerationResult(req, pictures, latents, time.perf_counter() - start, tuple(warnings))

    def load_control(self, path: Path, model: LoadedModel) -> LoadedControl:
        net = self.controlnets.get(path, model.unet, model.device, model.dtype)
        return LoadedControl(net, path.stem if path.is_file() else path.name, self.controlnets.short_hash(path))


# diffusers schedulers that cannot step an x0 ("sample") prediction
NO_SAMPLE_PREDICTION = ("EulerAncestralDiscreteScheduler", "KDPM2DiscreteScheduler",
                        "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler", "PNDMScheduler")


def check_prediction(choice: SamplerChoice | None, model: LoadedModel) -> None:
    """A model that predicts x0 (SDXL-Lightning's 1-step files) with a sampler whose scheduler cannot take it."""
    if choice is None or model.prediction_type != "sample":
        return
    kind = type(choice.build(model.scheduler_config, [0], xl=model.is_xl)).__name__
    if kind in NO_SAMPLE_PREDICTION:
        raise RequestError(f"{model.name} predicts x0 (\"sample\"), which the {choice.sampler.name} sampler cannot "
                           "step: use Euler (--preset lightning) or another sampler", "sampler")


def inpaint_checks(req: GenerationRequest, model: LoadedModel) -> tuple[GenerationRequest, list[str]]:
    """Mask problems a user should hear about: errors for what cannot run, warnings for what we adjusted."""
    channels = model.unet.config.in_channels
    nine = channels != model.latent_channels
    if nine and req.mask is None:
        raise RequestError(f"{model.name} is an inpainting model ({channels}-channel UNet): give it an image and "
                           "a mask, or use a text-to-image model", "mask")
    if req.mask is None:
        return req, []
    if req.inpaint_method == "condition" and not nine:
        raise RequestError(f"inpaint_method 'condition' needs an inpainting checkpoint (9-channel UNet); {model.name} "
                           f"has {channels} input channels: use 'blend' or 'auto'", "inpaint_method")
    warnings = []
    if req.init_image is not None and req.mask.size != req.init_image.size:
        warnings.append(f"the mask is {req.mask.width}x{req.mask.height} but the image is "
                        f"{req.init_image.width}x{req.init_image.height}: the mask was resized to fit")
    if canvas.is_empty(req.mask, req.invert_mask, req.soft_inpainting):
        warnings.append("the mask is empty (nothing is white): ran as plain img2img")
        # an inpainting UNet still needs its mask input: an all-zero mask, and nothing pasted back
        req = req.replace(keep_unmasked=False, only_masked=False) if nine else req.replace(mask=None)
    for warning in warnings:
        log.info("warning for the user: %s", warning)  # doors show result.warnings
    return req, warnings
