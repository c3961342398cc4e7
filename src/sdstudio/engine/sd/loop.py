"""The one denoising loop. Every SD-family mode is a Plan handed to `denoise`.

Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + s * (eps_c - eps_u), with the
unconditional and conditional branches in one UNet batch; the unconditional one is skipped when s <= 1,
as diffusers does. With several weighted positives (A1111's AND): eps_u + s * sum_j w_j (eps_j - eps_u).
Add-ons that change how the branches combine (CFG-Zero*, APG, PAG) are a `Guide` on the plan (guidance.py).
The scheduler (any diffusers scheduler) owns the update rule and the prediction type (epsilon,
v-prediction); the loop only feeds it model outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from sdstudio.engine.hooks import StepHook, StepState
from sdstudio.engine.sd.control import ControlInput, residuals
from sdstudio.engine.sd.guidance import Guide
from sdstudio.engine.sd.rows import per_image
from sdstudio.prompts.conditioning import CondProvider, GuidedConditioning


@dataclass(frozen=True)
class Plan:
    """What the stages prepared for the loop."""

    latents: Tensor                 # (B, C, h, w) start: noise * init_noise_sigma, or the noised init image
    timesteps: Tensor               # (S,) the scheduler's timesteps, already cut by strength
    cond: CondProvider              # cond.at(i): positive/negative conditioning for evaluation i
    cfg_scale: float
    guidance_rescale: float = 0.0   # rescale-CFG phi; 0: plain CFG
    condition: Tensor | None = None  # (B, 5, h, w) mask + masked-image latents after x_t (9-channel inpainting)
    blend: Callable[[Tensor, int], Tensor] | None = None  # (x after step i, i) -> x, kept region re-imposed
    step_kwargs: Mapping[str, Any] = field(default_factory=dict)  # per-image generators, eta
    controls: tuple[ControlInput, ...] = ()  # ControlNet units, residuals summed into every UNet call
    check: Callable[[], None] | None = None  # within a step (between units, images): raises to cancel
    per_image: bool = False  # call the UNet (and ControlNets) image by image: batch-invariant results (rows.py)
    guide: Guide | None = None  # guidance add-ons (CFG-Zero*, APG, PAG; guidance.py); None: plain CFG
    before_step: Callable[[int, int], None] | None = None  # (i, total): per-step UNet state (IP-Adapter scales)


@torch.inference_mode()
def denoise(unet: UNet2DConditionModel, scheduler: SchedulerMixin, plan: Plan, hook: StepHook | None = None) -> Tensor:
    """Run the plan; returns the final latents (B, C, h, w)."""
    x = plan.latents
    batch, total = x.shape[0], len(plan.timesteps)
    for i, t in enumerate(plan.timesteps):
        if plan.before_step is not None:
            plan.before_step(i, total)
        cond = plan.cond.at(i)
        k = len(cond.positives)
        # one positive without guidance (and no add-on): no unconditional branch
        guided = plan.cfg_scale > 1.0 or k > 1 or plan.guide is not None
        evaluate = partial(model_output, unet, scheduler, plan, x, t, i, cond)
        out, x_in = evaluate(guided)
        if guided:
            uncond, *texts = out.chunk(k + 1)
            delta = sum(w * (text - uncond) for w, text in zip(cond.weights, texts, strict=True))
            if plan.guide is None:
                out = uncond + plan.cfg_scale * delta
            else:  # the add-ons; PAG evaluates the conditional branch again, perturbed
                out = plan.guide(uncond, delta, partial(first, evaluate, False))
            if plan.guidance_rescale > 0:
                out = rescale_cfg(out, uncond + delta, plan.guidance_rescale)
        x = scheduler.step(out, t, x, **plan.step_kwargs, return_dict=False)[0]
        if plan.blend is not None:
            x = plan.blend(x, i)
        if hook is not None:
            x0 = partial(predict_x0, scheduler, out, x_in[:batch], t)
            hook(StepState(i, total, t, x, x0))
    return x


def model_output(unet: UNet2DConditionModel, scheduler: SchedulerMixin, plan: Plan, x: Tensor, t: Tensor, i: int,
                 cond: GuidedConditioning, guided: bool) -> tuple[Tensor, Tensor]:
    """The UNet's prediction for x at step i, ((k+1)B | B, C, h, w): the guidance batch (negative rows first)
    when guided, else the first positive's; with the scaled input it saw."""
    batch, k = x.shape[0], len(cond.positives)
    x_in = scheduler.scale_model_input(torch.cat([x] * (k + 1)) if guided else x, t)  # ((k+1)B | B, C, h, w)
    context = cond.cfg_batch if guided else cond.positive
    model_in = x_in if plan.condition is None else \
        torch.cat([x_in, plan.condition.repeat(k + 1 if guided else 1, 1, 1, 1)], dim=1)
    images = batch if plan.per_image else 1
    extra = residuals(plan.controls, x_in, t, cond, guided, batch, i, len(plan.timesteps), plan.check,
                      images) if plan.controls else {}
    return per_image(at_timestep(unet, t), model_in, {**context.unet_kwargs(), **extra}, images, plan.check), x_in


def first(evaluate: Callable[[bool], tuple[Tensor, Tensor]], guided: bool) -> Tensor:
    """The prediction of model_output, without the input it saw."""
    return evaluate(guided)[0]


def at_timestep(unet: Callable[..., Any], t: Tensor) -> Callable[..., Tensor]:
    """unet(rows, t, **kw)'s output tensor, for per_image."""
    return lambda rows, **kw: unet(rows, t, **kw, return_dict=False)[0]


def rescale_cfg(guided: Tensor, text: Tensor, phi: float) -> Tensor:
    """Rescaled CFG (Lin et al. 2023, sec. 3.4): match the guided output's per-image std to the
    conditional branch's, then mix: phi * guided * std(text) / std(guided) + (1 - phi) * guided."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def alpha_bar(scheduler: SchedulerMixin, t: Tensor) -> Tensor:
    """Cumulative signal fraction at a (possibly fractional) timestep t.

    Sigma schedulers interpolate timesteps linearly in log sigma, sigma = sqrt((1 - a) / a), so we
    interpolate the same way: exact for integer t and for every sigma the scheduler produced.
    """
    ac = scheduler.alphas_cumprod.to(torch.float64).clamp(1e-12, 1.0)
    log_sigma = 0.5 * torch.log((1 - ac) / ac)
    tf = float(t)
    lo = min(int(tf), len(ac) - 1)
    hi = min(lo + 1, len(ac) - 1)
    w = tf - lo
    s = torch.exp((1 - w) * log_sigma[lo] + w * log_sigma[hi])
    return 1.0 / (1.0 + s * s)


def predict_x0(scheduler: SchedulerMixin, model_output: Tensor, sample: Tensor, t: Tensor) -> Tensor:
    """x0 from a model output at the variance-preserving input `sample` = sqrt(a) x0 + sqrt(1-a) eps.

    epsilon: x0 = (x - sqrt(1-a) eps) / sqrt(a);  v: x0 = sqrt(a) x - sqrt(1-a) v;  sample: x0 = out.
    """
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "sample":
        return model_output
    a = alpha_bar(scheduler, t).clamp(min=1e-8)
    sa, sb = float(a.sqrt()), float((1 - a).sqrt())
    if kind == "v_prediction":
        return sa * sample - sb * model_output
    return (sample - sb * model_output) / sa
