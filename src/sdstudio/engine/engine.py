"""The engine every door calls: `prepare` a request (every check that needs no model), then `generate` it.

    engine = Engine(settings)
    job = engine.prepare(request)      # RequestError / ModelError for bad input; nothing is loaded
    result = engine.generate(job)      # loads the model its family's runner needs, runs, describes

The family registry (engine/families.py) decides which runner owns a model; doors never do.
"""

from __future__ import annotations

import logging

from sdstudio.engine.families import Families
from sdstudio.engine.flow.runner import FlowRunner
from sdstudio.engine.hooks import CancelToken, ProgressCallback
from sdstudio.engine.pipelines.kandinsky import KandinskyRunner
from sdstudio.engine.pipelines.upscale import UpscaleRequest, UpscaleResult
from sdstudio.engine.pipelines.x4 import Upscalers
from sdstudio.engine.prepared import PreparedJob
from sdstudio.engine.presets import companion_lora
from sdstudio.engine.requests import GenerationRequest, GenerationResult
from sdstudio.engine.sd.addons import AddOnLibrary
from sdstudio.engine.sd.runner import SdRunner
from sdstudio.engine.validate import check_types
from sdstudio.errors import ModelError
from sdstudio.models.find import catalog
from sdstudio.models.find.catalog import ModelRef
from sdstudio.models.find.hashing import HashCache
from sdstudio.models.find.inventory import family_of
from sdstudio.models.load.loader import LoadedModel, ModelManager
from sdstudio.models.load.parts import LoadOptions
from sdstudio.models.load.speed import SpeedOptions
from sdstudio.settings import Settings

log = logging.getLogger(__name__)


class Engine:
    """Owns loaded models and runs generation requests on the configured device."""

    def __init__(self, settings: Settings, models: ModelManager | None = None):
        self.settings = settings
        speed = SpeedOptions(settings.channels_last, settings.compile, settings.compile_mode, settings.batch_invariant)
        options = LoadOptions(settings.device, settings.dtype, prediction=settings.prediction, offload=settings.offload,
                              speed=speed)
        budget = int(settings.memory_budget_gb * 2**30) if settings.memory_budget_gb else None
        self.folders = catalog.model_folders(settings)
        self.models = models or ModelManager(options, HashCache(settings.cache_dir / "hashes.json"),
                                             settings.models_in_memory,
                                             [folder for _, folder in self.folders.checkpoints], budget)
        self.addons = AddOnLibrary(self.folders.lora, self.folders.embeddings, self.models.hashes)
        self.upscalers = Upscalers(settings, self.folders, self.models.hashes)
        self.families = Families([  # asked in order; Stable Diffusion owns what the others do not
            KandinskyRunner(settings, self.models.hashes),  # Kandinsky 2.2: diffusers pipelines
            FlowRunner(settings, self.folders, self.models.hashes, self.addons),  # SD3 and Flux: the flow-matching loop
            SdRunner(settings, self.folders, self.models, self.addons, self.model_ref),
        ])

    def model_ref(self, name: str | None = None) -> ModelRef:
        """The model called `name` (None: the default model, which the operator may give as a path)."""
        names_only = self.settings.names_only and bool(name)
        name = name or self.settings.default_model
        if not name:
            raise ModelError("no model given: pass a model (a name from `sdstudio models list`, a diffusers "
                             "folder or a .safetensors file)")
        return catalog.resolve(name, self.folders, self.models.hashes.known(), names_only)

    def load(self, name: str | None = None) -> LoadedModel:
        return self.models.get(self.model_ref(name))

    def preset_lora(self, preset_name: str | None, model: str | None = None) -> str | None:
        """The few-step LoRA that makes the model (None: the default) run as the preset says (presets.py)."""
        if not preset_name:
            return None
        ref = self.model_ref(model)
        return companion_lora(preset_name, ref.name, family_of(ref), [p.stem for p in self.addons.lora_files()])

    def prepare(self, request: GenerationRequest) -> PreparedJob:
        """Every check that needs no model loaded, once: types, fields, sampler, prompt syntax, and the names of
        the model, VAE, LoRAs, embeddings' files and ControlNets. Doors call it to refuse bad input before
        queueing; `generate` takes what it returns."""
        check_types(request)
        try:
            ref: ModelRef | None = self.model_ref(request.model)
        except ModelError:
            ref = None  # reported by the runner that owns unknown names, after its field checks
        return self.families.for_model(ref).prepare(request, ref)

    def generate(self, job: PreparedJob | GenerationRequest, progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> GenerationResult:
        """Run a prepared job (a request is prepared first); RequestError/ModelError for what only the loaded
        model can tell, Cancelled when cancelled."""
        if isinstance(job, GenerationRequest):
            job = self.prepare(job)
        return self.families.get(job.family).generate(job, progress, cancel)

    def upscale(self, request: UpscaleRequest, progress: ProgressCallback | None = None,
                cancel: CancelToken | None = None) -> UpscaleResult:
        """Upscale one image with a resampler or the SD x4 upscaler model (engine/pipelines/upscale.py, x4.py)."""
        return self.upscalers.run(request, progress, cancel)
