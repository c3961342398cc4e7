"""Sampler names and schedule types, and every (sampler, schedule type) pair run end to end.

Each pair is checked three ways: resolve_sampler builds the scheduler that docs/samplers.md documents
(restated in DOCUMENTED below, so that the test does not take sdstudio.samplers' word for it); the engine
records that scheduler; and the engine's final latents equal those of diffusers' own
StableDiffusionPipeline run on the same tiny components with that scheduler, prompt, steps, guidance
and seed. Every sampler is reproducible by the plain pipeline: DDIM's eta = 0 is the pipeline's
default, ancestral/SDE samplers draw step noise from the per-image CPU generator we pass both, and DPM++
SDE's Brownian tree is seeded through the scheduler config (noise_sampler_seed), which both share.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping
from typing import Any

import diffusers
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdstudio import GenerationRequest, RequestError
from sdstudio.samplers import AUTOMATIC, SAMPLERS, SCHEDULE_TYPES, resolve_sampler

SIGMA = ("Uniform", "Karras", "Exponential", "Beta", "SGM Uniform")
SPACING = ("Uniform", "SGM Uniform")

# docs/samplers.md: sampler -> (diffusers scheduler, config overrides, what "Automatic" means, schedule types).
# "Automatic" meaning AUTOMATIC: the model's own spacing, no override.
DOCUMENTED: dict[str, tuple[str, dict[str, Any], str, tuple[str, ...]]] = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "Karras",
                 SIGMA),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}, "Karras", SIGMA),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                     "Exponential", SIGMA),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
                     "Exponential", SIGMA),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}, AUTOMATIC, SPACING),
    "Euler": ("EulerDiscreteScheduler", {}, AUTOMATIC, SIGMA),
    "LMS": ("LMSDiscreteScheduler", {}, AUTOMATIC, SIGMA),
    "Heun": ("HeunDiscreteScheduler", {}, AUTOMATIC, SIGMA),
    "DPM2": ("KDPM2DiscreteScheduler", {}, "Karras", SIGMA),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}, "Karras", SIGMA),
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": False}, AUTOMATIC, SPACING),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}, AUTOMATIC, SPACING),
    "UniPC": ("UniPCMultistepScheduler", {}, AUTOMATIC, SIGMA),
    "LCM": ("LCMScheduler", {}, AUTOMATIC, ()),
    "TCD": ("TCDScheduler", {}, AUTOMATIC, ()),
}
SCHEDULE_OVERRIDES: dict[str, dict[str, Any]] = {
    AUTOMATIC: {},
    "Uniform": {"timestep_spacing": "linspace"},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}

PROMPT, STEPS, CFG, SEED = "a circle", 6, 7.0, 3  # 6 steps: fewer never reach DPM++ 3M SDE's third order
LATENT_TOL = {"rtol": 1e-5, "atol": 1e-4}  # ours vs diffusers, same modules and kernels: measured 0.0 (bitwise)
CASES = [pytest.param(spec, schedule, id=f"{spec.name}-{schedule}")
         for spec in SAMPLERS if spec.scheduler_class for schedule in (AUTOMATIC, *spec.native)]
K_CASES = [pytest.param(spec, schedule, id=f"{spec.name}-{schedule}") for spec in SAMPLERS if spec.ksampler
           for schedule in (AUTOMATIC, *spec.schedules) if not resolve_sampler(spec.name, schedule).native]


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A scheduler config without diffusers' bookkeeping keys (_class_name, _diffusers_version, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def documented_scheduler(name: str, schedule: str, model_config: Mapping[str, Any], seed: int) -> Any:
    """The scheduler docs/samplers.md describes, built here without sdstudio.samplers."""
    class_name, overrides, automatic, _ = DOCUMENTED[name]
    resolved = automatic if schedule == AUTOMATIC else schedule
    config = {**plain_config(model_config), **overrides, **SCHEDULE_OVERRIDES[resolved]}
    if class_name == "DPMSolverSDEScheduler":
        config["noise_sampler_seed"] = [seed]  # one Brownian tree per image, seeded with the image's seed
    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters  # from_config would keep the model's other keys
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


def scheduler_json(scheduler: Any) -> dict[str, Any]:
    return json.loads(scheduler.to_json_string())  # as the engine records it


@pytest.fixture(scope="module")
def reference_pipe(engine) -> StableDiffusionPipeline:
    """diffusers' own txt2img pipeline on the engine's loaded components (the scheduler is set per test)."""
    model = engine.load()
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=resolve_sampler("Euler").build(model.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("spec", "schedule"), CASES)
def test_every_sampler_and_schedule_matches_diffusers(engine, reference_pipe, spec, schedule):
    class_name, _, automatic, schedules = DOCUMENTED[spec.name]
    assert spec.native == schedules
    choice = resolve_sampler(spec.name, schedule)
    assert choice.schedule == (automatic if schedule == AUTOMATIC else schedule)
    model_config = engine.load().scheduler_config
    documented = scheduler_json(documented_scheduler(spec.name, schedule, model_config, SEED))
    scheduler = choice.build(model_config, seeds=[SEED])  # what the engine builds for image 0
    assert scheduler_json(scheduler) == documented

    result = engine.generate(GenerationRequest(prompt=PROMPT, steps=STEPS, cfg_scale=CFG, sampler=spec.name,
                                               schedule=schedule, seed=SEED))
    reference_pipe.scheduler = scheduler
    size = result.latents.shape[-1] * reference_pipe.vae_scale_factor
    expected = reference_pipe(PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=CFG,
                              height=size, width=size, generator=[torch.Generator("cpu").manual_seed(SEED)],
                              output_type="latent", eta=0.3 if spec.name == "TCD" else 0.0).images  # TCD's gamma
    torch.testing.assert_close(result.latents, expected, **LATENT_TOL)
    record = result.images[0].record["sampler"]
    assert record["scheduler"] == spec.scheduler_class == class_name
    # the config the engine ran with, as the scheduler left it (set_timesteps may adjust it, e.g. lower_order_final)
    assert plain_config(record["config"]) == plain_config(scheduler_json(scheduler))


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SAMPLERS])
def test_each_schedule_type_changes_the_timesteps(engine, spec):
    """Schedule types the sampler runs give distinct timesteps: none is dropped or ignored. A1111's own
    definitions make two repeat others on a discrete model, checked in test_ksamplers.py: Polyexponential (rho 1)
    is Exponential and Normal (t(sigma_max) .. t(sigma_min) = 999 .. 0) is Uniform. Types a timestep sampler
    ignores are announced, not run."""
    model_config = engine.load().scheduler_config
    timesteps = {}
    for schedule in spec.schedules:
        choice = resolve_sampler(spec.name, schedule)
        if schedule in ("Polyexponential", "Normal") or choice.note:
            continue
        scheduler = choice.build(model_config)
        scheduler.set_timesteps(STEPS)
        timesteps[schedule] = tuple(round(float(t), 3) for t in scheduler.timesteps)
    assert len(set(timesteps.values())) == len(timesteps), timesteps


@pytest.mark.parametrize(("spec", "schedule"), K_CASES)
def test_pairs_diffusers_lacks_run_our_steps_on_the_engines_model(engine, reference_pipe, spec, schedule):
    """The engine's loop driving KScheduler equals our k-diffusion steps driven directly by A1111's
    CompVisDenoiser arithmetic on the same UNet: D(x; s) = x - s * eps(x / sqrt(s^2 + 1), t(s)), CFG on eps,
    start noise * s_0, ancestral noise from the image's CPU generator, SDE noise from a Brownian tree."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    from sdstudio.samplers.cfgpp import CFG_PP
    from sdstudio.samplers.ksteps import KSAMPLERS
    from sdstudio.testing.ksamplers import drive

    result = engine.generate(GenerationRequest(prompt=PROMPT, steps=STEPS, cfg_scale=CFG, sampler=spec.name,
                                               schedule=schedule, seed=SEED))
    assert result.images[0].record["sampler"]["scheduler"] == "KScheduler"
    scheduler = resolve_sampler(spec.name, schedule).build(engine.load().scheduler_config, seeds=[SEED])
    scheduler.set_timesteps(STEPS)
    sigmas, unet = scheduler.sigmas, reference_pipe.unet
    positive, negative = reference_pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")
    context = torch.cat([negative, positive])

    def denoiser(x, sigma):
        t = scheduler.table.sigma_to_t(sigma.reshape(1))
        eps = unet(torch.cat([x] * 2) / (sigma**2 + 1) ** 0.5, t, encoder_hidden_states=context).sample
        uncond, text = eps.chunk(2)
        if spec.cfg_pp:  # [D, D_u] with lambda = CFG / 12.5 (ksteps.py)
            return torch.stack([x - sigma * (uncond + CFG / 12.5 * (text - uncond)), x - sigma * uncond])
        return x - sigma * (uncond + CFG * (text - uncond))

    generator = torch.Generator("cpu").manual_seed(SEED)
    x = torch.randn(tuple(result.latents.shape), generator=generator) * sigmas[0]
    samplers = {**KSAMPLERS, **CFG_PP}
    if samplers[spec.ksampler][2]:
        positive_sigmas = sigmas[sigmas > 0]
        tree = BrownianTreeNoiseSampler(x, positive_sigmas.min(), positive_sigmas.max(), seed=[SEED])
        noise = tree
    else:
        noise = lambda s, s_next: torch.randn(tuple(x.shape), generator=generator)  # noqa: E731
    with torch.inference_mode():
        run = functools.partial(samplers[spec.ksampler][0], **scheduler.run_options(sigmas))
        expected = drive(run, x, sigmas, denoiser, noise)
    torch.testing.assert_close(result.latents, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "sampler", "schedule"), [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("dpm++ 2m sde karras", "DPM++ 2M SDE", "Karras"),
    ("Euler a", "Euler a", "Automatic"),
    ("k_euler_a", "Euler a", "Automatic"),
    ("euler_a", "Euler a", "Automatic"),          # diffusers' and ComfyUI users' spelling
    ("DPM++ 2M", "DPM++ 2M", "Karras"),        # Automatic means Karras for DPM++ 2M, as in A1111
    ("DPM++ 2M SDE", "DPM++ 2M SDE", "Exponential"),
    ("LMS Karras", "LMS", "Karras"),
])
def test_names_users_know(name, sampler, schedule):
    choice = resolve_sampler(name)
    assert (choice.sampler.name, choice.schedule) == (sampler, schedule)


