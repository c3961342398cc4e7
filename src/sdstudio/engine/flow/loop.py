"""The one flow-matching loop, shared by SD3 and Flux.

Rectified flow (Liu et al. 2022; Esser et al. 2024): x_sigma = (1 - sigma) x0 + sigma * noise, and the
transformer predicts the velocity v = noise - x0. Euler from sigma_i to sigma_{i+1} (FlowMatchEulerDiscrete):

    x <- x + (sigma_{i+1} - sigma_i) * v          (float32)           x0_hat = x - sigma_i * v

Guidance: SD3 (and Flux with CFG scale > 1, "true CFG") evaluates the negative and positive rows in one batch,
v = v_neg + s * (v_pos - v_neg). Flux-dev's distilled guidance is an input of the transformer, not a batch.
Inpainting blends the kept region back after every step, noised to the next sigma (the last step: x0 itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sdstudio.engine.flow.encode import FlowConditioning
from sdstudio.engine.hooks import StepHook, StepState

# (x (B, ...), sigma, conditioning rows, step i) -> velocity (B, ...); the family's transformer call (job.py),
# with its ControlNets' residuals for step i
Velocity = Callable[[Tensor, Tensor, FlowConditioning, int], Tensor]


@dataclass(frozen=True)
class FlowPlan:
    latents: Tensor                      # (B, ...) start: noise, or the init latents noised to sigmas[0]
    sigmas: Tensor                       # (S + 1,) float32, decreasing, last 0; already cut by strength
    cond: FlowConditioning               # B rows
    uncond: FlowConditioning | None      # B rows when guided (CFG scale > 1)
    cfg_scale: float
    blend: Callable[[Tensor, int], Tensor] | None = None  # (x after step i, i) -> x, kept region re-imposed


@torch.inference_mode()
def denoise(velocity: Velocity, plan: FlowPlan, hook: StepHook | None = None) -> Tensor:
    """Run the plan; returns the final latents (float32, the plan's shape)."""
    x = plan.latents.float()
    batch, total = x.shape[0], len(plan.sigmas) - 1
    context = plan.cond if plan.uncond is None else FlowConditioning(
        torch.cat([plan.uncond.context, plan.cond.context]), torch.cat([plan.uncond.pooled, plan.cond.pooled]))
    for i in range(total):
        sigma, following = plan.sigmas[i], plan.sigmas[i + 1]
        if plan.uncond is None:
            v = velocity(x, sigma, context, i).float()
        else:
            v_neg, v_pos = velocity(torch.cat([x, x]), sigma, context, i).float().chunk(2)
            v = v_neg + plan.cfg_scale * (v_pos - v_neg)
        x_in = x
        x = x + (following - sigma) * v
        if plan.blend is not None:
            x = plan.blend(x, i)
        if hook is not None:
            hook(StepState(i, total, sigma * 1000, x, lambda x_in=x_in, v=v, sigma=sigma: x_in[:batch] - sigma * v))
    return x
