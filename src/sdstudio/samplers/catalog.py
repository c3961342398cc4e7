"""Sampler and schedule-type names users know (A1111 labels, k-diffusion aliases, ComfyUI names) -> what runs.

A (sampler, schedule type) pair runs as diffusers' own scheduler where diffusers has it (the sampler's
`native` schedule types), else as our k-diffusion steps on A1111's sigma schedule (ksteps.py, sigmas.py,
kscheduler.py). A1111's timestep samplers (DDIM, PLMS, UniPC) keep their own timesteps for the other schedule
types, as A1111 does, and say so in the result's warnings. DPM adaptive is not available (docs/samplers.md).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sdstudio.errors import RequestError

AUTOMATIC = "Automatic"

# Schedule types diffusers' schedulers implement -> their config overrides.
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
# A1111's schedule types in its order: label -> (its API name, ComfyUI's name); math in sigmas.py
SCHEDULE_NAMES: Mapping[str, tuple[str, str]] = MappingProxyType({
    AUTOMATIC: ("automatic", "automatic"), "Uniform": ("uniform", "uniform"), "Karras": ("karras", "karras"),
    "Exponential": ("exponential", "exponential"), "Polyexponential": ("polyexponential", "polyexponential"),
    "SGM Uniform": ("sgm_uniform", "sgm_uniform"), "KL Optimal": ("kl_optimal", "kl_optimal"),
    "Align Your Steps": ("align_your_steps", "align_your_steps"), "Simple": ("simple", "simple"),
    "Normal": ("normal", "normal"), "DDIM": ("ddim", "ddim_uniform"), "Beta": ("beta", "beta"),
})
SCHEDULE_TYPES: tuple[str, ...] = tuple(SCHEDULE_NAMES)

_SIGMA_SCHEDULES = ("Uniform", "Karras", "Exponential", "Beta", "SGM Uniform")
_SPACING_SCHEDULES = ("Uniform", "SGM Uniform")


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler.

    scheduler_class/config: diffusers' scheduler and overrides, for the `native` schedule types (None: ours
    only). ksampler: our k-diffusion step (ksteps.KSAMPLERS) that runs every other schedule type; without
    one (timestep samplers) the other schedule types are ignored, as A1111 ignores them.
    default_schedule: what "Automatic" means (A1111 gives DPM++/DPM2 samplers Karras, SDE multistep samplers
    Exponential, the rest the model's own spacing). discard_penultimate: A1111 drops the next-to-last sigma
    of an n + 1 step schedule (DPM2, DPM2 a, DPM++ 3M SDE), on our steps only. own_steps: the sampler spaces its
    steps itself, so other schedule types do not apply (A1111's DPM fast), as for timestep samplers.
    """

    name: str
    scheduler_class: str | None
    config: Mapping[str, Any] = field(default_factory=dict)
    native: tuple[str, ...] = _SPACING_SCHEDULES
    default_schedule: str = AUTOMATIC
    aliases: tuple[str, ...] = ()
    stochastic: bool = False  # draws noise at each step (ancestral / SDE)
    ksampler: str | None = None
    discard_penultimate: bool = False
    own_steps: bool = False  # spaces its steps itself (DPM fast: evenly in log sigma between the model's ends)
    cfg_pp: bool = False  # CFG++: re-noises along the unconditional prediction (cfgpp.py)

    @property
    def schedules(self) -> tuple[str, ...]:
        """Every schedule type it takes (Automatic aside)."""
        return SCHEDULE_TYPES[1:]

    def runs_natively(self, schedule: str) -> bool:
        return self.scheduler_class is not None and (schedule == AUTOMATIC or schedule in self.native)


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
                _SIGMA_SCHEDULES, "Karras", ("k_dpmpp_2m", "dpmpp_2m"), ksampler="dpmpp_2m"),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", {}, _SIGMA_SCHEDULES, "Karras", ("k_dpmpp_sde", "dpmpp_sde"),
                stochastic=True, ksampler="dpmpp_sde"),
    SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, _SIGMA_SCHEDULES, "Exponential",
                ("k_dpmpp_2m_sde", "dpmpp_2m_sde"), stochastic=True, ksampler="dpmpp_2m_sde"),
    SamplerSpec("DPM++ 2M SDE Heun", None, {}, (), "Exponential", ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun"),
                stochastic=True, ksampler="dpmpp_2m_sde_heun"),
    SamplerSpec("DPM++ 3M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, _SIGMA_SCHEDULES, "Exponential",
                ("k_dpmpp_3m_sde", "dpmpp_3m_sde"), stochastic=True, ksampler="dpmpp_3m_sde",
                discard_penultimate=True),
    SamplerSpec("DPM++ 2S a", None, {}, (), "Karras", ("k_dpmpp_2s_a", "dpmpp_2s_ancestral"), stochastic=True,
                ksampler="dpmpp_2s_ancestral"),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, _SPACING_SCHEDULES, AUTOMATIC,
                ("k_euler_a", "k_euler_ancestral", "euler_ancestral", "euler_a"), stochastic=True,
                ksampler="euler_ancestral"),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {}, _SIGMA_SCHEDULES, AUTOMATIC, ("k_euler", "euler"),
                ksampler="euler"),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, _SIGMA_SCHEDULES, AUTOMATIC, ("k_lms", "lms"), ksampler="lms"),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, _SIGMA_SCHEDULES, AUTOMATIC, ("k_heun", "heun"),
                ksampler="heun"),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, _SIGMA_SCHEDULES, "Karras", ("k_dpm_2", "dpm_2"),
                ksampler="dpm_2", discard_penultimate=True),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, _SIGMA_SCHEDULES, "Karras",
                ("k_dpm_2_a", "dpm_2_ancestral"), stochastic=True, ksampler="dpm_2_ancestral",
                discard_penultimate=True),
    SamplerSpec("DPM fast", None, {}, ("Uniform",), "Uniform", ("k_dpm_fast", "dpm_fast"), stochastic=True,
                ksampler="dpm_fast", own_steps=True),
    SamplerSpec("Restart", None, {}, (), "Karras", ("restart",), ksampler="restart"),
    SamplerSpec("DDIM", "DDIMScheduler", {"set_alpha_to_one": False}, _SPACING_SCHEDULES, AUTOMATIC, ("ddim",)),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, _SPACING_SCHEDULES, AUTOMATIC, ("plms",)),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, _SIGMA_SCHEDULES, AUTOMATIC, ("unipc", "uni_pc")),
    # LCM and TCD space their steps from their distillation's 50-step grid, whatever timestep_spacing says
    SamplerSpec("LCM", "LCMScheduler", {}, (), AUTOMATIC, ("lcm", "k_lcm"), stochastic=True),
    SamplerSpec("TCD", "TCDScheduler", {}, (), AUTOMATIC, ("tcd",), stochastic=True),
    # CFG++ (cfgpp.py): guidance lambda = cfg_scale / 12.5, as A1111's DDIM CFG++; ComfyUI's names as aliases
    SamplerSpec("Euler CFG++", None, {}, (), "Uniform", ("euler_cfg_pp", "k_euler_cfg_pp"), ksampler="euler_cfg_pp",
                cfg_pp=True),
    SamplerSpec("Euler a CFG++", None, {}, (), "Uniform", ("euler_ancestral_cfg_pp", "k_euler_a_cfg_pp"),
                stochastic=True, ksampler="euler_ancestral_cfg_pp", cfg_pp=True),
    SamplerSpec("DPM++ 2M CFG++", None, {}, (), "Karras", ("dpmpp_2m_cfg_pp", "k_dpmpp_2m_cfg_pp"),
                ksampler="dpmpp_2m_cfg_pp", cfg_pp=True),
    SamplerSpec("DDIM CFG++", None, {}, (), "DDIM", ("ddim_cfgpp", "ddim_cfg_pp"), ksampler="euler_cfg_pp",
                cfg_pp=True),
)
UNAVAILABLE = ("DPM adaptive",)  # A1111's, not offered (docs/samplers.md)
CFG_PP_DIVISOR = 12.5  # CFG++ samplers guide with lambda = cfg_scale / 12.5 (A1111's DDIM CFG++)

