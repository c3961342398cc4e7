"""The model families the engine can run, registered in one place: the first runner that owns a model runs it.

A runner prepares a request for its family (the checks that need no model, e.g. which fields it cannot honour)
and generates from the prepared job. Doors never ask which family a model is: they call Engine.prepare and
Engine.generate. The Stable Diffusion runner (engine/sd/runner.py) owns every model the others do not, and is
also the one that reports unknown model names, after its field checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sdstudio.engine.hooks import CancelToken, ProgressCallback
from sdstudio.engine.prepared import PreparedJob
from sdstudio.engine.requests import GenerationRequest, GenerationResult
from sdstudio.models.find.catalog import ModelRef


class Runner(Protocol):
    name: str

    def owns(self, ref: ModelRef | None) -> bool:
        """Whether this family runs the model (`None`: a model name that resolved to nothing)."""

    def prepare(self, request: GenerationRequest, ref: ModelRef | None) -> PreparedJob:
        """Every check that needs no model loaded; RequestError / ModelError saying what to fix."""

    def generate(self, job: PreparedJob, progress: ProgressCallback | None,
                 cancel: CancelToken | None) -> GenerationResult: ...


class Families:
    """Runners in the order they are asked; the last must own every model."""

    def __init__(self, runners: Sequence[Runner]):
        self.runners = tuple(runners)

    def for_model(self, ref: ModelRef | None) -> Runner:
        return next(r for r in self.runners if r.owns(ref))

    def get(self, name: str) -> Runner:
        return next(r for r in self.runners if r.name == name)
