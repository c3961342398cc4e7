"""Chaining requests in the Python API: each stage is fed by the one before, on one Engine whose model
manager keeps the stages' models loaded (Settings.models_in_memory: how many stay) so a chain loads each
model once.

    chain = Chain(engine)
    chain.run(GenerationRequest(prompt="...", denoising_end=0.8))     # a base stopped at 0.8 of its schedule
    chain.then(GenerationRequest(prompt="...", model="refiner"))     # resumes from its latents at 0.8
    chain.then(GenerationRequest(prompt="...", strength=0.5))        # img2img on the refined image

A stage that stopped at `denoising_end` hands on its latents (the next stage gets init_latents and
denoising_start = that fraction, the same seeds and batch: diffusers' SDXL base -> refiner); any other
hands on its image (init_image; with a mask the next stage inpaints it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdstudio.engine.hooks import CancelToken, ProgressCallback
from sdstudio.engine.requests import GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from sdstudio.engine.engine import Engine

log = logging.getLogger(__name__)


def hand_off(previous: GenerationResult, request: GenerationRequest, index: int = 0) -> GenerationRequest:
    """`request` fed by `previous`: its latents when it stopped at denoising_end, else its image `index`.

    A latent handoff keeps the previous stage's seeds and batch (one latent row per image) unless the
    request sets a seed; run both stages with the same steps so their schedules meet at the switch."""
    before = previous.request
    if before.denoising_end is not None:
        return request.replace(init_latents=previous.latents, init_image=None, mask=None, width=None, height=None,
                               denoising_start=request.denoising_start or before.denoising_end,
                               seed=before.seed if request.seed == -1 else request.seed,
                               batch_size=before.batch_size, n_iter=before.n_iter)
    return request.replace(init_image=previous.images[index].image, init_latents=None)


@dataclass(frozen=True)
class Stage:
    result: GenerationResult
    model: str           # the model's name, as the result records it
    reused: bool         # nothing was loaded: the model manager still held the stage's model


@dataclass
class Chain:
    """Stages run one after another on one engine; `stages` keeps what each made."""

    engine: Engine
    progress: ProgressCallback | None = None
    cancel: CancelToken | None = None
    stages: list[Stage] = field(default_factory=list)

    @property
    def last(self) -> GenerationResult:
        if not self.stages:
            raise ValueError("the chain has no stage yet: start it with run()")
        return self.stages[-1].result

    def run(self, request: GenerationRequest) -> GenerationResult:
        """Run `request` as it is (the first stage, or one that brings its own input)."""
        before = {id(m) for m in self.engine.models.loaded}
        result = self.engine.generate(request, self.progress, self.cancel)
        loaded = [m for m in self.engine.models.loaded if id(m) not in before]  # models this stage had to load
        stage = Stage(result, result.request.model or "", reused=not loaded)
        log.info("chain stage %d: %s on %s (%s)", len(self.stages) + 1, result.request.mode, stage.model,
                 "already loaded" if stage.reused else "loaded")
        self.stages.append(stage)
        return result

    def then(self, request: GenerationRequest, index: int = 0) -> GenerationResult:
        """Run `request` fed by the last stage (its latents after denoising_end, else its image `index`)."""
        return self.run(hand_off(self.last, request, index))
