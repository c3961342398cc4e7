"""Capturing the denoising process: a step hook that keeps latents and predicted x0 every N steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from sdstudio.engine.hooks import StepState
from sdstudio.engine.requests import Capture
from sdstudio.engine.sd.preview import latent_channels_picture
from sdstudio.engine.sd.stages import decode_latents, to_pil


class FrameCapture:
    """Keeps (B, C, h, w) CPU copies of x_t and of the predicted x0 at every `every`-th step and the last.
    view: the loop's latents as (B, C, h, w) (Flux's loop runs on packed tokens)."""

    def __init__(self, every: int, view: Callable[[Tensor], Tensor] | None = None):
        self.every, self.view = every, view or (lambda z: z)
        self.steps: list[int] = []
        self.latents: list[Tensor] = []
        self.x0: list[Tensor] = []

    def __call__(self, state: StepState) -> None:
        done = state.step + 1
        if done % self.every == 0 or state.is_last:
            self.steps.append(done)
            self.latents.append(self.view(state.latents.detach().float().cpu()))
            self.x0.append(self.view(state.predict_x0().detach().float().cpu()))

    def render(self, vae: Any, factor: int) -> list[Capture]:
        """Decode what was kept: one Capture per image of the batch."""
        if not self.steps:
            return []
        batch = self.latents[0].shape[0]
        decoded = [to_pil(decode_latents(vae, z), factor) for z in self.latents]   # [step][image]
        denoised = [to_pil(decode_latents(vae, z), factor) for z in self.x0]
        return [
            Capture(
                steps=list(self.steps),
                decoded=[frames[b] for frames in decoded],
                denoised=[frames[b] for frames in denoised],
                latents=[latent_channels_picture(z[b], factor) for z in self.latents],
            )
            for b in range(batch)
        ]