_BY_NAME: Mapping[str, SamplerSpec] = MappingProxyType(
    {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}
)


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved (sampler, schedule type) pair. schedule: what runs ("Automatic": the sampler's diffusers
    scheduler as the model configures it); note: what was changed from the request and why, for the user."""

    sampler: SamplerSpec
    schedule: str
    requested_schedule: str
    note: str | None = None

    @property
    def native(self) -> bool:
        """Runs as diffusers' scheduler (else as our k-diffusion steps)."""
        return self.sampler.runs_natively(self.schedule)

    def scheduler_config(self, model_config: Mapping[str, Any]) -> dict[str, Any]:
        """The model's own scheduler config (betas, prediction type) with the sampler's overrides."""
        config = {k: v for k, v in model_config.items() if not k.startswith("_")}
        config.update(self.sampler.config)
        if self.schedule != AUTOMATIC:
            config.update(SCHEDULE_CONFIGS[self.schedule])
        return config

    @property
    def supports_zero_snr(self) -> bool:
        return self.native and "rescale_betas_zero_snr" in _init_parameters(self.sampler.scheduler_class)

    def build(self, model_config: Mapping[str, Any], seeds: Sequence[int] = (), zero_snr: bool = False,
              xl: bool = False) -> Any:
        """A fresh scheduler (schedulers are stateful: one per batch).

        seeds: per-image seeds; the SDE samplers draw their Brownian noise from one tree per image.
        zero_snr: rescale betas to zero terminal SNR, with "trailing" timesteps so sampling starts at
        t = T (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
        xl: an SDXL model (Align Your Steps has a table per family).
        """
        if not self.native:
            from sdstudio.samplers.kscheduler import KScheduler  # deferred: torch and diffusers

            return KScheduler(self.sampler.ksampler or "", self.schedule, model_config, seeds, xl,
                              discard_penultimate=self.sampler.discard_penultimate)
        import diffusers  # deferred: importing diffusers takes seconds

        cls = getattr(diffusers, self.sampler.scheduler_class or "")
        accepted = _init_parameters(self.sampler.scheduler_class or "")
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
    return [s.name for s in SAMPLERS
            if s.scheduler_class and "rescale_betas_zero_snr" in _init_parameters(s.scheduler_class)]


