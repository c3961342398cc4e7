"""k-diffusion's samplers (the ones A1111 runs) as generators, so that our one loop stays the driver.

A sampler here is `sampler(x, sigmas, noise)`: sigmas (n + 1,) from sigmas.py, ending in 0; noise(sigma,
sigma_next) draws fresh (B, C, h, w) noise (per-image generators, or a Brownian tree for the SDE samplers).
Each model evaluation is a `yield`: the sampler yields (x, sigma) and is sent back (x, denoised) -- x as the
loop holds it after its per-step blend (inpainting), and the model's x0 estimate D(x; sigma). The return
value is the final sample. Notation (Karras et al. 2022; DPM-Solver++, Lu et al. 2022):

    d = (x - D) / sigma                      the ODE's derivative dx/dsigma
    t = -log sigma, h = t_next - t           DPM-Solver's half-log-SNR time and step
    ancestral step sigma -> sigma_next: sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 -
        sigma_next^2) / sigma^2)), sigma_down = sqrt(sigma_next^2 - sigma_up^2); the step goes to sigma_down
        and adds noise * sigma_up.

Every step is proven equal to k-diffusion's on the same denoiser, sigmas and noise (scripts/check_ksamplers.py,
tests/test_ksamplers.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator

import torch
from scipy import integrate
from torch import Tensor

Steps = Generator[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor]
Noise = Callable[[Tensor, Tensor], Tensor]


def ancestral(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up) of an ancestral step."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def _lambda(sigma: Tensor) -> Tensor:
    return -sigma.log()


def _sigma(t: Tensor) -> Tensor:
    return (-t).exp()


def euler(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    """x <- x + d (sigma_next - sigma)."""
    for i in range(len(sigmas) - 1):
        x, den = yield x, sigmas[i]
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def euler_ancestral(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    """An Euler step to sigma_down, then noise * sigma_up."""
    for i in range(len(sigmas) - 1):
        x, den = yield x, sigmas[i]
        down, up = ancestral(sigmas[i], sigmas[i + 1])
        x = x + (x - den) / sigmas[i] * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def heun(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    """Karras et al. Algorithm 2: Euler predictor, trapezoidal corrector with d at sigma_next (Euler last)."""
    for i in range(len(sigmas) - 1):
        x, den = yield x, sigmas[i]
        d, dt = (x - den) / sigmas[i], sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x2, den2 = yield x + d * dt, sigmas[i + 1]
        x = x + (d + (x2 - den2) / sigmas[i + 1]) / 2 * dt
    return x


def _dpm2_step(x: Tensor, den: Tensor, sigma: Tensor, target: Tensor) -> Steps:
    """DPM-Solver-2 from sigma to target: d at the log-midpoint sigma_mid, then one step of it."""
    d = (x - den) / sigma
    mid = sigma.log().lerp(target.log(), 0.5).exp()
    x2, den2 = yield x + d * (mid - sigma), mid
    return x + (x2 - den2) / mid * (target - sigma)


def dpm_2(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    for i in range(len(sigmas) - 1):
        x, den = yield x, sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        else:
            x = yield from _dpm2_step(x, den, sigmas[i], sigmas[i + 1])
    return x


def dpm_2_ancestral(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    for i in range(len(sigmas) - 1):
        x, den = yield x, sigmas[i]
        down, up = ancestral(sigmas[i], sigmas[i + 1])
        if down == 0:
            x = x + (x - den) / sigmas[i] * (down - sigmas[i])
        else:
            x = yield from _dpm2_step(x, den, sigmas[i], down)
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def _lms_coefficient(order: int, sigmas: list[float], i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node sigma_{i-j}
    among the nodes sigma_i, ..., sigma_{i-order+1}."""
    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]


def lms(x: Tensor, sigmas: Tensor, noise: Noise, order: int = 4) -> Steps:
    """Linear multistep: x <- x + sum_j c_j d_{i-j}, the c_j integrating the Lagrange interpolant of the
    last min(i + 1, 4) derivatives."""
    nodes = [float(s) for s in sigmas]
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        x, den = yield x, sigmas[i]
        ds = [*ds, (x - den) / sigmas[i]][-order:]
        current = min(i + 1, order)
        x = x + sum(_lms_coefficient(current, nodes, i, j) * d for j, d in enumerate(reversed(ds)))
    return x


