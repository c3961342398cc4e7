"""A1111's schedule types: n sampling steps -> n + 1 noise levels sigma_0 > ... > sigma_{n-1} > 0 = sigma_n.

The model's discrete schedule: training timestep t in 0..T-1 has sigma_t = sqrt((1 - abar_t) / abar_t)
(abar: cumulative alpha product of the model's betas). Fractional timesteps interpolate log sigma linearly
(k-diffusion's DiscreteSchedule), which is how a sigma is turned into the UNet's timestep and back.
sigma_min = sigma_0 of the table, sigma_max = sigma_{T-1}.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Align Your Steps (Sabour et al. 2024, NVIDIA's published 10-step noise levels)
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


@dataclass(frozen=True)
class DiscreteSigmas:
    """The model's sigma table (T,), ascending with the timestep."""

    sigmas: Tensor  # float32

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> DiscreteSigmas:
        ac = alphas_cumprod.to(torch.float32)
        return cls(((1 - ac) / ac) ** 0.5)

    @property
    def log_sigmas(self) -> Tensor:
        return self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of each sigma: log sigma located in the table and interpolated linearly."""
        log_sigma = sigma.to(torch.float32).log()
        dists = log_sigma - self.log_sigmas[:, None]                       # (T, N)
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(self.sigmas) - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = t.to(torch.float32)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


def _zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float32), sigmas.new_zeros(1, dtype=torch.float32)])


def uniform(n: int, table: DiscreteSigmas, xl: bool) -> Tensor:
    """Timesteps evenly spaced from T-1 down to 0 (k-diffusion's get_sigmas)."""
    t_max = len(table.sigmas) - 1
    return _zero(table.t_to_sigma(torch.linspace(t_max, 0, n)))


def sgm_uniform(n: int, table: DiscreteSigmas, xl: bool) -> Tensor:
    """n timesteps evenly spaced from t(sigma_max), the last one short of t(sigma_min)."""
    return _zero(table.t_to_sigma(_t_range(table, n + 1)[:-1]))


def normal(n: int, table: DiscreteSigmas, xl: bool) -> Tensor:
    """n timesteps evenly spaced from t(sigma_max) to t(sigma_min), both ends included."""
    return _zero(table.t_to_sigma(_t_range(table, n)))


def _t_range(table: DiscreteSigmas, count: int) -> Tensor:
    ends = table.sigma_to_t(torch.tensor([table.sigma_max, table.sigma_min]))
    return torch.linspace(float(ends[0]), float(ends[1]), count)


def karras(n: int, table: DiscreteSigmas, xl: bool, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = table.sigma_min ** (1 / rho), table.sigma_max ** (1 / rho)
    return _zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, table: DiscreteSigmas, xl: bool) -> Tensor:
    """log sigma evenly spaced from log max to log min."""
    return _zero(torch.linspace(math.log(table.sigma_max), math.log(table.sigma_min), n).exp())


def polyexponential(n: int, table: DiscreteSigmas, xl: bool, rho: float = 1.0) -> Tensor:
    """log sigma = log min + ramp^rho (log max - log min), ramp from 1 to 0 (rho 1: exponential)."""
    ramp = torch.linspace(1, 0, n) ** rho
    lo, hi = math.log(table.sigma_min), math.log(table.sigma_max)
    return _zero((ramp * (hi - lo) + lo).exp())


def kl_optimal(n: int, table: DiscreteSigmas, xl: bool) -> Tensor:
    """KL-optimal (Sabour et al. 2024): sigma_i = tan(r_i atan(min) + (1 - r_i) atan(max)), r_i = i / (n-1)."""
    r = torch.arange(n, dtype=torch.float32) / max(n - 1, 1)
    return _zero(torch.tan(r * math.atan(table.sigma_min) + (1 - r) * math.atan(table.sigma_max)))


def align_your_steps(n: int, table: DiscreteSigmas, xl: bool) -> Tensor:
    """NVIDIA's 10-step levels for SD1.5/SDXL; other step counts interpolate log sigma over [0, 1]."""
    levels = AYS_SDXL if xl else AYS_SD15
    if n != len(levels) - 1:
        xs = np.linspace(0, 1, len(levels))
        new_xs = np.linspace(0, 1, n + 1)
        levels = tuple(np.exp(np.interp(new_xs, xs, np.log(levels[::-1])))[::-1])
    return _zero(torch.tensor(levels[:-1], dtype=torch.float32))


def simple(n: int, table: DiscreteSigmas, xl: bool) -> Tensor:
    """Every (T / n)-th training sigma, from the top."""
    stride = len(table.sigmas) / n
    return _zero(torch.stack([table.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def ddim(n: int, table: DiscreteSigmas, xl: bool) -> Tensor:
    """The training sigmas at 1, 1 + T//n, 1 + 2 T//n, ... (DDIM's uniform timestep skip), from the top."""
    stride = max(len(table.sigmas) // n, 1)
    return _zero(table.sigmas[1::stride].flip(0))


def beta(n: int, table: DiscreteSigmas, xl: bool, alpha: float = 0.6, b: float = 0.6) -> Tensor:
    """Beta(0.6, 0.6) quantiles of 1 - i/n (Lee et al. 2024), rounded to training timesteps."""
    from scipy import stats

    total = len(table.sigmas) - 1
    ts = 1 - np.linspace(0, 1, n, endpoint=False)
    ts = np.rint(stats.beta.ppf(ts, alpha, b) * total).astype(int)
    return _zero(torch.stack([table.sigmas[int(t)] for t in ts]))


# A1111's schedule types in its order: label -> (API name, function)
SCHEDULES: dict[str, tuple[str, Callable[[int, DiscreteSigmas, bool], Tensor]]] = {
    "Uniform": ("uniform", uniform),
    "Karras": ("karras", karras),
    "Exponential": ("exponential", exponential),
    "Polyexponential": ("polyexponential", polyexponential),
    "SGM Uniform": ("sgm_uniform", sgm_uniform),
    "KL Optimal": ("kl_optimal", kl_optimal),
    "Align Your Steps": ("align_your_steps", align_your_steps),
    "Simple": ("simple", simple),
    "Normal": ("normal", normal),
    "DDIM": ("ddim", ddim),
    "Beta": ("beta", beta),
}


def schedule_sigmas(schedule: str, steps: int, table: DiscreteSigmas, xl: bool = False) -> Tensor:
    """(steps + 1,) float32 sigmas of `schedule` (a label from SCHEDULES), ending in 0."""
    return SCHEDULES[schedule][1](steps, table, xl)