def split_legacy_name(name: str) -> tuple[str, str | None]:
    """A1111's pre-1.9 combined names: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras") (any schedule label or
    API name as the suffix, as A1111 reads them)."""
    for schedule, (api, _) in SCHEDULE_NAMES.items():
        for suffix in (" " + schedule, " " + api):
            if name.lower().endswith(suffix.lower()) and name[: -len(suffix)].strip().lower() in _BY_NAME:
                return name[: -len(suffix)].strip(), schedule
    return name, None


def resolve_sampler(name: str, schedule: str = AUTOMATIC) -> SamplerChoice:
    """Resolve user-facing names; unknown names are errors that list the valid ones and the closest."""
    base, legacy_schedule = split_legacy_name(name.strip())
    spec = _BY_NAME.get(base.lower())
    if spec is None:
        raise RequestError(f"unknown sampler {name!r}{_did_you_mean(base, _BY_NAME)}; valid "
                           f"samplers: {', '.join(sampler_names())}", "sampler")
    schedule = canonical_schedule(schedule)
    if legacy_schedule and schedule == AUTOMATIC:
        schedule = legacy_schedule
    resolved = spec.default_schedule if schedule == AUTOMATIC else schedule
    if (spec.ksampler is None or spec.own_steps) and resolved not in (AUTOMATIC, *spec.native):
        note = (f"{spec.name} keeps its own timesteps: schedule type {resolved!r} does not apply to it "
                "(as in AUTOMATIC1111)")
        return SamplerChoice(spec, spec.default_schedule, schedule, note)
    return SamplerChoice(spec, resolved, schedule)


def canonical_schedule(schedule: str) -> str:
    """A schedule type by its label, A1111's API name or ComfyUI's name -> the label."""
    key = schedule.strip().lower().replace("_", " ")
    found = _SCHEDULE_LOOKUP.get(key)
    if found is None:
        raise RequestError(f"unknown schedule type {schedule!r}{_did_you_mean(key, _SCHEDULE_LOOKUP)}; "
                           f"valid schedule types: {', '.join(SCHEDULE_TYPES)}", "schedule")
    return found


def _did_you_mean(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=0.6)
    if not close:
        return ""
    target = known[close[0]]
    label = target.name if isinstance(target, SamplerSpec) else str(target)
    return f" (did you mean {label!r}?)"


_SCHEDULE_LOOKUP: Mapping[str, str] = MappingProxyType(
    {key.lower().replace("_", " "): label for label, names in SCHEDULE_NAMES.items() for key in (label, *names)}
)
