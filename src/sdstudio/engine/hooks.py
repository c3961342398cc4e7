"""Per-step hooks: progress, previews, capture and cancellation, passed explicitly to the loop."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from sdstudio.errors import Cancelled


@dataclass(frozen=True)
class StepState:
    """What the loop knows after model evaluation `step` (0-based) of `total`."""

    step: int
    total: int
    timestep: Tensor
    latents: Tensor                    # (B, C, h, w) after the scheduler step
    predict_x0: Callable[[], Tensor]   # (B, C, h, w) the model's estimate of the clean latents; lazy

    @property
    def is_last(self) -> bool:
        return self.step == self.total - 1


StepHook = Callable[[StepState], None]


def chain(hooks: Sequence[StepHook | None]) -> StepHook:
    active = [h for h in hooks if h is not None]

    def run(state: StepState) -> None:
        for hook in active:
            hook(state)

    return run


class CancelToken:
    """Thread-safe flag a caller sets to stop a job; the engine checks it between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")

    def hook(self, state: StepState) -> None:
        self.raise_if_cancelled()


@dataclass(frozen=True)
class ProgressEvent:
    """Sent after every step. `preview()` costs a few microseconds and only runs when called."""

    iteration: int   # 0-based batch index within n_iter
    n_iter: int
    step: int        # steps done in this batch (1-based)
    steps: int       # steps in this batch
    _preview: Callable[[], Image.Image]

    @property
    def fraction(self) -> float:
        """Fraction of the whole job done, in [0, 1]."""
        return (self.iteration + self.step / max(self.steps, 1)) / self.n_iter

    def preview(self) -> Image.Image:
        """A cheap RGB approximation of the first image's current latents (1 pixel per latent cell)."""
        return self._preview()


ProgressCallback = Callable[[ProgressEvent], None]
