"""A model with a known answer for checking samplers: the exact denoiser of Gaussian data, and a seeded noise
stream. Shared by scripts/check_ksamplers.py (against k-diffusion) and tests/test_ksamplers.py."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sdstudio.samplers.ksteps import Noise, Steps

BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # SD1.5's schedule
MU, STD, STEPS, SHAPE = 0.3, 0.5, 8, (2, 1, 2, 2)


def gaussian_denoiser(mu: float, std: float) -> Callable[[Tensor, Tensor], Tensor]:
    """D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2): E[x0 | x] for x0 ~ N(mu, s^2), x = x0 + sigma n."""
    def den(x: Tensor, sigma: Tensor) -> Tensor:
        s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2 if sigma.ndim else sigma**2
        return (std**2 * x + s2 * mu) / (std**2 + s2)

    return den


def noise_stream(seed: int = 5) -> Noise:
    """Fresh normal noise of SHAPE at each call, from one seeded CPU generator (float64 draws, cast)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=generator, dtype=torch.float64).float()


def start(sigmas: Tensor, seed: int = 1) -> Tensor:
    """x at sigma_0: seeded normal noise * sigma_0."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    return noise * sigmas[0]


def drive(run: Callable[..., Steps], x: Tensor, sigmas: Tensor, den: Callable[[Tensor, Tensor], Tensor],
          noise: Noise) -> Tensor:
    """Run one of our generator samplers to the end with the model `den`; the final sample."""
    steps = run(x, sigmas, noise)
    try:
        x, sigma = next(steps)
        while True:
            x, sigma = steps.send((x, den(x, sigma)))
    except StopIteration as done:
        return done.value
