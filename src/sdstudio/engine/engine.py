"""The engine every door calls: `Engine(settings).generate(request)`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sdstudio import __version__
from sdstudio.engine import canvas
from sdstudio.engine.addons import AddOnLibrary
from sdstudio.engine.control import LoadedControl
from sdstudio.engine.hires import output_pixels
from sdstudio.engine.hires_job import HiresJob
from sdstudio.engine.hooks import CancelToken, ProgressCallback
from sdstudio.engine.job import Job
from sdstudio.engine.kandinsky import KandinskyRunner, find_kandinsky
from sdstudio.engine.requests import GenerationRequest, GenerationResult
from sdstudio.engine.stages import set_vae_tiling
from sdstudio.engine.upscale import UpscaleRequest, UpscaleResult
from sdstudio.engine.validate import ModelGeometry, check_fields, check_types, resolve_request
from sdstudio.engine.x4 import Upscalers
from sdstudio.errors import ModelError, RequestError
from sdstudio.models import catalog
from sdstudio.models.catalog import ModelRef
from sdstudio.models.controlnet import ControlNetCache, find_controlnet
from sdstudio.models.hashing import HashCache
from sdstudio.models.loader import LoadedModel, LoadOptions, ModelManager
from sdstudio.models.speed import SpeedOptions
from sdstudio.models.vae import VaeCache, find_vae
from sdstudio.settings import Settings

log = logging.getLogger(__name__)


class Engine:
    """Owns loaded models and runs generation requests on the configured device."""

    def __init__(self, settings: Settings, models: ModelManager | None = None):
        self.settings = settings
        speed = SpeedOptions(settings.channels_last, settings.compile, settings.compile_mode)
        options = LoadOptions(settings.device, settings.dtype, prediction=settings.prediction, offload=settings.offload,
                              speed=speed)
        budget = int(settings.memory_budget_gb * 2**30) if settings.memory_budget_gb else None
        self.folders = catalog.model_folders(settings)
        self.models = models or ModelManager(options, HashCache(settings.cache_dir / "hashes.json"),
                                             settings.models_in_memory,
                                             [folder for _, folder in self.folders.checkpoints], budget)
        self.vaes = VaeCache(self.models.hashes)
        self.kandinsky = KandinskyRunner(settings, self.models.hashes)  # Kandinsky 2.2: diffusers pipelines
        self.addons = AddOnLibrary(self.folders.lora, self.folders.embeddings, self.models.hashes)
        self.controlnets = ControlNetCache(self.models.hashes)
        self.upscalers = Upscalers(settings, self.folders, self.models.hashes)

    def model_ref(self, name: str | None = None) -> ModelRef:
        name = name or self.settings.default_model
        if not name:
            raise ModelError("no model given: pass a model (a name from `sdstudio models list`, a diffusers "
                             "folder or a .safetensors file)")
        return catalog.resolve(name, self.folders, self.models.hashes.known())

    def load(self, name: str | None = None) -> LoadedModel:
        return self.models.get(self.model_ref(name))

    def check(self, request: GenerationRequest) -> tuple[ModelRef, Path | None, list[Path]]:
        """Everything that needs no model loaded: fields, LoRA, ControlNet, model and VAE names. Doors call it
        to refuse bad input before queueing; generate calls it first. Returns what it found."""
        check_fields(request, self.settings.limits)
        self.addons.find_loras(request.prompt)
        control_paths = [find_controlnet(unit.model, self.folders.controlnet) for unit in request.controlnets]
        ref = self.model_ref(request.model)
        return ref, find_vae(request.vae, ref, self.folders.vae), control_paths

    def generate(self, request: GenerationRequest, progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> GenerationResult:
        """Run a txt2img/img2img request; raises RequestError/ModelError for bad input, Cancelled."""
        check_types(request)
        if (kandinsky := find_kandinsky(self.model_ref, request.model)) is not None:
            return self.kandinsky.generate(kandinsky, request, progress, cancel)
        start = time.perf_counter()
        ref, vae_path, control_paths = self.check(request)
        model = self.models.get(ref)
        request, warnings = inpaint_checks(request, model)
        depth = min(e.config.num_hidden_layers for e in model.text.encoders)
        geometry = ModelGeometry(model.vae_scale_factor, model.native_size, depth, model.latent_channels)
        req, choice = resolve_request(request, geometry, self.settings.limits, model.name)
        addons = self.addons.resolve(req.prompt, req.negative_prompt, model)
        log.info("%s: %d image(s), %d steps, %s / %s, seed %d", req.mode, req.total_images, req.steps,
                 req.sampler, req.schedule, req.seed)
        vae = self.vaes.get(vae_path, model) if vae_path else None
        controls = [self.load_control(path, model) for path in control_paths]
        job = Job(model, req, choice, __version__, progress, cancel, vae, addons, controls,
                  self.settings.home / "annotators")
        if req.enable_hr:  # hires fix: a second pass after each batch, on the same model
            job = HiresJob(job, self.addons.resolve(req.hr_prompt or req.prompt,
                                                    req.hr_negative_prompt or req.negative_prompt, model), progress)
        set_vae_tiling(job.vae, self.settings.vae_tiling, output_pixels(req, model.vae_scale_factor),
                       model.native_size, model.offload != "none")
        with job.addons.applied(model):
            images, latents = job.run()
        return GenerationResult(req, images, latents, time.perf_counter() - start, tuple(warnings))

    def load_control(self, path: Path, model: LoadedModel) -> LoadedControl:
        net = self.controlnets.get(path, model.unet, model.device, model.dtype)
        return LoadedControl(net, path.stem if path.is_file() else path.name, self.controlnets.short_hash(path))

    def upscale(self, request: UpscaleRequest, progress: ProgressCallback | None = None,
                cancel: CancelToken | None = None) -> UpscaleResult:
        """Upscale one image with a resampler or the SD x4 upscaler model (engine/upscale.py, engine/x4.py)."""
        return self.upscalers.run(request, progress, cancel)


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
