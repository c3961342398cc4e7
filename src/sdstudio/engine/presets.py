"""Few-step presets: the sampler, schedule type, steps and CFG that distilled models and LoRAs are made for,
as their model cards give them. A preset sets defaults; a request's own fields win. All run on the single
conditional branch (CFG 1), as the cards' guidance_scale 0 does in diffusers.

An ordinary model takes a preset through its few-step LoRA (`companion_lora`): one distilled from that very model,
named `<preset>-lora-<model>` (`sdstudio train lcm-lora` makes them; the demo model ships `lcm-lora-demo`), or the
family's published one under its published name; the CLI's --preset adds it to the prompt as `<lora:name:1>`, as
Fooocus's speed modes do, so the infotext re-runs without the preset.

    lcm        LCM and LCM-LoRA (Luo et al. 2023): LCMScheduler, 4 steps
    turbo      SD-Turbo, SDXL-Turbo (adversarial diffusion distillation): Euler a, trailing timesteps, 1 step
    lightning  SDXL-Lightning (progressive adversarial distillation): Euler, trailing timesteps, 4 steps
    hyper      Hyper-SD 8-step LoRAs: DDIM, trailing timesteps, 8 steps
    tcd        TCD LoRAs (trajectory consistency distillation): TCDScheduler, gamma (eta) 0.3, 4 steps
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sdstudio.errors import RequestError


@dataclass(frozen=True)
class Preset:
    sampler: str
    schedule: str
    steps: int
    cfg_scale: float
    made_for: str

    def fields(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "schedule": self.schedule, "steps": self.steps, "cfg_scale": self.cfg_scale}

    def describe(self) -> str:
        return f"{self.sampler}, {self.schedule.lower()} schedule, {self.steps} steps, CFG {self.cfg_scale:g}"


PRESETS: dict[str, Preset] = {
    "lcm": Preset("LCM", "Automatic", 4, 1.0, "LCM models and LCM-LoRAs"),
    "turbo": Preset("Euler a", "SGM Uniform", 1, 1.0, "SD-Turbo and SDXL-Turbo"),
    "lightning": Preset("Euler", "SGM Uniform", 4, 1.0, "SDXL-Lightning"),
    "hyper": Preset("DDIM", "SGM Uniform", 8, 1.0, "Hyper-SD LoRAs"),
    "tcd": Preset("TCD", "Automatic", 4, 1.0, "TCD LoRAs"),
}


# the few-step LoRAs' published names, per preset and family
PUBLISHED_LORAS: dict[str, dict[str, str]] = {
    "lcm": {"sd1": "lcm-lora-sdv1-5", "sdxl": "lcm-lora-sdxl"},
    "tcd": {"sd1": "TCD-SD15-LoRA", "sdxl": "TCD-SDXL-LoRA"},
    "lightning": {"sdxl": "sdxl_lightning_4step_lora"},
    "hyper": {"sd1": "Hyper-SD15-8steps-lora", "sdxl": "Hyper-SDXL-8steps-lora"},
}


def companion_lora(preset_name: str, model: str, family: str, loras: Iterable[str]) -> str | None:
    """The LoRA (by stem, among `loras`) that makes `model` run as the preset says: `<preset>-lora-<model>`,
    else the family's published one; None when neither is installed."""
    by_lower = {name.lower(): name for name in loras}
    wanted = [f"{preset_name}-lora-{model}", PUBLISHED_LORAS.get(preset_name, {}).get(family, "")]
    return next((by_lower[w.lower()] for w in wanted if w and w.lower() in by_lower), None)


def with_companion(prompt: str, lora: str | None) -> str:
    """The prompt with `<lora:name:1>` added, unless it already names that LoRA."""
    if lora is None or f"<lora:{lora.lower()}:" in prompt.lower() or f"<lora:{lora.lower()}>" in prompt.lower():
        return prompt
    return f"{prompt} <lora:{lora}:1>".strip()


def preset(name: str) -> Preset:
    found = PRESETS.get(name.strip().lower())
    if found is None:
        raise RequestError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}", "preset")
    return found


def with_preset(name: str | None, base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Request fields: `base` (e.g. read from an image), then the preset's, then those `given` explicitly."""
    return {**base, **(preset(name).fields() if name else {}), **given}


def preset_hints(names: Iterable[str], sampler: str, steps: int, cfg_scale: float) -> list[str]:
    """Warnings for a model or LoRA whose name says it is a few-step one while the request is not run as its
    card says (e.g. 'sdxl_lightning_4step_lora' at 30 steps with CFG 7)."""
    hints, seen = [], set()
    for name in names:
        for key, p in PRESETS.items():
            if re.search(rf"(^|[^a-z]){key}([^a-z]|$)", name.lower()) and (steps > 2 * p.steps or cfg_scale > 2):
                if key not in seen:
                    hints.append(f"{name!r} looks like one of the {p.made_for}, made for {p.describe()}: try "
                                 f"--preset {key} (the web UI's Preset menu)")
                seen.add(key)
                break
    return hints


LORA_NAME_METADATA = ("sdstudio_preset", "ss_output_name", "modelspec.title")  # what a LoRA file says it is