def dpmpp_2s_ancestral(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    """DPM-Solver++(2S) to sigma_down with its midpoint at t + h/2, then noise * sigma_up."""
    for i in range(len(sigmas) - 1):
        x, den = yield x, sigmas[i]
        down, up = ancestral(sigmas[i], sigmas[i + 1])
        if down == 0:
            x = x + (x - den) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_next = _lambda(sigmas[i]), _lambda(down)
            h = t_next - t
            s = t + h / 2
            _, den2 = yield _sigma(s) / _sigma(t) * x - torch.expm1(-h / 2) * den, _sigma(s)
            x = _sigma(t_next) / _sigma(t) * x - torch.expm1(-h) * den2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def dpmpp_sde(x: Tensor, sigmas: Tensor, noise: Noise, r: float = 0.5) -> Steps:
    """DPM-Solver++ (stochastic), two stages per step: an ancestral half step to s = t + r h, then the full
    step with D mixed as (1 - 1/(2r)) D(x) + 1/(2r) D(x2), each stage adding its sigma_up of noise."""
    for i in range(len(sigmas) - 1):
        x, den = yield x, sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _lambda(sigmas[i]), _lambda(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        down, up = ancestral(_sigma(t), _sigma(s))
        s_ = _lambda(down)
        x2 = _sigma(s_) / _sigma(t) * x - torch.expm1(t - s_) * den
        x2 = x2 + noise(_sigma(t), _sigma(s)) * up
        x2, den2 = yield x2, _sigma(s)
        down, up = ancestral(_sigma(t), _sigma(t_next))
        t_next_ = _lambda(down)
        mixed = (1 - 1 / (2 * r)) * den + 1 / (2 * r) * den2
        x = _sigma(t_next_) / _sigma(t) * x - torch.expm1(t - t_next_) * mixed
        x = x + noise(_sigma(t), _sigma(t_next)) * up
    return x


def dpmpp_2m(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    """DPM-Solver++(2M): x <- (sigma_next / sigma) x - expm1(-h) D', D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},
    r = h_{i-1} / h (first and last steps: D' = D_i)."""
    old = None
    for i in range(len(sigmas) - 1):
        x, den = yield x, sigmas[i]
        t, t_next = _lambda(sigmas[i]), _lambda(sigmas[i + 1])
        h = t_next - t
        mixed = den
        if old is not None and sigmas[i + 1] != 0:
            r = (t - _lambda(sigmas[i - 1])) / h
            mixed = (1 + 1 / (2 * r)) * den - 1 / (2 * r) * old
        x = _sigma(t_next) / _sigma(t) * x - torch.expm1(-h) * mixed
        old = den
    return x


def dpmpp_2m_sde(x: Tensor, sigmas: Tensor, noise: Noise, eta: float = 1.0, solver: str = "midpoint") -> Steps:
    """DPM-Solver++(2M) SDE with eta h of extra decay: x <- (sigma_next/sigma) e^(-eta h) x + (1 - e^(-h-eta h)) D
    + a 2nd-order correction in (D_i - D_{i-1}) / r (midpoint or heun), + noise sigma_next sqrt(1 - e^(-2 eta h));
    the last step (sigma_next = 0) returns D."""
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        x, den = yield x, sigmas[i]
        if sigmas[i + 1] == 0:
            x = den
        else:
            h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
            eta_h = eta * h
            decay = -torch.expm1(-h - eta_h)
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + decay * den
            if old is not None:
                r = h_last / h
                scale = (decay / (-h - eta_h) + 1) if solver == "heun" else 0.5 * decay
                x = x + scale * (1 / r) * (den - old)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt()
            h_last = h
        old = den
    return x


def dpmpp_2m_sde_heun(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    return (yield from dpmpp_2m_sde(x, sigmas, noise, solver="heun"))


def dpmpp_3m_sde(x: Tensor, sigmas: Tensor, noise: Noise, eta: float = 1.0) -> Steps:
    """DPM-Solver++(3M) SDE: exponential integrator with h_eta = (1 + eta) h and 2nd/3rd-order corrections
    from the last two D differences (phi_2 = expm1(-h_eta)/h_eta + 1, phi_3 = phi_2/h_eta - 1/2)."""
    den1 = den2 = h1 = h2 = None
    for i in range(len(sigmas) - 1):
        x, den = yield x, sigmas[i]
        if sigmas[i + 1] == 0:
            x = den
        else:
            h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * den
            phi2 = torch.expm1(-h_eta) / h_eta + 1
            if h2 is not None:
                r0, r1 = h1 / h, h2 / h
                d1_0, d1_1 = (den - den1) / r0, (den1 - den2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi2 * d1 - (phi2 / h_eta - 0.5) * d2
            elif h1 is not None:
                x = x + phi2 * (den - den1) / (h1 / h)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-torch.expm1(-2 * h * eta)).sqrt()
            h1, h2 = h, h1
        den1, den2 = den, den1
    return x


def dpm_fast(x: Tensor, sigmas: Tensor, noise: Noise, eta: float = 1.0, sigma_min: Tensor | None = None) -> Steps:
    """DPM-Solver "fast" (Lu et al. 2022, sec. 3.3): n = len(sigmas) - 1 model evaluations from sigmas[0] to
    sigma_min (A1111: the model's smallest sigma from the start, else the schedule's last positive one), in
    m = n // 3 + 1 steps evenly spaced in t, of orders 3, ..., 3, then 2, 1 (n % 3 == 0) or n % 3. Ancestral
    with eta (A1111 runs it at eta 1): each step goes to sigma_down, clamped to the end, and adds noise
    sqrt(sigma_next^2 - sigma_down'^2). Ends at sigma_min, as k-diffusion's. A run with nowhere to go (one
    level, no sigma_min below it; k-diffusion refuses it) is one Euler step to 0."""
    n = len(sigmas) - 1
    t_end = _lambda(sigmas[-2] if sigma_min is None else sigma_min)
    if t_end <= _lambda(sigmas[0]):
        x, den = yield x, sigmas[0]
        return den
    m = n // 3 + 1
    ts = torch.linspace(float(_lambda(sigmas[0])), float(t_end), m + 1)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        up: Tensor | float = 0.0
        if eta:
            down, _ = ancestral(_sigma(t), _sigma(t_next), eta)
            t_next_ = torch.minimum(t_end, _lambda(down))
            up = (_sigma(t_next) ** 2 - _sigma(t_next_) ** 2) ** 0.5
        else:
            t_next_ = t_next
        x = yield from _dpm_solver_step(x, t, t_next_, order)
        x = x + noise(_sigma(t), _sigma(t_next)) * up
    return x


def _dpm_solver_step(x: Tensor, t: Tensor, t_next: Tensor, order: int) -> Steps:
    """DPM-Solver-1/2/3 from t to t_next in eps form, eps = (x - D) / sigma, h = t_next - t:
    1: x - s(t_next) (e^h - 1) eps;  2 (r = 1/2) and 3 (r1 = 1/3, r2 = 2/3): intermediate points
    u_j = x - s(s_j) (e^(r_j h) - 1) eps [- correction], then the final combination of the eps differences."""
    x, den = yield x, _sigma(t)
    eps = (x - den) / _sigma(t)
    h = t_next - t
    first = x - _sigma(t_next) * h.expm1() * eps
    if order == 1:
        return first
    if order == 2:
        s1 = t + h / 2
        u1, den1 = yield x - _sigma(s1) * (h / 2).expm1() * eps, _sigma(s1)
        return first - _sigma(t_next) * h.expm1() * ((u1 - den1) / _sigma(s1) - eps)
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = t + r1 * h, t + r2 * h
    u1, den1 = yield x - _sigma(s1) * (r1 * h).expm1() * eps, _sigma(s1)
    eps1 = (u1 - den1) / _sigma(s1)
    u2 = x - _sigma(s2) * (r2 * h).expm1() * eps - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (
        eps1 - eps)
    u2, den2 = yield u2, _sigma(s2)
    return first - _sigma(t_next) / r2 * (h.expm1() / h - 1) * ((u2 - den2) / _sigma(s2) - eps)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5, between given ends, with a final 0 (k-diffusion's get_sigmas_karras)."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


def restart(x: Tensor, sigmas: Tensor, noise: Noise) -> Steps:
    """Restart sampling (Xu et al. 2023) as A1111 defines it: Heun steps; from 20 steps on, the main schedule is
    Karras over steps - k r levels, and at the level nearest sigma 0.1 the sampler jumps back (adding noise
    sqrt(s_hi^2 - s_lo^2)) to the level nearest 2 and runs k Heun steps down again on a Karras schedule, r times
    (k = 9, r = 1; from 36 steps k = steps // 4, r = 2). Under 20 steps it is Heun on the given sigmas."""
    steps = len(sigmas) - 1
    restarts: dict[float, tuple[int, int, float]] = {}
    if steps >= 20:
        k, r = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras_sigmas(steps - k * r, float(sigmas[-2]), float(sigmas[0]))
        restarts = {0.1: (k + 1, r, 2.0)}
    at = {int((sigmas - level).abs().argmin()): plan for level, plan in restarts.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            k, r, top = at[i + 1]
            high = int((sigmas - top).abs().argmin())
            if high < i + 1:
                levels = karras_sigmas(k, float(sigmas[i + 1]), float(sigmas[high]))[:-1]
                pairs += list(itertools.pairwise(levels)) * r
    last = None
    for sigma, sigma_next in pairs:
        if last is not None and last < sigma:
            x = x + noise(last, sigma) * (sigma**2 - last**2) ** 0.5
        x, den = yield x, sigma
        d, dt = (x - den) / sigma, sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x2, den2 = yield x + d * dt, sigma_next
            x = x + (d + (x2 - den2) / sigma_next) / 2 * dt
        last = sigma_next
    return x


# name -> (sampler, model evaluations per step but the last, uses a Brownian tree)
KSAMPLERS: dict[str, tuple[Callable[..., Steps], int, bool]] = {
    "euler": (euler, 1, False),
    "euler_ancestral": (euler_ancestral, 1, False),
    "heun": (heun, 2, False),
    "dpm_2": (dpm_2, 2, False),
    "dpm_2_ancestral": (dpm_2_ancestral, 2, False),
    "lms": (lms, 1, False),
    "dpmpp_2s_ancestral": (dpmpp_2s_ancestral, 2, False),
    "dpmpp_sde": (dpmpp_sde, 2, True),
    "dpmpp_2m": (dpmpp_2m, 1, False),
    "dpmpp_2m_sde": (dpmpp_2m_sde, 1, True),
    "dpmpp_2m_sde_heun": (dpmpp_2m_sde_heun, 1, True),
    "dpmpp_3m_sde": (dpmpp_3m_sde, 1, True),
    "dpm_fast": (dpm_fast, 1, False),
    "restart": (restart, 2, False),
}