def test_schedule_configures_the_scheduler():
    scheduler = resolve_sampler("Euler", "Karras").build({"num_train_timesteps": 1000})
    assert scheduler.config.use_karras_sigmas
    assert resolve_sampler("Euler", "sgm_uniform").build({}).config.timestep_spacing == "trailing"


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(RequestError) as e:
        resolve_sampler("Euler b")
    assert "unknown sampler 'Euler b'" in str(e.value)
    for spec in SAMPLERS:
        assert spec.name in str(e.value)
    assert e.value.field == "sampler"


def test_unknown_schedule_is_an_error_with_the_closest_name():
    with pytest.raises(RequestError, match=r"unknown schedule type 'Polyexp' \(did you mean 'Polyexponential'"):
        resolve_sampler("Euler", "Polyexp")
    with pytest.raises(RequestError, match=r"unknown sampler 'Euler b' \(did you mean 'Euler a'\?\)"):
        resolve_sampler("Euler b")


NOTE_CASES = [pytest.param(spec, schedule, id=f"{spec.name}-{schedule}") for spec in SAMPLERS
              for schedule in SCHEDULE_TYPES if resolve_sampler(spec.name, schedule).note]


@pytest.mark.parametrize(("spec", "schedule"), NOTE_CASES)
def test_pairs_a_sampler_runs_on_its_own_timesteps_still_make_an_image_and_say_so(engine, spec, schedule):
    """The rest of the sampler x schedule matrix: DDIM, PLMS, UniPC, LCM and DPM fast keep their own steps for
    the other schedule types (as A1111 does); the image is made and the result's warnings say why."""
    result = engine.generate(GenerationRequest(prompt=PROMPT, steps=3, sampler=spec.name, schedule=schedule,
                                               seed=SEED))
    assert len(result.images) == 1 and any("keeps its own timesteps" in w for w in result.warnings)
