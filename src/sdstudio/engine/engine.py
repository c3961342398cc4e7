"""The engine every door calls: `Engine(settings).generate(request)`."""

from __future__ import annotations

import logging
import time

from sdstudio import __version__
from sdstudio.engine.hooks import CancelToken, ProgressCallback
from sdstudio.engine.job import Job
from sdstudio.engine.requests import GenerationRequest, GenerationResult
from sdstudio.engine.validate import ModelGeometry, check_fields, resolve_request
from sdstudio.errors import ModelError
from sdstudio.models import catalog
from sdstudio.models.catalog import ModelRef
from sdstudio.models.hashing import HashCache
from sdstudio.models.loader import LoadedModel, ModelManager
from sdstudio.settings import Settings

log = logging.getLogger(__name__)


class Engine:
    """Owns loaded models and runs generation requests on the configured device."""

    def __init__(self, settings: Settings, models: ModelManager | None = None):
        self.settings = settings
        self.models = models or ModelManager(settings.device, settings.dtype,
                                             HashCache(settings.cache_dir / "hashes.json"))

    def model_ref(self, name: str | None = None) -> ModelRef:
        name = name or self.settings.default_model
        if not name:
            raise ModelError("no model given: pass a diffusers model folder (or the name of one in "
                             f"{', '.join(str(d) for d in self.settings.models_dirs)}) as the model")
        return catalog.resolve(name, self.settings.models_dirs)

    def load(self, name: str | None = None) -> LoadedModel:
        return self.models.get(self.model_ref(name))

    def generate(self, request: GenerationRequest, progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> GenerationResult:
        """Run a txt2img/img2img request; raises RequestError/ModelError for bad input, Cancelled."""
        start = time.perf_counter()
        check_fields(request, self.settings.limits)  # fail fast, before loading a model
        model = self.load(request.model)
        geometry = ModelGeometry(model.vae_scale_factor, model.native_size)
        req, choice = resolve_request(request, geometry, self.settings.limits, model.name)
        log.info("%s: %d image(s), %d steps, %s / %s, seed %d", req.mode, req.total_images, req.steps,
                 req.sampler, req.schedule, req.seed)
        images, latents = Job(model, req, choice, __version__, progress, cancel).run()
        return GenerationResult(req, images, latents, time.perf_counter() - start)
