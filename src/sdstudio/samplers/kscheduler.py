"""Our k-diffusion-style samplers behind the scheduler interface the one loop drives (a diffusers scheduler's
set_timesteps / scale_model_input / step / add_noise), for the (sampler, schedule) pairs diffusers lacks.

Evaluation k of a run is at noise level s_k (a step of a 2-stage sampler has two: s_i, then its inner point).
The loop calls the UNet at timestep t(s_k) (sigmas.DiscreteSigmas) on x / sqrt(s_k^2 + 1), as A1111's
CompVisDenoiser does, and `step` turns the output into the x0 estimate
    epsilon: D = x - s eps;   v: D = x / (s^2 + 1) - v s / sqrt(s^2 + 1);   sample: D = out
which it sends into the sampler (ksteps.py). Noise levels live in k-diffusion's variance-exploding space:
txt2img starts at noise * s_0, img2img at x0 + noise * s_start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from torch import Tensor

from sdstudio.samplers.cfgpp import CFG_PP
from sdstudio.samplers.ksteps import KSAMPLERS, Steps
from sdstudio.samplers.sigmas import DiscreteSigmas, schedule_sigmas


class KScheduler:
    """One run of a k-diffusion-style sampler on an A1111 schedule (stateful: one per batch, as diffusers')."""

    def __init__(self, sampler: str, schedule: str, model_config: Mapping[str, Any], seeds: Sequence[int] = (),
                 xl: bool = False, discard_penultimate: bool = False):
        self.sampler, self.schedule, self.seeds, self.xl = sampler, schedule, list(seeds), xl
        self.discard_penultimate = discard_penultimate
        self.run, self.order, self.brownian = {**KSAMPLERS, **CFG_PP}[sampler]
        base = EulerDiscreteScheduler.from_config(dict(model_config))  # the model's betas -> alphas_cumprod
        self.config = base.config
        self.alphas_cumprod = base.alphas_cumprod
        self.table = DiscreteSigmas.from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = torch.zeros(1)
        self.timesteps = torch.zeros(0)
        self._plan: list[tuple[int, Tensor]] = []   # evaluation k -> (its step, its sigma)
        self._begin = 0                               # the step img2img and handoffs start from
        self._index = 0                               # the next evaluation
        self._run: Steps | None = None
        self.cfg_pp = sampler in CFG_PP
        self.uncond_output: Callable[[], Tensor] | None = None  # CFG++: the step's unconditional model output

    @property
    def init_noise_sigma(self) -> float:
        return float(self.sigmas[self._begin])

    def set_timesteps(self, steps: int, device: torch.device | str | None = None) -> None:
        if self.discard_penultimate:  # A1111: n + 1 levels, the next-to-last dropped
            sigmas = schedule_sigmas(self.schedule, steps + 1, self.table, self.xl)
            self.sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        else:
            self.sigmas = schedule_sigmas(self.schedule, steps, self.table, self.xl)
        self._plan = self._evaluations(self.sigmas)
        self.timesteps = self.table.sigma_to_t(torch.stack([s for _, s in self._plan])).to(device)
        self._begin = self._index = 0
        self._run = None

    def _evaluations(self, sigmas: Tensor) -> list[tuple[int, Tensor]]:
        """Where the sampler will call the model: a dry run on a zero sample (the points depend on the sigmas
        alone for every sampler here). A 2-stage sampler evaluates twice per step but once in the last
        (an Euler step to 0), so evaluation k belongs to step k // order."""
        run = self.run(torch.zeros(1), sigmas, lambda s, s_next: torch.zeros(1), **self.run_options(sigmas))
        found, den = [], torch.zeros(2 if self.cfg_pp else 1, 1)
        try:
            x, sigma = next(run)
            while True:
                found.append(sigma)
                x, sigma = run.send((x, den if self.cfg_pp else den[0]))
        except StopIteration:
            return [(k // self.order, sigma) for k, sigma in enumerate(found)]

    def run_options(self, sigmas: Tensor) -> dict[str, Any]:
        """DPM fast from the first level runs down to the model's smallest sigma (A1111's txt2img)."""
        if self.sampler == "dpm_fast" and len(sigmas) == len(self.sigmas):
            return {"sigma_min": torch.tensor(self.table.sigma_min)}
        return {}

    def set_begin_index(self, begin: int = 0) -> None:
        """Start at evaluation `begin` = step * order: the sampler then runs on sigmas[step:], and the evaluations
        from `begin` on are that shorter run's (the same points for most samplers; Restart and DPM fast plan
        theirs from the length of the run, as A1111's img2img does)."""
        step = min(begin // self.order, len(self.sigmas) - 1)
        self._begin, self._index = step, begin
        tail = self._evaluations(self.sigmas[step:]) if step < len(self.sigmas) - 1 else []
        self._plan = self._plan[:begin] + [(step + s, sigma) for s, sigma in tail]
        times = self.table.sigma_to_t(torch.stack([s for _, s in tail])) if tail else torch.zeros(0)
        self.timesteps = torch.cat([self.timesteps[:begin], times.to(self.timesteps)])

    def scale_model_input(self, sample: Tensor, timestep: Tensor | float | None = None) -> Tensor:
        sigma = self._plan[self._index][1]
        return sample / (sigma**2 + 1) ** 0.5

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, generator: Any = None,
             return_dict: bool = False) -> tuple[Tensor]:
        sigma = self._plan[self._index][1].to(sample.device)
        denoised = self._denoised(model_output.float(), sample.float(), sigma)
        if self.cfg_pp:  # (2, B, C, h, w): the guided and the unconditional x0 estimates
            if self.uncond_output is None:
                raise RuntimeError("a CFG++ sampler needs the unconditional prediction (KScheduler.uncond_output)")
            uncond = self._denoised(self.uncond_output().float(), sample.float(), sigma)
            denoised = torch.stack([denoised, uncond])
        if self._run is None:
            sigmas = self.sigmas[self._begin:].to(sample.device)
            self._run = self.run(sample.float(), sigmas, self._noise(sample, sigmas, generator),
                                 **self.run_options(sigmas))
            next(self._run)                       # its first request: the sample just evaluated
        self._index += 1
        try:
            out, _ = self._run.send((sample.float(), denoised))
        except StopIteration as done:
            out = done.value
        return (out.to(sample.dtype),)

    def _denoised(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        kind = self.config.get("prediction_type", "epsilon")
        if kind == "v_prediction":
            return x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5
        return out if kind == "sample" else x - out * sigma

    def _noise(self, x: Tensor, sigmas: Tensor, generators: Any) -> Any:
        """noise(sigma, sigma_next): a Brownian tree per image seed (SDE samplers, as A1111), else one fresh
        draw per image from its own CPU generator."""
        if self.brownian:
            positive = sigmas[sigmas > 0]
            seeds = self.seeds or None
            tree = BrownianTreeNoiseSampler(x.float(), positive.min(), positive.max(), seed=seeds)
            return lambda s, s_next: tree(s, s_next).to(x.device, torch.float32)
        gens = generators if isinstance(generators, list) else [generators] * x.shape[0]
        shape = tuple(x.shape[1:])

        def fresh(sigma: Tensor, sigma_next: Tensor) -> Tensor:
            rows = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens]
            return torch.cat(rows).to(x.device)

        return fresh

    def add_noise(self, original: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x0 + noise * sigma(t): the sample at the noise level of timestep t (a planned one's own sigma)."""
        planned = {float(t): s for t, (_, s) in zip(self.timesteps, self._plan, strict=True)}
        sigma = torch.stack([planned.get(float(t), self.table.t_to_sigma(t.float().cpu())) for t in timesteps])
        sigma = sigma.to(original.device, original.dtype)
        return original + noise * sigma.view(-1, *([1] * (original.ndim - 1)))

    def to_json_string(self) -> str:
        config = {k: v for k, v in dict(self.config).items() if not k.startswith("_")}
        return json.dumps({"_class_name": "KScheduler", "sampler": self.sampler, "schedule": self.schedule,
                           **config}, default=str)
