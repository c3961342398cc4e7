"""Sampler names users know (AUTOMATIC1111 / k-diffusion) mapped to diffusers schedulers.

A sampler is a diffusers scheduler class plus config overrides; a schedule type chooses how the
noise levels are spaced. Every scheduler here is diffusers' own: nothing is re-implemented.
A1111 samplers that diffusers does not have (DPM fast, DPM adaptive, Restart, DPM++ 2M SDE Heun)
are listed in docs/samplers.md and rejected with the list of valid names.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sdstudio.errors import RequestError

AUTOMATIC = "Automatic"

# Schedule type -> scheduler config overrides.
#   Uniform: timesteps evenly spaced over the training range (k-diffusion's default sigmas).
#   Karras: sigma_i = (s_max^(1/7) + i/(n-1) (s_min^(1/7) - s_max^(1/7)))^7 (Karras et al. 2022).
#   Exponential: log-sigma evenly spaced. Beta: Beta(0.6, 0.6) quantiles (Lee et al. 2024).
#   SGM Uniform: "trailing" spacing, the first step at the last training timestep.
SCHEDULE_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "Uniform": {"timestep_spacing": "linspace"},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
})
SCHEDULE_TYPES: tuple[str, ...] = (AUTOMATIC, *SCHEDULE_CONFIGS)

_SIGMA_SCHEDULES = ("Uniform", "Karras", "Exponential", "Beta", "SGM Uniform")
_SPACING_SCHEDULES = ("Uniform", "SGM Uniform")


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: the diffusers class, its config overrides and the schedules it supports.

    default_schedule is what "Automatic" means for it (A1111 gives DPM++/DPM2 samplers Karras,
    SDE multistep samplers Exponential, the rest the model's own spacing).
    """

    name: str
    scheduler_class: str
    config: Mapping[str, Any] = field(default_factory=dict)
    schedules: tuple[str, ...] = _SPACING_SCHEDULES
    default_schedule: str = AUTOMATIC
    aliases: tuple[str, ...] = ()
    stochastic: bool = False  # draws noise at each step (ancestral / SDE)


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
                _SIGMA_SCHEDULES, "Karras", ("k_dpmpp_2m",)),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", {}, _SIGMA_SCHEDULES, "Karras", ("k_dpmpp_sde",),
                stochastic=True),
    SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, _SIGMA_SCHEDULES, "Exponential",
                ("k_dpmpp_2m_sde",), stochastic=True),
    SamplerSpec("DPM++ 3M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, _SIGMA_SCHEDULES, "Exponential",
                ("k_dpmpp_3m_sde",), stochastic=True),
    # diffusers has no exact DPM++ 2S ancestral; its single-step SDE DPM-Solver++ (order 2) is the closest.
    SamplerSpec("DPM++ 2S a", "DPMSolverSinglestepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, _SIGMA_SCHEDULES, "Karras",
                ("k_dpmpp_2s_a",), stochastic=True),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, _SPACING_SCHEDULES, AUTOMATIC,
                ("k_euler_a", "k_euler_ancestral"), stochastic=True),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {}, _SIGMA_SCHEDULES, AUTOMATIC, ("k_euler",)),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, _SIGMA_SCHEDULES, AUTOMATIC, ("k_lms",)),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, _SIGMA_SCHEDULES, AUTOMATIC, ("k_heun",)),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, _SIGMA_SCHEDULES, "Karras", ("k_dpm_2",)),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, _SIGMA_SCHEDULES, "Karras", ("k_dpm_2_a",),
                stochastic=True),
    SamplerSpec("DDIM", "DDIMScheduler", {"set_alpha_to_one": False}, _SPACING_SCHEDULES, AUTOMATIC, ("ddim",)),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, _SPACING_SCHEDULES, AUTOMATIC, ("plms",)),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, _SIGMA_SCHEDULES, AUTOMATIC, ("unipc",)),
    SamplerSpec("LCM", "LCMScheduler", {}, _SPACING_SCHEDULES, AUTOMATIC, ("lcm",), stochastic=True),
)

