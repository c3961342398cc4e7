"""A request checked once: what `Engine.prepare` found without loading a model, for `Engine.generate` to run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdstudio.engine.requests import GenerationRequest
from sdstudio.engine.sd.ip_adapter import FoundUnit
from sdstudio.models.find.catalog import ModelRef
from sdstudio.prompts.build import PromptPlan
from sdstudio.samplers import SamplerChoice


@dataclass(frozen=True)
class PreparedJob:
    """Every check that needs no model has passed; names are resolved to files.

    family: the registry key of the runner that owns the model (engine/families.py).
    prompts: the prompt and negative prompt parsed and scheduled for the request's steps; hires_prompts the same
    for the hires fix's second pass (its own prompt and steps), when there is one. plain_prompts: both as plain
    text, for families whose encoders read a prompt whole (Kandinsky 2.2's prior, SD3 and Flux).
    """

    request: GenerationRequest
    family: str
    model: ModelRef
    sampler: SamplerChoice | None = None
    vae: Path | None = None
    controls: tuple[Path, ...] = ()
    prompts: PromptPlan | None = None
    hires_prompts: PromptPlan | None = None
    plain_prompts: tuple[str, str] | None = None
    adapters: tuple[FoundUnit, ...] = ()  # one per IP-Adapter unit
    notes: tuple[str, ...] = ()  # what prepare changed in the request (a sampler fallen back), for the user
