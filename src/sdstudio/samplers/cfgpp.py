"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance") in the form of
ksteps.py: generators that yield (x, sigma) and are sent (x, [D, D_u]), the guided and the unconditional x0
estimates stacked on a new first axis (KScheduler stacks them).

The sample moves to the guided x0 estimate D but is re-noised along the *unconditional* noise estimate
eps_u = (x - D_u) / sigma, with the guidance scale lambda in [0, 1] (the loop gives cfg_scale / 12.5, as A1111's
DDIM CFG++). DDIM's update in k-diffusion's VE space is Euler's, so DDIM CFG++ is euler_cfg_pp on DDIM's
timesteps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sdstudio.samplers.ksteps import Noise, Steps, _lambda, ancestral


def euler_cfg_pp(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    """x <- D + sigma_next eps_u: the paper's DDIM CFG++ step, x_{t-1} = sqrt(a_{t-1}) x0_lambda +
    sqrt(1 - a_{t-1}) eps_u, written for x / sqrt(a)."""
    for i in range(len(sigmas) - 1):
        x, (den, den_u) = yield x, sigmas[i]
        x = den + (x - den_u) / sigmas[i] * sigmas[i + 1]
    return x


def euler_ancestral_cfg_pp(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    """x <- D + sigma_down eps_u, then noise * sigma_up."""
    for i in range(len(sigmas) - 1):
        x, (den, den_u) = yield x, sigmas[i]
        down, up = ancestral(sigmas[i], sigmas[i + 1])
        x = den + (x - den_u) / sigmas[i] * down
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def dpmpp_2m_cfg_pp(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    """DPM-Solver++(2M) with the CFG++ re-noising: x <- e^-h x + D - e^-h D_u - expm1(-h) / (2r) (D - D_u,prev),
    r = h_prev / h (first and last steps: the Euler CFG++ step), as ComfyUI's and Forge's dpmpp_2m_cfg_pp."""
    old = None
    for i in range(len(sigmas) - 1):
        x, (den, den_u) = yield x, sigmas[i]
        t, t_next = _lambda(sigmas[i]), _lambda(sigmas[i + 1])
        h = t_next - t
        mix = -torch.exp(-h) * den_u
        if old is not None and sigmas[i + 1] != 0:
            r = (t - _lambda(sigmas[i - 1])) / h
            mix = mix - torch.expm1(-h) * (1 / (2 * r)) * (den - old)
        x = den + mix + torch.exp(-h) * x
        old = den_u
    return x


# name -> (sampler, model evaluations per step but the last, uses a Brownian tree), as ksteps.KSAMPLERS
CFG_PP: dict[str, tuple[Callable[..., Steps], int, bool]] = {
    "euler_cfg_pp": (euler_cfg_pp, 1, False),
    "euler_ancestral_cfg_pp": (euler_ancestral_cfg_pp, 1, False),
    "dpmpp_2m_cfg_pp": (dpmpp_2m_cfg_pp, 1, False),
}