_BY_NAME: Mapping[str, SamplerSpec] = MappingProxyType(
    {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}
)


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved (sampler, schedule type) pair; `schedule` is never "Automatic" here."""

    sampler: SamplerSpec
    schedule: str
    requested_schedule: str

    def scheduler_config(self, model_config: Mapping[str, Any]) -> dict[str, Any]:
        """The model's own scheduler config (betas, prediction type) with the sampler's overrides."""
        config = {k: v for k, v in model_config.items() if not k.startswith("_")}
        config.update(self.sampler.config)
        if self.schedule != AUTOMATIC:
            config.update(SCHEDULE_CONFIGS[self.schedule])
        return config

    @property
    def supports_zero_snr(self) -> bool:
        return "rescale_betas_zero_snr" in _init_parameters(self.sampler.scheduler_class)

    def build(self, model_config: Mapping[str, Any], seeds: Sequence[int] = (), zero_snr: bool = False) -> Any:
        """A fresh scheduler (schedulers are stateful: one per batch).

        seeds: per-image seeds; DPM++ SDE draws its Brownian noise from one tree per image.
        zero_snr: rescale betas to zero terminal SNR, with "trailing" timesteps so sampling starts at
        t = T (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
        """
        import diffusers  # deferred: importing diffusers takes seconds

        cls = getattr(diffusers, self.sampler.scheduler_class)
        accepted = _init_parameters(self.sampler.scheduler_class)
        config = {k: v for k, v in self.scheduler_config(model_config).items() if k in accepted}
        if "noise_sampler_seed" in accepted and seeds:
            config["noise_sampler_seed"] = list(seeds)
        if zero_snr:
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return cls.from_config(config)


def _init_parameters(scheduler_class: str) -> Mapping[str, Any]:
    import diffusers

    return inspect.signature(getattr(diffusers, scheduler_class).__init__).parameters


def zero_snr_samplers() -> list[str]:
    return [s.name for s in SAMPLERS if "rescale_betas_zero_snr" in _init_parameters(s.scheduler_class)]


def split_legacy_name(name: str) -> tuple[str, str | None]:
    """A1111's pre-1.9 combined names: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras")."""
    for schedule in ("Karras", "Exponential", "SGM Uniform", "Uniform", "Beta"):
        suffix = " " + schedule
        if name.lower().endswith(suffix.lower()) and name[: -len(suffix)].lower() in _BY_NAME:
            return name[: -len(suffix)], schedule
    return name, None


def resolve_sampler(name: str, schedule: str = AUTOMATIC) -> SamplerChoice:
    """Resolve user-facing names; unknown names are errors that list the valid ones."""
    base, legacy_schedule = split_legacy_name(name.strip())
    spec = _BY_NAME.get(base.lower())
    if spec is None:
        raise RequestError(f"unknown sampler {name!r}; valid samplers: {', '.join(sampler_names())}", "sampler")
    schedule = _canonical_schedule(schedule)
    if legacy_schedule and schedule == AUTOMATIC:
        schedule = legacy_schedule
    resolved = spec.default_schedule if schedule == AUTOMATIC else schedule
    if resolved != AUTOMATIC and resolved not in spec.schedules:
        raise RequestError(
            f"sampler {spec.name!r} does not support schedule type {resolved!r}; "
            f"it supports: {', '.join((AUTOMATIC, *spec.schedules))}",
            "schedule",
        )
    return SamplerChoice(spec, resolved, schedule)


def _canonical_schedule(schedule: str) -> str:
    lookup = {s.lower(): s for s in SCHEDULE_TYPES}
    # A1111's API names schedulers in lower case with underscores ("sgm_uniform").
    key = schedule.strip().lower().replace("_", " ")
    if key not in lookup:
        raise RequestError(
            f"unknown schedule type {schedule!r}; valid schedule types: {', '.join(SCHEDULE_TYPES)}", "schedule"
        )
    return lookup[key]
