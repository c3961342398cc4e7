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


class StopEarly(Exception):
    """Raised between steps to finish the current image now from the model's estimate of x0 (B, C, h, w)."""

    def __init__(self, latents: Tensor):
        super().__init__("stopped early")
        self.latents = latents


class CancelToken:
    """Thread-safe flags a caller sets to stop a job; the engine checks them between steps.

    cancel: stop, no result. interrupt (A1111's Interrupt): the current image is finished from the model's
    current estimate of x0 and no further batch is made. skip (A1111's Skip): the same for the current
    batch only; the job goes on."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._interrupt = threading.Event()
        self._skip = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")

    def hook(self, state: StepState) -> None:
        self.raise_if_cancelled()
        if self._interrupt.is_set() or self._skip.is_set():
            self._skip.clear()
            raise StopEarly(state.predict_x0())


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
