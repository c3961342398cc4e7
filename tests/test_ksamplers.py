"""Our k-diffusion-style samplers and A1111's schedule types, against k-diffusion's outputs.

tests/data/ksamplers.json holds k-diffusion 0.1.1's own final samples for every sampler x schedule type on the
exact denoiser of Gaussian data (scripts/check_ksamplers.py wrote it, and prints the comparison: at most
3.6e-7 apart). The schedule types A1111 defines itself are checked against their definitions here.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from sdstudio.samplers import SAMPLERS, resolve_sampler
from sdstudio.samplers.cfgpp import CFG_PP
from sdstudio.samplers.ksteps import KSAMPLERS
from sdstudio.samplers.sigmas import AYS_SD15, AYS_SDXL, SCHEDULES, DiscreteSigmas, schedule_sigmas
from sdstudio.testing.ksamplers import BETAS, MU, STD, STEPS, drive, gaussian_denoiser, noise_stream, start

REFERENCE = json.loads((Path(__file__).parent / "data" / "ksamplers.json").read_text())
TABLE = DiscreteSigmas.from_alphas_cumprod(EulerDiscreteScheduler(**BETAS).alphas_cumprod)


@pytest.mark.parametrize("sampler", list(KSAMPLERS))
def test_every_sampler_on_every_schedule_equals_k_diffusion(sampler):
    run = KSAMPLERS[sampler][0]
    for schedule in SCHEDULES:
        sigmas = schedule_sigmas(schedule, STEPS, TABLE)
        ours = drive(run, start(sigmas), sigmas, gaussian_denoiser(MU, STD), noise_stream())
        expected = torch.tensor(REFERENCE[sampler][schedule]).view_as(ours)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5, msg=f"{sampler} on {schedule}")


def test_euler_cfg_pp_is_the_papers_ddim_cfg_pp_step():
    """CFG++ (Chung et al. 2024, Algorithm 1) in VP space: x0_l = (x_t - sqrt(1 - a_t) eps_l) / sqrt(a_t) with
    eps_l = eps_u + l (eps_c - eps_u); x_prev = sqrt(a_prev) x0_l + sqrt(1 - a_prev) eps_u. Our step works on
    x / sqrt(a) with sigma = sqrt((1 - a) / a)."""
    g = torch.Generator().manual_seed(3)
    x_vp, eps_u, eps_c = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a_t, a_prev, lam = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64), 0.6
    eps_l = eps_u + lam * (eps_c - eps_u)
    x0_l = (x_vp - (1 - a_t).sqrt() * eps_l) / a_t.sqrt()
    expected = a_prev.sqrt() * x0_l + (1 - a_prev).sqrt() * eps_u
    sigma_t, sigma_prev = ((1 - a_t) / a_t).sqrt(), ((1 - a_prev) / a_prev).sqrt()
    x = x_vp / a_t.sqrt()
    denoised = torch.stack([x - sigma_t * eps_l, x - sigma_t * eps_u])  # [D, D_u] as the scheduler sends them
    steps = CFG_PP["euler_cfg_pp"][0](x, torch.stack([sigma_t, sigma_prev, torch.zeros(())]), None)
    next(steps)
    x_next, _ = steps.send((x, denoised))
    torch.testing.assert_close(x_next * a_prev.sqrt(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("cfg_pp", "plain"), [("euler_cfg_pp", "euler"), ("euler_ancestral_cfg_pp", "euler_ancestral"),
                                               ("dpmpp_2m_cfg_pp", "dpmpp_2m")])
def test_cfg_pp_samplers_without_guidance_are_their_plain_samplers(cfg_pp, plain):
    """With the unconditional estimate equal to the guided one, re-noising along it changes nothing."""
    den = gaussian_denoiser(MU, STD)
    for schedule in ("Karras", "Uniform", "DDIM"):
        sigmas = schedule_sigmas(schedule, STEPS, TABLE)
        ours = drive(CFG_PP[cfg_pp][0], start(sigmas), sigmas, lambda x, s: torch.stack([den(x, s)] * 2),
                     noise_stream())
        expected = drive(KSAMPLERS[plain][0], start(sigmas), sigmas, den, noise_stream())
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5, msg=f"{cfg_pp} on {schedule}")


def test_the_samplers_reach_the_data():
    """Sanity of the reference itself: with the exact denoiser every sampler ends near the data mean."""
    for sampler, by_schedule in REFERENCE.items():
        for schedule, values in by_schedule.items():
            assert abs(sum(values) / len(values) - MU) < 3 * STD, (sampler, schedule)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 4, 10, 25])
def test_schedules_descend_to_zero(schedule, steps):
    sigmas = schedule_sigmas(schedule, steps, TABLE)
    assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0
    assert bool((sigmas[:-1] > 0).all()) and bool((sigmas[:-1] <= TABLE.sigma_max * 1.0001).all())
    if steps > 1:
        assert bool((sigmas[1:] < sigmas[:-1]).all()), sigmas


def test_schedules_as_a1111_defines_them():
    smin, smax = TABLE.sigma_min, TABLE.sigma_max
    karras = schedule_sigmas("Karras", 10, TABLE)
    assert karras[0] == pytest.approx(smax) and karras[-2] == pytest.approx(smin)
    torch.testing.assert_close(schedule_sigmas("Polyexponential", 10, TABLE), schedule_sigmas("Exponential", 10, TABLE))
    assert schedule_sigmas("Align Your Steps", 10, TABLE)[:-1].tolist() == pytest.approx(AYS_SD15[:-1])
    assert schedule_sigmas("Align Your Steps", 10, TABLE, xl=True)[:-1].tolist() == pytest.approx(AYS_SDXL[:-1])
    assert schedule_sigmas("Align Your Steps", 20, TABLE)[0] == pytest.approx(AYS_SD15[0])
    ddim = schedule_sigmas("DDIM", 10, TABLE)  # training sigmas at t = 901, 801, ..., 1
    assert ddim[:-1].tolist() == pytest.approx([float(TABLE.sigmas[t]) for t in range(901, 0, -100)])
    simple = schedule_sigmas("Simple", 10, TABLE)  # t = 999, 899, ..., 99
    assert simple[:-1].tolist() == pytest.approx([float(TABLE.sigmas[t]) for t in range(999, 0, -100)])
    normal, sgm = schedule_sigmas("Normal", 4, TABLE), schedule_sigmas("SGM Uniform", 4, TABLE)
    assert normal[0] == pytest.approx(smax) and normal[-2] == pytest.approx(smin)  # both ends
    assert sgm[0] == pytest.approx(smax) and sgm[-2] > smin * 1.5                     # stops a step short
    kl = schedule_sigmas("KL Optimal", 5, TABLE)
    assert kl[0] == pytest.approx(smax) and kl[-2] == pytest.approx(smin)
    assert torch.atan(kl[:-1]).diff().tolist() == pytest.approx([torch.atan(kl[:-1]).diff()[0].item()] * 4)
    torch.testing.assert_close(normal, schedule_sigmas("Uniform", 4, TABLE))  # the same on a discrete model
    uniform = schedule_sigmas("Uniform", 4, TABLE)  # t = 999, 666, 333, 0
    assert uniform[:-1].tolist() == pytest.approx([float(TABLE.sigmas[t]) for t in (999, 666, 333, 0)])


def test_sigma_and_timestep_round_trip():
    t = torch.tensor([0.0, 10.5, 500.25, 999.0])
    torch.testing.assert_close(TABLE.sigma_to_t(TABLE.t_to_sigma(t)), t, rtol=0, atol=1e-3)


def test_every_pair_resolves_and_a1111s_names_are_understood():
    for spec in SAMPLERS:
        for schedule in spec.schedules:
            choice = resolve_sampler(spec.name, schedule)
            assert choice.native or spec.ksampler or choice.note, (spec.name, schedule)
    assert resolve_sampler("Euler a", "karras").schedule == "Karras"
    assert resolve_sampler("euler_ancestral", "normal").sampler.name == "Euler a"  # ComfyUI's names
    assert resolve_sampler("dpmpp_2m", "ddim_uniform").schedule == "DDIM"
    assert resolve_sampler("DPM++ 2M SDE Heun Karras").schedule == "Karras"
    assert resolve_sampler("DDIM", "normal").note and resolve_sampler("DDIM", "normal").schedule == "Automatic"


def evaluations(run, sigmas: torch.Tensor, **options) -> list[float]:
    """The noise levels a sampler asks the model at (they depend on the sigmas alone)."""
    steps, found = run(torch.zeros(1), sigmas, lambda s, s_next: torch.zeros(1), **options), []
    try:
        x, sigma = next(steps)
        while True:
            found.append(float(sigma))
            x, sigma = steps.send((x, torch.zeros(1)))
    except StopIteration:
        return found


def test_restart_from_20_steps_jumps_back_and_reaches_the_data():
    """A1111's Restart: 20 steps = 11 Karras Heun steps (21 evaluations) and one restart of 9 Heun steps from
    the level nearest 2 back down to the one nearest 0.1 (18); 36 steps restart twice with 9 each."""
    restart = KSAMPLERS["restart"][0]
    for steps, count, jumps in ((20, 39, 1), (36, 71, 2)):
        sigmas = schedule_sigmas("Karras", steps, TABLE)
        levels = evaluations(restart, sigmas)
        ups = [(a, b) for a, b in itertools.pairwise(levels) if b > a * 1.5]
        assert len(levels) == count and len(ups) == jumps, (steps, levels)
        assert all(0.05 < a < 0.2 and 1.5 < b < 2.5 for a, b in ups)
        out = drive(restart, start(sigmas), sigmas, gaussian_denoiser(MU, STD), noise_stream())
        assert abs(float(out.mean()) - MU) < 3 * STD


def test_img2img_runs_the_sampler_on_the_cut_schedule():
    """KScheduler.set_begin_index plans the evaluations of a run on sigmas[step:], as A1111's img2img runs the
    sampler on the cut schedule: the same points for Heun, fewer than 20 levels (no restart) for Restart, and
    DPM fast from the cut to the schedule's last level instead of the model's smallest sigma."""
    from sdstudio.samplers.kscheduler import KScheduler

    config = EulerDiscreteScheduler(**BETAS).config
    for sampler, steps, step in (("heun", 10, 4), ("restart", 24, 12), ("dpm_fast", 9, 3)):
        scheduler = KScheduler(sampler, "Karras", config)
        scheduler.set_timesteps(steps)
        begin = step * scheduler.order
        scheduler.set_begin_index(begin)
        cut = scheduler.sigmas[step:]
        expected = TABLE.sigma_to_t(torch.tensor(evaluations(KSAMPLERS[sampler][0], cut)))
        torch.testing.assert_close(scheduler.timesteps[begin:], expected, msg=sampler)
